"""Invariants of the occlusion kernel: coverage, batching, order, expansion, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline import attribute, expand_map
from pipeline.config import OcclusionConfig
from pipeline.kernel.baselines import make_baselines
from pipeline.kernel.forward import OccludedBatch
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.options import ComputeOptions, default_max_batch
from pipeline.kernel.passes import pass_rows, pass_spans
from pipeline.models.nets import SeedCNN
from pipeline.run.settings import occlusion_keywords, worker_compute
from tests._models import tiny_convnet

PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometries(draw):
    h = draw(st.integers(2, 20))
    w = draw(st.integers(2, 20))
    wh = draw(st.integers(1, h))
    ww = draw(st.integers(1, w))
    sh = draw(st.integers(1, wh))
    sw = draw(st.integers(1, ww))
    return (3, h, w), (wh, ww), (sh, sw)


@PROPS
@given(geometries())
def test_every_pixel_is_covered_and_counts_follow_the_formula(geo):
    image, window, stride = geo
    grid = WindowGrid.create(image, window, stride)
    masks = grid.masks()
    assert masks.any(dim=0).all()
    for axis in (1, 2):
        d, wv, sv = image[axis], window[axis - 1], stride[axis - 1]
        assert grid.counts[axis] == math.ceil((d - wv) / sv) + 1
        assert grid.spans(axis)[-1][1] == d  # the last window reaches the edge (clipped)


@PROPS
@given(
    geometries(), st.integers(1, 40), st.sampled_from(["random-pixel", "random-channel", "zero"])
)
def test_independent_of_max_batch(geo, max_batch, kind):
    image, window, stride = geo
    x = torch.rand(3, *image, generator=torch.Generator().manual_seed(0))
    model = tiny_convnet()
    k = 1 if kind == "zero" else 2
    kw = dict(window=window, stride=stride, baseline=kind, n_baselines=k, image_ids=["a", "b", "c"])
    small = attribute(model, x, options=ComputeOptions(max_batch=max_batch, engine="generic"), **kw)
    big = attribute(model, x, options=ComputeOptions(max_batch=10_000, engine="generic"), **kw)
    torch.testing.assert_close(small.delta, big.delta, atol=1e-5, rtol=0)
    torch.testing.assert_close(small.delta_std, big.delta_std, atol=1e-5, rtol=0)


@PROPS
@given(
    geometries(),
    st.booleans(),
    st.sampled_from(["random-pixel", "noise", "blur", "mean"]),
    st.integers(1, 9),
)
def test_painted_batches_equal_masked_select_batches(geo, per_channel, kind, pad):
    """The CPU builder (paint each window into a reused buffer) and the CUDA one (one masked
    select over the batch) give bitwise the same occluded copies, padding rows included."""
    image, window, stride = geo
    if per_channel:
        window, stride = (1, *window), (1, *stride)
    x = torch.rand(3, *image, generator=torch.Generator().manual_seed(1))
    grid = WindowGrid.create(image, window, stride)
    fill = make_baselines(
        x, kind, 1 if kind in ("mean", "blur") else 2, seed=0, image_ids=["a", "b", "c"]
    )
    q = torch.arange(x.shape[0] * fill.shape[1] * grid.n_windows)
    q = q[torch.randperm(q.numel(), generator=torch.Generator().manual_seed(2))][:12].sort().values
    per_img = fill.shape[1] * grid.n_windows
    img, draw, win = q // per_img, (q // grid.n_windows) % fill.shape[1], q % grid.n_windows
    rows = q.numel() + pad
    built = []
    for paint in (True, False):
        batch = OccludedBatch(x, grid, rows, channels_last=paint, paint=paint)
        batch.buf.fill_(float("nan"))  # stale contents must never leak into a copy
        out, b = batch.build(x, fill, img, draw, win, pad_to=rows)
        assert b == q.numel() and out.shape == (rows, *image)
        built.append(out.clone())
    assert torch.equal(built[0], built[1])
    # padding repeats the first copy (a model may reject a blank input)
    assert torch.equal(built[0][q.numel() :], built[0][:1].expand(pad, *image))
    masks = grid.masks()
    for j in range(q.numel()):  # each copy: its image outside the window, the fill inside
        m = masks[win[j]].expand_as(x[0])
        assert torch.equal(built[0][j][~m], x[img[j]][~m])
        assert torch.equal(built[0][j][m], fill[img[j], draw[j]].expand_as(x[0])[m])


@PROPS
@given(geometries(), st.permutations(range(4)), st.integers(1, 4))
def test_independent_of_batch_composition_and_order(geo, order, subset):
    image, window, stride = geo
    x = torch.rand(4, *image, generator=torch.Generator().manual_seed(1))
    ids = ["img-0", "img-1", "img-2", "img-3"]
    model = tiny_convnet()
    kw = dict(window=window, stride=stride, baseline="random-pixel", n_baselines=3, seed=5)
    ref = attribute(model, x, image_ids=ids, **kw)
    perm = list(order)
    shuffled = attribute(model, x[perm], image_ids=[ids[i] for i in perm], **kw)
    torch.testing.assert_close(shuffled.delta, ref.delta[perm], atol=1e-5, rtol=0)
    part = perm[:subset]
    alone = attribute(model, x[part], image_ids=[ids[i] for i in part], **kw)
    torch.testing.assert_close(alone.delta, ref.delta[part], atol=1e-5, rtol=0)


@PROPS
@given(geometries(), st.booleans())
def test_expand_map_of_a_stored_row_equals_the_full_map(geo, per_channel):
    image, window, stride = geo
    win = (1, *window) if per_channel else window
    strd = (1, *stride) if per_channel else stride
    x = torch.rand(1, *image, generator=torch.Generator().manual_seed(2))
    r = attribute(tiny_convnet(), x, window=win, stride=strd, baseline=0.5, return_full=True)
    row = {
        "delta": r.delta[0, 0].flatten().numpy().astype(np.float32).tolist(),
        "image_c": image[0],
        "image_h": image[1],
        "image_w": image[2],
        "window": list(r.grid.window),
        "stride": list(r.grid.stride),
    }
    full = r.attributions[0, 0].numpy()
    np.testing.assert_allclose(expand_map(row, channels=True), full, atol=1e-6, rtol=0)
    np.testing.assert_allclose(expand_map(row), full.mean(axis=0), atol=1e-6, rtol=0)


@PROPS
@given(geometries())
def test_inputs_are_not_mutated(geo):
    image, window, stride = geo
    x = torch.rand(2, *image, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    attribute(
        tiny_convnet(),
        x,
        window=window,
        stride=stride,
        baseline="random-pixel",
        image_ids=["p", "q"],
    )
    assert torch.equal(x, before)


def test_hand_computed_linear_model():
    # f(x) = sum(w * x) over a 1x4x4 image; zero baseline; 2x2 windows, stride 2: each pixel is in
    # exactly one window, whose delta is the sum of w*x over that window.
    w = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    x = torch.ones(1, 1, 4, 4)

    def model(t):
        return (t * w).flatten(1).sum(1, keepdim=True)

    r = attribute(
        model, x, window=[2, 2], stride=[2, 2], baseline="zero", task="regression", return_full=True
    )
    expected_grid = torch.tensor(
        [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]
    )
    assert r.delta[0, 0, 0].tolist() == expected_grid.float().tolist()
    assert r.attributions[0, 0, 0, 0, 0].item() == 10.0
    assert r.score.item() == float(w.sum())
    # overlapping windows: pixel (0,0) is covered once, pixel (1,1) by four 2x2 windows at stride 1
    r = attribute(
        model, x, window=[2, 2], stride=[1, 1], baseline="zero", task="regression", return_full=True
    )
    full = r.attributions[0, 0, 0]
    assert full[0, 0].item() == r.delta[0, 0, 0, 0, 0].item()
    assert full[1, 1].item() == pytest.approx(r.delta[0, 0, 0, :2, :2].mean().item())


def test_delta_std_is_zero_for_one_draw_and_positive_for_random_draws():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    one = attribute(
        tiny_convnet(),
        x,
        window=[4, 4],
        stride=[4, 4],
        baseline="random-pixel",
        n_baselines=1,
        image_ids=["a", "b"],
    )
    assert torch.count_nonzero(one.delta_std) == 0
    many = attribute(
        tiny_convnet(),
        x,
        window=[4, 4],
        stride=[4, 4],
        baseline="random-pixel",
        n_baselines=4,
        image_ids=["a", "b"],
    )
    assert (many.delta_std > 0).any()


@pytest.mark.parametrize(
    "window,stride,match",
    [
        ([20, 4], [2, 2], "larger than the image"),
        ([4, 4], [0, 2], "stride must be positive"),
        ([4, 4], [-1, 2], "stride must be positive"),
        ([4, 4], [5, 2], "larger than the window"),
        ([4], [2], r"\[h, w\] or \[c, h, w\]"),
    ],
)
def test_geometry_errors_are_clear(window, stride, match):
    with pytest.raises(ValueError, match=match):
        attribute(tiny_convnet(), torch.rand(1, 3, 16, 16), window=window, stride=stride)


def test_model_output_with_wrong_batch_size_is_an_error():
    def broken(t):
        return t.flatten(1)[:1, :3]

    with pytest.raises(ValueError, match="first dimension must follow the input batch"):
        attribute(broken, torch.rand(2, 3, 8, 8), window=[4, 4], stride=[4, 4], baseline=0.0)


def test_nonfinite_scores_raise_naming_the_image_or_give_nan_maps():
    def model(t):
        out = t.flatten(1).sum(1, keepdim=True)
        # an image whose top-left pixel is exactly 0.25 breaks the model
        return torch.where(t[:, :1, 0, 0] == 0.25, torch.full_like(out, float("nan")), out)

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    x[1, :, 0, 0] = 0.25
    with pytest.raises(ValueError, match=r"NaN/Inf unoccluded scores for image\(s\) \['b'\]"):
        attribute(
            model,
            x,
            window=[4, 4],
            stride=[4, 4],
            baseline=0.0,
            task="regression",
            image_ids=["a", "b", "c"],
        )
    r = attribute(
        model,
        x,
        window=[4, 4],
        stride=[4, 4],
        baseline=0.0,
        task="regression",
        image_ids=["a", "b", "c"],
        options=ComputeOptions(on_nonfinite="nan"),
    )
    assert r.finite.tolist() == [True, False, True]
    assert torch.isnan(r.delta[1]).all() and torch.isfinite(r.delta[[0, 2]]).all()


def test_deterministic_baselines_refuse_several_draws():
    with pytest.raises(ValueError, match="n_baselines must be 1"):
        attribute(
            tiny_convnet(), torch.rand(1, 3, 8, 8), window=[4, 4], baseline="zero", n_baselines=3
        )


def test_max_batch_defaults_by_device_and_engine():
    assert default_max_batch("cpu") == 32  # full forward passes on CPU
    assert default_max_batch("cpu", engine=object()) == 256
    assert default_max_batch("cuda") == 256
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    kw = dict(window=[4, 4], stride=[2, 2], n_baselines=2)
    # padded to 32 rows per pass: bitwise what an explicit max_batch=32 gives, not 256's
    fixed = ComputeOptions(fixed_batch=True, engine="generic")
    default = attribute(tiny_convnet(), x, options=fixed, **kw)
    explicit = ComputeOptions(fixed_batch=True, engine="generic", max_batch=32)
    assert torch.equal(default.delta, attribute(tiny_convnet(), x, options=explicit, **kw).delta)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        ComputeOptions(max_batch=0)


def test_channels_last_auto_follows_what_the_model_accepts():
    """``channels_last: None`` (the default) runs full passes channels-last only for a model
    that takes it and computes the same scores; a model that calls ``.view()`` on a conv output
    keeps the plain layout, and both give the maps of an explicit choice."""
    from torch import nn

    from pipeline.kernel.forward import accepts_channels_last
    from pipeline.models.nets import SeedCNN

    class ViewHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 16 * 16, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.shape[0], -1))

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    kw = dict(window=[4, 4], stride=[4, 4], n_baselines=1, baseline="zero")
    for model, accepts in (
        (SeedCNN(num_classes=2, input_dim=16).eval(), True),
        (ViewHead(), False),
    ):
        assert accepts_channels_last(model, (3, 16, 16), torch.device("cpu")) is accepts
        auto = attribute(model, x, options=ComputeOptions(engine="generic"), **kw)
        fixed = attribute(
            model, x, options=ComputeOptions(engine="generic", channels_last=accepts), **kw
        )
        assert torch.equal(auto.delta, fixed.delta)


class RowCounter(nn.Module):
    """``tiny_convnet`` that records the rows of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_convnet()
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(int(x.shape[0]))
        return self.net(x)


def _occluded_rows(n: int, side: int, max_batch: int, fixed: bool = True) -> list[int]:
    """Rows of each occluded pass of ``n`` images of ``side`` px, 4 px windows at stride 2
    (``((side - 4) / 2 + 1)^2`` copies per image, one draw)."""
    model = RowCounter()
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
    opts = ComputeOptions(
        engine="generic", max_batch=max_batch, fixed_batch=fixed, channels_last=False
    )
    attribute(model, x, window=[4, 4], stride=[2, 2], baseline="zero", options=opts)
    plain = -(-n // 16) if fixed else -(-n // max_batch)  # the unoccluded passes come first
    return model.rows[plain:]


def test_occluded_passes_fit_the_copies_per_image():
    """Fixed passes have ``pass_rows(c, max_batch)`` rows, whatever the number of images."""
    # 169 copies, max_batch 256: one pass of 169 rows per image, never 256
    assert _occluded_rows(1, 28, 256) == [169]
    assert _occluded_rows(2, 28, 256) == [169, 169]
    # 169 copies, max_batch 64: three passes of 57 per image (57 + 57 + 55, the last padded)
    assert _occluded_rows(1, 28, 64) == [57] * 3
    assert _occluded_rows(2, 28, 64) == [57] * 6
    # 25 copies, max_batch 64: two whole images per pass; only the call's last pass is padded
    assert _occluded_rows(5, 12, 64) == [50, 50, 50]
    assert _occluded_rows(4, 12, 64) == [50, 50]
    assert _occluded_rows(1, 12, 64) == [50]
    # without fixed passes: max_batch copies at a time across images, nothing padded
    assert _occluded_rows(5, 12, 64, fixed=False) == [64, 61]
    assert _occluded_rows(1, 28, 256, fixed=False) == [169]


@given(st.integers(0, 6), st.integers(1, 400), st.integers(1, 300), st.booleans())
def test_pass_spans_cover_the_copies_in_passes_of_one_size(n, copies, max_batch, fixed):
    spans = pass_spans(n, copies, max_batch, fixed)
    assert [q for a, b in spans for q in range(a, b)] == list(range(n * copies))
    assert all(0 < b - a <= max_batch for a, b in spans)
    if not fixed:
        return
    rows = pass_rows(copies, max_batch)
    assert max_batch / 2 < rows <= max_batch
    assert all(b - a <= rows for a, b in spans)
    if copies >= max_batch:  # an image's passes hold its copies alone, split the same way
        assert rows == -(-copies // -(-copies // max_batch))
        alone = pass_spans(1, copies, max_batch, fixed)
        for i in range(n):
            own = [(a - i * copies, b - i * copies) for a, b in spans if a // copies == i]
            assert own == alone
    else:  # whole images, every pass full but the last
        assert rows == (max_batch // copies) * copies
        assert all(b - a == rows for a, b in spans[:-1])
        assert all(a % copies == 0 for a, _ in spans)


def _worker_maps(engine: str, x: torch.Tensor, ids: list[str], groups: list[int], **occ):
    """Maps of ``x`` attributed in consecutive calls of ``groups`` images each, with the
    options a worker builds (fixed passes), concatenated."""
    cfg = OcclusionConfig(engine=engine, **occ)
    torch.manual_seed(0)
    model = SeedCNN(num_classes=3, input_dim=x.shape[-1]).eval()
    wc = worker_compute(cfg, model, tuple(x.shape[1:]), torch.device("cpu"))
    assert wc.options.fixed_batch
    parts, i = [], 0
    for g in groups:
        kw = occlusion_keywords(cfg)
        parts.append(
            attribute(wc.model, x[i : i + g], image_ids=ids[i : i + g], options=wc.options, **kw)
        )
        i += g
    fields = ["delta", "delta_std", "score"] + ["approx_error"] * (engine == "approximate")
    return [torch.cat([getattr(r, f) for r in parts]) for f in fields]


@pytest.mark.parametrize("engine", ["generic", "incremental", "approximate"])
@pytest.mark.parametrize(
    "max_batch", [64, 256]
)  # 75 copies per image: 2 passes, or 3 images a pass
def test_maps_are_bitwise_the_same_in_any_grouping_of_images(engine, max_batch):
    """Worker settings: a map (and an approximate map's measured error) does not depend on
    which images share its call, whether the copies per image are fewer than max_batch (several
    images a pass) or not."""
    x = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    ids = [f"img-{i}" for i in range(6)]
    occ = dict(window=(8, 8), stride=(4, 4), baseline="random-pixel", n_baselines=3, seed=2,
               max_batch=max_batch, approx_threshold=0.5, approx_check_windows=4)  # fmt: skip
    together = _worker_maps(engine, x, ids, [6], **occ)
    for groups in ([1] * 6, [2, 4], [5, 1], [3, 3]):
        got = _worker_maps(engine, x, ids, groups, **occ)
        for a, b in zip(got, together, strict=True):
            assert torch.equal(a, b), groups
