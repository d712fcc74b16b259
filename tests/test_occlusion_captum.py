"""`attribute` against Captum's own `Occlusion`, case by case (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion

from pipeline import ComputeOptions, attribute
from pipeline.kernel.baselines import make_baselines
from tests._models import ScalarRegressor, tiny_convnet

ATOL = 1e-5


def _captum(model, x, window, stride, baseline, target):
    occ = Occlusion(model)
    return occ.attribute(
        x,
        sliding_window_shapes=tuple(window),
        strides=tuple(stride),
        baselines=baseline,
        target=target,
    )


# (name, image shape (N, C, H, W), window [c,h,w], stride [c,h,w], baseline, target)
CASES = [
    ("square-divides", (2, 3, 16, 16), (3, 4, 4), (3, 2, 2), 0.0, 1),
    ("square-no-divide", (2, 3, 17, 17), (3, 5, 5), (3, 3, 3), 0.5, 0),
    ("non-square", (2, 3, 16, 24), (3, 6, 4), (3, 3, 4), 0.25, 2),
    ("non-square-clipped-both", (1, 3, 19, 13), (3, 7, 5), (3, 4, 3), 1.0, 1),
    ("per-channel-window", (2, 3, 12, 12), (1, 4, 4), (1, 2, 2), 0.1, 0),
    ("channel-pairs-clipped", (2, 3, 10, 10), (2, 3, 3), (2, 2, 2), 0.7, 2),
    ("per-channel-baseline", (2, 3, 16, 16), (3, 4, 4), (3, 4, 4), "vector", 1),
    ("full-tensor-baseline", (2, 3, 14, 18), (3, 5, 5), (3, 3, 3), "chw", 0),
    ("per-image-tensor-baseline", (3, 3, 12, 12), (3, 4, 6), (3, 2, 3), "nchw", 2),
    ("window-equals-width", (2, 3, 12, 10), (3, 4, 10), (3, 2, 10), 0.0, 1),
    ("several-images-per-image-target", (5, 3, 12, 12), (3, 4, 4), (3, 4, 4), 0.3, [0, 1, 2, 1, 0]),
    ("one-pixel-windows", (1, 3, 6, 6), (3, 1, 1), (3, 1, 1), 0.0, 2),
    ("grayscale", (2, 1, 15, 11), (1, 5, 4), (1, 2, 3), 0.5, 1),
]


def _baseline(spec, shape, gen):
    n, c, h, w = shape
    if spec == "vector":
        return torch.rand(c, generator=gen), None
    if spec == "chw":
        return torch.rand(c, h, w, generator=gen), None
    if spec == "nchw":
        return torch.rand(n, c, h, w, generator=gen), None
    return spec, None


@pytest.mark.parametrize(
    "name,shape,window,stride,baseline,target", CASES, ids=[c[0] for c in CASES]
)
def test_matches_captum(name, shape, window, stride, baseline, target):
    gen = torch.Generator().manual_seed(len(name))
    x = torch.rand(shape, generator=gen)
    model = tiny_convnet(in_channels=shape[1])
    b, _ = _baseline(baseline, shape, gen)
    ours = attribute(
        model,
        x,
        window=window,
        stride=stride,
        baseline=b,
        target=target,
        return_full=True,
        options=ComputeOptions(max_batch=7, engine="generic"),
    )
    captum_b = b.view(1, -1, 1, 1) if baseline == "vector" else b
    if baseline == "chw":
        captum_b = b.unsqueeze(0)
    ref = _captum(model, x, window, stride, captum_b, target)
    assert ours.attributions.shape == (shape[0], 1, *shape[1:])
    torch.testing.assert_close(ours.attributions[:, 0], ref, atol=ATOL, rtol=0)


def test_regression_scalar_output_matches_captum():
    x = torch.rand(3, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    model = ScalarRegressor().eval()
    ours = attribute(
        model, x, window=[4, 4], stride=[3, 3], baseline=0.2, task="regression", return_full=True
    )
    ref = _captum(model, x, (3, 4, 4), (3, 3, 3), 0.2, None)
    torch.testing.assert_close(ours.attributions[:, 0], ref, atol=ATOL, rtol=0)
    assert ours.target.flatten().tolist() == [0, 0, 0]


def test_regression_chosen_output_matches_captum():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    model = tiny_convnet(outputs=4)
    ours = attribute(
        model,
        x,
        window=[3, 3],
        stride=[2, 2],
        baseline=0.0,
        task="regression",
        target=3,
        return_full=True,
    )
    ref = _captum(model, x, (3, 3, 3), (3, 2, 2), 0.0, 3)
    torch.testing.assert_close(ours.attributions[:, 0], ref, atol=ATOL, rtol=0)


def test_several_targets_at_once_match_captum_per_target():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    model = tiny_convnet()
    targets = torch.tensor([[0, 2], [1, 0]])
    ours = attribute(
        model, x, window=[4, 4], stride=[2, 2], baseline=0.1, target=targets, return_full=True
    )
    for t in range(2):
        ref = _captum(model, x, (3, 4, 4), (3, 2, 2), 0.1, targets[:, t].tolist())
        torch.testing.assert_close(ours.attributions[:, t], ref, atol=ATOL, rtol=0)


def test_predicted_target_and_probability_score_match_captum():
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    model = tiny_convnet()
    ours = attribute(
        model, x, window=[4, 4], stride=[2, 2], baseline=0.0, score="probability", return_full=True
    )
    predicted = model(x).argmax(1)
    assert ours.target[:, 0].tolist() == predicted.tolist()
    probs = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    ref = _captum(probs, x, (3, 4, 4), (3, 2, 2), 0.0, predicted.tolist())
    torch.testing.assert_close(ours.attributions[:, 0], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["random-pixel", "random-channel", "noise", "mean", "blur"])
def test_random_and_image_baselines_are_the_mean_of_captum_runs(kind):
    x = torch.rand(3, 3, 14, 14, generator=torch.Generator().manual_seed(5))
    ids = ["a", "b", "c"]
    model = tiny_convnet()
    k = 3 if kind in ("random-pixel", "random-channel", "noise") else 1
    ours = attribute(
        model,
        x,
        window=[4, 4],
        stride=[3, 3],
        baseline=kind,
        n_baselines=k,
        seed=11,
        image_ids=ids,
        target=1,
        return_full=True,
    )
    draws = make_baselines(x, kind, k, seed=11, image_ids=ids)  # (N, K, C, 1|H, 1|W)
    runs = [
        _captum(model, x, (3, 4, 4), (3, 3, 3), draws[:, j].expand_as(x).contiguous(), 1)
        for j in range(k)
    ]
    torch.testing.assert_close(
        ours.attributions[:, 0], torch.stack(runs).mean(0), atol=ATOL, rtol=0
    )
