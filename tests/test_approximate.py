"""The approximate engine (projective-field thresholding): exact at tau=1, cheaper below, and an
error it measures itself that equals the exact engine's maps computed independently."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline import ComputeOptions, Engine, attribute
from pipeline.config import OcclusionConfig
from pipeline.incremental import ApproximateEngine, IncrementalEngine
from pipeline.incremental.ops import run_node
from pipeline.incremental.plan import _changed_boxes, cap_side
from pipeline.incremental.select import select_engine
from pipeline.kernel import defaults
from pipeline.kernel.approx_check import (
    CONFIDENCE,
    covered_quantile,
    error_meaning,
    miss_probability,
)
from pipeline.kernel.baselines import make_baselines
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.occlusion import check_windows
from pipeline.models.nets import SeedCNN, SmallResNet
from pipeline.run.settings import worker_compute
from tests.test_incremental import MODELS, Attention, Gated, ResNetish, VGGish, _eval

NETS = {
    "seedcnn": lambda: _eval(SeedCNN(num_classes=3, input_dim=32)),
    "resnet": MODELS["resnet"],  # residual adds, strided stem, max pool, GAP head
    "vgg": MODELS["vgg"],  # conv stack with max/avg pools, flatten + MLP head
    # the network of benchmarks/approx_quality.py: BatchNorm, strided residual blocks, GAP head
    "smallresnet": lambda: _eval(SmallResNet(num_classes=3)),
}
IDS = ["cat-7", "dog-2", "owl-5"]


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(model, x, engine, tau=1.0, checks=4, k=1, baseline="blur", **kw):
    opts = ComputeOptions(
        engine=engine, approx_threshold=tau, approx_check_windows=checks, max_batch=37
    )
    return attribute(
        model,
        x,
        window=[8, 8],
        stride=[4, 4],
        baseline=baseline,
        n_baselines=k,
        image_ids=kw.pop("ids", IDS[: x.shape[0]]),
        seed=kw.pop("seed", 0),
        options=opts,
        **kw,
    )


@pytest.mark.parametrize("name", sorted(NETS))
def test_tau_one_is_the_exact_engine(name):
    model, x = NETS[name](), _images()
    approx = _run(model, x, "approximate", tau=1.0, k=2, baseline="random-pixel")
    exact = _run(model, x, "incremental", k=2, baseline="random-pixel")
    assert exact.approx_error is None
    torch.testing.assert_close(approx.delta, exact.delta, atol=1e-5, rtol=0)
    torch.testing.assert_close(approx.delta_std, exact.delta_std, atol=1e-5, rtol=0)
    assert approx.approx_error is not None and approx.approx_error.shape == (3,)
    assert float(approx.approx_error.max()) < 1e-5


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("tau", [0.5, 0.25])
def test_reported_error_equals_the_exact_engine_on_the_check_windows(name, tau):
    model, x = NETS[name](), _images()
    approx = _run(model, x, "approximate", tau=tau, seed=5)
    exact = _run(model, x, "incremental", seed=5)
    grid = approx.grid
    wins = check_windows(grid.n_windows, 4, IDS, seed=5)  # (N, 4)
    assert wins.shape == (3, 4)
    diff = (approx.delta - exact.delta).flatten(2).abs()  # (N, T, P)
    at_checks = diff.gather(2, wins[:, None, :].expand(-1, diff.shape[1], -1))
    expected = at_checks.flatten(1).amax(dim=1)  # (N,)
    assert approx.approx_error is not None and torch.isfinite(approx.approx_error).all()
    torch.testing.assert_close(approx.approx_error, expected, atol=1e-5, rtol=0)
    assert float(expected.max()) > 1e-4  # thresholding does change these maps
    # a sample of the windows: never more than the error over all of them
    assert (approx.approx_error <= diff.flatten(1).amax(dim=1) + 1e-6).all()


def test_error_covers_every_draw_and_follows_the_image_not_the_batch():
    model, x = NETS["resnet"](), _images()
    kw = dict(tau=0.3, k=3, baseline="random-pixel", seed=1)
    approx = _run(model, x, "approximate", **kw)
    exact = _run(model, x, "incremental", k=3, baseline="random-pixel", seed=1)
    wins = check_windows(approx.grid.n_windows, 4, IDS, seed=1)
    mean_diff = (approx.delta - exact.delta).flatten(2).abs()[:, 0].gather(1, wins)  # (N, 4)
    # the error is the largest over the draws, so at least the error of their mean
    assert (approx.approx_error >= mean_diff.amax(dim=1) - 1e-5).all()
    alone = _run(model, x[1:2], "approximate", ids=IDS[1:2], **kw)
    torch.testing.assert_close(alone.approx_error, approx.approx_error[1:2], atol=1e-5, rtol=0)
    # with fixed batches (as workers compute: the check's passes are padded too)
    fixed = ComputeOptions(
        engine="approximate", approx_threshold=0.3, fixed_batch=True, approx_check_windows=4
    )
    both, one = (
        attribute(model, x[i], window=[8, 8], stride=[4, 4], n_baselines=3, seed=1,
                  image_ids=[IDS[j] for j in range(3)][i], options=fixed)
        for i in (slice(0, 3), slice(1, 2))
    )  # fmt: skip
    assert torch.equal(both.approx_error[1:2], one.approx_error)  # check passes of one size
    torch.testing.assert_close(both.approx_error, approx.approx_error, atol=1e-5, rtol=0)


def test_error_is_the_largest_error_of_every_draw_on_the_check_windows():
    """K random-pixel draws: ``approx_error`` is the largest per-draw error on the check windows,
    each draw recomputed on its own as a constant fill by both engines."""
    model, x, k, seed, checks = NETS["resnet"](), _images(), 3, 1, 9
    draws = dict(k=k, baseline="random-pixel", seed=seed)
    approx = _run(model, x, "approximate", tau=0.3, checks=checks, **draws)
    fills = make_baselines(x, "random-pixel", k, seed=seed, image_ids=IDS)  # (N, K, C, 1, 1)
    per_draw = []
    for j in range(k):
        fill = fills[:, j].expand_as(x)  # (N, C, H, W): draw j's colour everywhere
        a = _run(model, x, "approximate", tau=0.3, baseline=fill, checks=0)
        e = _run(model, x, "incremental", baseline=fill)
        per_draw.append((a.delta - e.delta).flatten(1).abs())  # (N, P), one target
    errors = torch.stack(per_draw).amax(dim=0)  # (N, P): each window's error over the draws
    wins = check_windows(approx.grid.n_windows, checks, IDS, seed)  # (N, 9)
    at_checks = errors.gather(1, wins)
    assert approx.approx_error is not None
    torch.testing.assert_close(approx.approx_error, at_checks.amax(dim=1), atol=1e-5, rtol=0)
    assert (approx.approx_error[:, None] >= at_checks - 1e-6).all()  # every check window
    assert float(at_checks.min()) > 1e-4  # thresholding changes every one of them
    # the error of the mean map over the draws is never more than the per-draw maximum
    exact_mean = _run(model, x, "incremental", **draws).delta
    mean_err = (approx.delta - exact_mean).flatten(1).abs().gather(1, wins)  # (N, 9)
    assert (approx.approx_error >= mean_err.amax(dim=1) - 1e-5).all()


def test_default_check_windows_cover_the_stated_quantile_on_every_window_of_a_net():
    """All 121 windows of 40 images enumerated on a small ResNet: with the default check
    windows, ``approx_error`` reaches each image's 90th-percentile window error on at least 90%
    of the images (the statement: >= 95% in expectation), and for every image the chance that
    its draw misses that percentile is at most 0.9^29. The old default of 4 windows did not."""
    n, seed = defaults.APPROX_CHECK_WINDOWS, 3
    model = NETS["resnet"]()
    x = _images(40, size=48, seed=7)
    ids = [f"im-{i:02d}" for i in range(40)]
    kw = dict(window=[8, 8], stride=[4, 4], baseline="blur", image_ids=ids, seed=seed)
    cheap = ComputeOptions(engine="approximate", approx_threshold=0.3)
    approx = attribute(model, x, options=cheap, **kw)
    exact = attribute(model, x, options=ComputeOptions(engine="incremental"), **kw)
    errors = (approx.delta - exact.delta).flatten(1).abs().numpy()  # (40, 121) every window
    assert errors.shape == (40, 121) and approx.approx_error is not None
    q = covered_quantile(n)
    quantile = np.quantile(errors, q, axis=1, method="inverted_cdf")  # (40,)
    assert (quantile > 1e-4).all()  # a real error at the 90th percentile of every image
    stored = approx.approx_error.numpy()
    assert (stored <= errors.max(axis=1) + 1e-6).all()
    assert (stored >= quantile).mean() >= 0.9
    for e, qv in zip(errors, quantile, strict=True):
        below = int((e < qv).sum())
        assert math.comb(below, n) / math.comb(len(e), n) <= miss_probability(n, q) < 1 - CONFIDENCE
    old = np.take_along_axis(errors, check_windows(121, 4, ids, seed).numpy(), axis=1).max(axis=1)
    assert (old >= quantile).mean() < 0.6


def test_check_windows_are_seeded_by_image_and_seed():
    a = check_windows(49, 4, ["x", "y"], seed=0)
    assert torch.equal(a, check_windows(49, 4, ["x", "y"], seed=0))
    assert torch.equal(a[1:], check_windows(49, 4, ["y"], seed=0))  # not by the other images
    assert not torch.equal(a, check_windows(49, 4, ["x", "y"], seed=1))
    assert all(len(set(r.tolist())) == 4 for r in a)  # distinct windows
    assert ((a >= 0) & (a < 49)).all()
    assert torch.equal(check_windows(3, 10, ["x"], 0), torch.tensor([[0, 1, 2]]))  # all of them


def test_no_check_windows_no_error_and_exact_engines_report_none():
    model, x = NETS["seedcnn"](), _images(2)
    assert _run(model, x, "approximate", tau=0.5, checks=0).approx_error is None
    assert _run(model, x, "generic").approx_error is None
    assert _run(model, x, "auto").approx_error is None


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_smaller_tau_recomputes_less(name):
    model = NETS[name]()
    exact = IncrementalEngine.build(model, (3, 64, 64), "cpu")
    assert exact is not None
    engine = ApproximateEngine(exact, 0.4)
    grid = WindowGrid.create((3, 64, 64), [16, 16], [8, 8])
    costs = [engine.cost(grid, tau) for tau in (1.0, 0.8, 0.6, 0.4, 0.2)]
    elements = [c.elements for c in costs]
    macs = [c.conv_macs for c in costs]
    assert elements == sorted(elements, reverse=True) and macs == sorted(macs, reverse=True)
    assert elements[3] < elements[0] and macs[3] < macs[0]
    assert engine.cost(grid) == costs[3]  # the engine's own tau
    assert costs[0].conv_macs < costs[0].full_conv_macs  # exact is already incremental
    assert len({c.full_conv_macs for c in costs}) == 1
    # every changed box but the window's has sides of at most floor(tau * side)
    boxes = _changed_boxes(exact.traced.steps, grid, 0.4)
    for st in exact.traced.steps[1:]:
        b = boxes[st.name]
        assert int((b[:, 1] - b[:, 0]).max()) <= cap_side(0.4, st.shape[1]), st.name
        assert int((b[:, 3] - b[:, 2]).max()) <= cap_side(0.4, st.shape[2]), st.name


def test_unsupported_model_is_a_clear_error():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"'approximate'.*incremental inference.*flatten"):
        attribute(Attention(), x, window=[4, 4], options=ComputeOptions(engine="approximate"))
    engine, reason = ApproximateEngine.build_or_reason(Attention(), (3, 16, 16), "cpu", 0.5)
    assert engine is None and "flatten" in reason
    # a gate is frozen (tests/test_approximate_gates.py), not refused
    assert ApproximateEngine.build_or_reason(Gated(), (3, 16, 16), "cpu", 0.5)[0] is not None


@pytest.mark.parametrize("tau", [0, -0.1, 1.5, math.nan, "half", True])
def test_invalid_threshold_names_the_setting(tau):
    with pytest.raises(ValueError, match="approx_threshold"):
        ComputeOptions(engine="approximate", approx_threshold=tau)
    model = NETS["seedcnn"]()
    with pytest.raises(ValueError, match="approx_threshold"):
        select_engine(Engine.APPROXIMATE, model, (3, 32, 32), "cpu", tau)
    exact = IncrementalEngine.build(model, (3, 32, 32), "cpu")
    assert exact is not None
    with pytest.raises(ValueError, match="approx_threshold"):
        ApproximateEngine(exact, tau)


@pytest.mark.parametrize("checks", [-1, 1.5, True])
def test_invalid_check_windows_names_the_setting(checks):
    with pytest.raises(ValueError, match="approx_check_windows"):
        ComputeOptions(approx_check_windows=checks)


def test_resolve_and_worker_compute_build_the_approximate_engine():
    model = NETS["resnet"]()
    engine, note = select_engine("approximate", model, (3, 32, 32), "cpu", 0.4)
    assert isinstance(engine, ApproximateEngine) and engine.approx_threshold == 0.4
    assert note == "approximate: projective fields capped at tau=0.4"
    occ = OcclusionConfig(window=(8, 8), stride=(4, 4), engine="approximate")
    wc = worker_compute(replace(occ, approx_threshold=0.6), model, (3, 32, 32), "cpu")
    assert wc.engine_name == "approximate" and "tau=0.6" in wc.engine_note
    assert isinstance(wc.options.engine, ApproximateEngine)
    assert wc.options.engine.approx_threshold == wc.options.approx_threshold == 0.6
    assert wc.options.approx_check_windows == defaults.APPROX_CHECK_WINDOWS
    # run.json's engine notes say what the stored number means
    assert error_meaning(defaults.APPROX_CHECK_WINDOWS) in wc.engine_note
    assert "90th percentile" in wc.engine_note
    x = _images(2)
    r = attribute(model, x, window=[8, 8], stride=[4, 4], image_ids=IDS[:2], options=wc.options)
    assert r.approx_error is not None and r.approx_error.shape == (2,)
    assert torch.isfinite(r.approx_error).all()


def test_deeper_vgg_and_resnet_at_larger_images():
    """A larger image, where projective fields actually grow past tau of the maps."""
    for model in (_eval(VGGish()), _eval(ResNetish())):
        x = _images(1, size=64, seed=3)
        r = _run(model, x, "approximate", tau=0.3, checks=6, ids=["big"])
        exact = _run(model, x, "incremental", ids=["big"])
        wins = check_windows(r.grid.n_windows, 6, ["big"], 0)
        diff = (r.delta - exact.delta).flatten(2).abs()[:, 0].gather(1, wins)
        torch.testing.assert_close(r.approx_error, diff.amax(dim=1), atol=1e-5, rtol=0)


def _dense_thresholded(engine: IncrementalEngine, plan, x, fill, win) -> torch.Tensor:
    """Outputs of occluded copies by full passes in which every trunk node keeps its occluded
    value only inside the plan's region for that window and its unoccluded value elsewhere:
    what thresholding means, computed without crops, merges or head updates."""
    t = engine.traced
    steps = {st.name for st in t.steps}
    nodes = [n for n in t.gm.graph.nodes if n.op != "output" and n.name not in t.consts]
    output = next(n for n in t.gm.graph.nodes if n.op == "output")

    def run(image: torch.Tensor, clean: dict | None, p: int = 0) -> dict:
        env: dict = dict(t.consts)
        for node in nodes:
            value = image if node.op == "placeholder" else run_node(node, env, t.modules, t.gm)
            if clean is not None and node.name in steps:
                (y0, x0), (h, w) = (
                    plan.regions[node.name].origin[p].tolist(),
                    plan.regions[node.name].size,
                )
                keep = torch.zeros_like(value, dtype=torch.bool)
                keep[..., max(y0, 0) : y0 + h, max(x0, 0) : x0 + w] = True
                value = torch.where(keep, value, clean[node.name])
            env[node.name] = value
        return env

    clean = run(x, None)
    outs = []
    for p in win.tolist():
        c0, c1, y0, y1, x0, x1 = plan.boxes[p].tolist()
        occluded = x.clone()
        occluded[:, c0:c1, y0:y1, x0:x1] = fill
        outs.append(run(occluded, clean, p)[output.args[0].name])
    return torch.cat(outs)


@pytest.mark.parametrize("name", sorted(NETS))
def test_thresholded_execution_equals_dense_passes_with_the_same_regions(name):
    """Crops, merges at partly contained regions and head updates compute exactly what
    thresholding defines, given the plan's regions (the plan's caps are tested above)."""
    model = NETS[name]()
    exact = IncrementalEngine.build(model, (3, 32, 32), "cpu")
    assert exact is not None
    grid = WindowGrid.create((3, 32, 32), [8, 8], [4, 4])
    x = _images(1, seed=4)
    fill = torch.full((1, 1, 3, 1, 1), 0.5)
    win = torch.arange(0, grid.n_windows, 5)
    zeros = torch.zeros_like(win)
    with torch.inference_mode():
        for tau in (0.5, 0.3):
            got = exact.forward_occluded(x, fill, grid, zeros, zeros, win, tau)
            plan = exact.plan(grid, torch.device("cpu"), tau)
            ref = _dense_thresholded(exact, plan, x, 0.5, win)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            full = exact.forward_occluded(x, fill, grid, zeros, zeros, win)
            assert float((full - ref).abs().max()) > 1e-3  # thresholding changed the outputs


def test_a_run_stores_each_images_error_whatever_its_shard(tmp_path):
    """``occlusion.engine: approximate`` in a config: an image's stored ``approx_error`` is the
    same bit for bit whatever shard, shard size or shard order computed it (its check windows
    follow the image), and equals the largest difference on its check windows between the
    stored approximate and exact maps; exact engines store null; bad values name their key."""
    from pipeline import load_config
    from pipeline.config import ConfigError
    from pipeline.data.detect import open_source
    from pipeline.models import load_model
    from pipeline.run.shard import process_shard
    from tests._dataset import audit_config, image_set_with_model

    root = image_set_with_model(tmp_path / "data", n=6)
    checks = 7  # of the 5 x 5 windows of a 24 px image: a sample, not all of them

    def stored(engine: str, size: int, reverse: bool = False) -> dict[str, tuple]:
        occlusion = {"engine": engine, "approx_threshold": 0.3, "approx_check_windows": checks}
        occlusion |= {"baseline": "blur", "n_baselines": 1}  # one draw: maps are per copy
        cfg = load_config(audit_config(root, tmp_path / engine, occlusion=occlusion))
        model = load_model(cfg.model, cfg.dataset.normalize, torch.device("cpu"))
        compute = worker_compute(cfg.occlusion, model, (3, *cfg.dataset.image_size), "cpu")
        source = open_source(cfg.dataset)
        refs = source.shards(size)
        out = {}
        for i, ref in enumerate(refs[::-1] if reverse else refs):
            t = process_shard(model, source.read(ref), cfg, i, compute.options).to_pydict()
            for j, image_id in enumerate(t["image_id"]):
                out[image_id] = (t["approx_error"][j], torch.tensor(t["delta"][j]))
        return out

    whole = stored("approximate", 6)
    ids = sorted(whole)
    got = torch.tensor([whole[i][0] for i in ids])
    for size, reverse in ((1, True), (4, False)):
        other = stored("approximate", size, reverse)
        # the same windows; the values to float rounding (the incremental engine's own maps
        # move by ~1e-8 with the shard's other images)
        again = torch.tensor([other[i][0] for i in ids])
        torch.testing.assert_close(again, got, atol=1e-7, rtol=1e-3)
    exact = stored("incremental", 6)
    assert [e for e, _ in exact.values()] == [None] * 6
    diff = torch.stack([(whole[i][1] - exact[i][1]).abs() for i in ids])  # (6, 25)
    wins = check_windows(diff.shape[1], checks, ids, seed=0)  # (6, 7)
    expected = diff.gather(1, wins).amax(dim=1)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-3)
    assert float(expected.min()) > 1e-5  # thresholding changed every image's checked windows
    # a sample: some image's largest error lies outside its check windows
    assert bool((expected < diff.amax(dim=1) * 0.99).any())
    for key, bad in (("approx_threshold", 1.5), ("approx_check_windows", -1)):
        with pytest.raises(ConfigError, match=rf"occlusion\.{key}"):
            load_config(audit_config(root, tmp_path / "x", occlusion={key: bad}))
