"""The approximate engine (projective-field thresholding): exact at tau=1, cheaper below, and an
error it measures itself that equals the exact engine's maps computed independently."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipeline import ComputeOptions, Engine, attribute
from pipeline.config import OcclusionConfig
from pipeline.incremental import ApproximateEngine, IncrementalEngine
from pipeline.incremental.ops import run_node
from pipeline.incremental.plan import _changed_boxes, cap_side
from pipeline.incremental.select import select_engine
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.occlusion import check_windows
from pipeline.models.nets import SeedCNN
from pipeline.run.settings import worker_compute
from tests.test_incremental import MODELS, Gated, ResNetish, VGGish, _eval

NETS = {
    "seedcnn": lambda: _eval(SeedCNN(num_classes=3, input_dim=32)),
    "resnet": MODELS["resnet"],  # residual adds, strided stem, max pool, GAP head
    "vgg": MODELS["vgg"],  # conv stack with max/avg pools, flatten + MLP head
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
    fixed = ComputeOptions(engine="approximate", approx_threshold=0.3, fixed_batch=True)
    both, one = (
        attribute(model, x[i], window=[8, 8], stride=[4, 4], n_baselines=3, seed=1,
                  image_ids=[IDS[j] for j in range(3)][i], options=fixed)
        for i in (slice(0, 3), slice(1, 2))
    )  # fmt: skip
    torch.testing.assert_close(both.approx_error[1:2], one.approx_error, atol=1e-6, rtol=0)
    torch.testing.assert_close(both.approx_error, approx.approx_error, atol=1e-5, rtol=0)


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
    with pytest.raises(ValueError, match=r"'approximate'.*incremental inference.*whole image"):
        attribute(Gated(), x, window=[4, 4], options=ComputeOptions(engine="approximate"))
    engine, reason = ApproximateEngine.build_or_reason(Gated(), (3, 16, 16), "cpu", 0.5)
    assert engine is None and "whole image" in reason


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
    assert isinstance(engine, ApproximateEngine) and engine.threshold == 0.4
    assert note == "approximate: projective fields capped at tau=0.4"
    occ = OcclusionConfig(window=(8, 8), stride=(4, 4), engine="approximate")
    wc = worker_compute(replace(occ, approx_threshold=0.6), model, (3, 32, 32), "cpu")
    assert wc.engine_name == "approximate" and "tau=0.6" in wc.engine_note
    assert isinstance(wc.options.engine, ApproximateEngine)
    assert wc.options.engine.threshold == wc.options.approx_threshold == 0.6
    assert wc.options.approx_check_windows == 4
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


def test_a_run_stores_each_images_measured_error(tmp_path):
    """``occlusion.engine: approximate`` in a config: the shard table stores the per-image error
    the engine measured (null for an exact engine), and a bad threshold names its key."""
    from pipeline import load_config
    from pipeline.config import ConfigError
    from pipeline.data.detect import open_source
    from pipeline.models import load_model
    from pipeline.run.shard import process_shard
    from tests._dataset import audit_config, image_set_with_model

    root = image_set_with_model(tmp_path / "data", n=4)
    errors = {}
    for engine in ("approximate", "incremental"):
        occlusion = {"engine": engine, "approx_threshold": 0.5, "approx_check_windows": 3}
        cfg = load_config(audit_config(root, tmp_path / engine, occlusion=occlusion))
        model = load_model(cfg.model, cfg.dataset.normalize, torch.device("cpu"))
        compute = worker_compute(cfg.occlusion, model, (3, *cfg.dataset.image_size), "cpu")
        source = open_source(cfg.dataset)
        (ref,) = source.shards(10)
        table = process_shard(model, source.read(ref), cfg, 0, compute.options)
        errors[engine] = table.column("approx_error").to_pylist()
    assert all(e is not None and e >= 0 for e in errors["approximate"])
    assert errors["incremental"] == [None] * 4
    with pytest.raises(ConfigError, match=r"occlusion\.approx_threshold"):
        load_config(audit_config(root, tmp_path / "x", occlusion={"approx_threshold": 1.5}))
