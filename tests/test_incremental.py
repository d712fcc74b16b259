"""Incremental inference equals full forward passes (the generic kernel), model by model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline import ComputeOptions, attribute
from pipeline.incremental.engine import IncrementalEngine, auto_engine
from pipeline.kernel.geometry import WindowGrid
from pipeline.models.loading import Normalized
from pipeline.models.nets import SeedCNN, SeedCNNWithGAP
from tests._models import ScalarRegressor, tiny_convnet

ATOL = 1e-4


def _eval(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic variance-preserving weights (so that occlusion moves the outputs by much
    more than the tolerance), random BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


class VGGish(nn.Module):
    """VGG-style: conv blocks with max/avg pooling, dilation and groups, an MLP head."""

    def __init__(self, outputs: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.AvgPool2d(3, stride=2, padding=1),
            nn.Conv2d(16, 16, (3, 1), padding=(1, 0)),
            nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d((4, 4)),  # 8x8 -> 4x4: an even 2x2 average pool
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Block(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, a strided 1x1 shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetish(nn.Module):
    """Strided stem, max pool, residual blocks (one strided), global average pool, Linear."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.pool(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SpatialMax(nn.Module):
    """A dense conv map reduced by a global max (a head the engine splices, not updates)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).amax(dim=(2, 3))


class ViewHead(nn.Module):
    """Strided conv, then ``x.view(x.size(0), -1)`` into a Linear (a flatten written as a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


MODELS = {
    "seedcnn": lambda: _eval(SeedCNN(num_classes=3, input_dim=32)),
    "seedcnn-gap": lambda: _eval(SeedCNNWithGAP(num_classes=2)),
    "vgg": lambda: _eval(VGGish()),
    "resnet": lambda: _eval(ResNetish()),
    "normalized": lambda: _eval(Normalized(SeedCNN(2, 32), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])),
    "spatial-max": lambda: _eval(SpatialMax()),
    "view-head": lambda: _eval(ViewHead()),
}

# (window, stride, baseline, draws): borders clipped or not, overlapping or not, per-channel
SETTINGS = [
    ([8, 8], [4, 4], "random-pixel", 3),
    ([7, 5], [3, 4], "blur", 1),
    ([8, 8], [8, 8], "blur", 1),
    ([5, 5], [5, 5], "noise", 3),
    ([12, 3], [6, 3], "mean", 1),
    ([1, 6, 6], [1, 4, 4], "random-channel", 2),
    ([32, 32], [32, 32], "zero", 1),
]


def _maps(model, x, engine, window, stride, baseline, k, **kw):
    return attribute(
        model,
        x,
        window=window,
        stride=stride,
        baseline=baseline,
        n_baselines=k,
        target="predicted",
        # batches of 37 mix windows, draws and images
        options=ComputeOptions(max_batch=37, engine=engine or "generic"),
        **kw,
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_the_generic_kernel(name):
    model = MODELS[name]()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    engine, reason = auto_engine(model, x.shape[1:], x.device)
    assert engine is not None, reason
    for window, stride, baseline, k in SETTINGS:
        ref = _maps(model, x, None, window, stride, baseline, k)
        inc = _maps(model, x, engine, window, stride, baseline, k)
        assert ref.delta.abs().max() > 1e-3  # the maps are not trivially zero
        torch.testing.assert_close(inc.delta, ref.delta, atol=ATOL, rtol=0)
        torch.testing.assert_close(inc.delta_std, ref.delta_std, atol=ATOL, rtol=0)


def test_raw_outputs_equal_the_model_on_occluded_copies():
    model = ScalarRegressor()  # (B,) outputs; AdaptiveAvgPool2d(2) on 9x9 is spliced
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    engine = IncrementalEngine.build(model, (3, 9, 9), "cpu")
    assert engine is not None
    grid = WindowGrid.create((3, 9, 9), [4, 4], [3, 3])
    fill = torch.rand(2, 2, 3, 9, 9)
    q = torch.arange(2 * 2 * grid.n_windows)
    img, draw, win = q // (2 * grid.n_windows), (q // grid.n_windows) % 2, q % grid.n_windows
    copies = torch.where(grid.masks()[win], fill[img, draw], x[img])
    with torch.inference_mode():
        got = engine.forward_occluded(x, fill, grid, img, draw, win)
        torch.testing.assert_close(got, model(copies), atol=1e-5, rtol=0)


def test_cache_follows_the_images():
    model = MODELS["seedcnn"]()
    engine = IncrementalEngine.build(model, (3, 32, 32), "cpu")
    kw = dict(window=[8, 8], stride=[8, 8], baseline="zero", k=1)
    for seed in range(2):  # new tensors, possibly at a recycled address
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        ref = _maps(model, x, None, **kw)
        torch.testing.assert_close(
            _maps(model, x, engine, **kw).delta, ref.delta, atol=ATOL, rtol=0
        )
    x.mul_(0.5)  # changed in place
    ref = _maps(model, x, None, **kw)
    torch.testing.assert_close(_maps(model, x, engine, **kw).delta, ref.delta, atol=ATOL, rtol=0)
    engine.clear()


def test_other_image_size_is_an_error():
    engine = IncrementalEngine.build(MODELS["seedcnn-gap"](), (3, 16, 16), "cpu")
    with pytest.raises(ValueError, match="built for images of shape"):
        attribute(
            MODELS["seedcnn-gap"](),
            torch.rand(1, 3, 20, 20),
            window=[4, 4],
            options=ComputeOptions(engine=engine),
        )


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, tokens, 8)
        return self.fc(self.attn(t, t, t)[0].mean(1))


class Gated(nn.Module):
    """Squeeze-excitation: a gate computed from the whole image scales every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "model,match",
    [
        (Attention(), "flatten"),
        (nn.Sequential(nn.Linear(16, 4)), r"cannot follow module Linear at 0"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax(dim=1), nn.Flatten()), "Softmax"),
        (Gated(), r"'\.mean\(dim=\(2, 3\), keepdim=True\)' at the model's forward.*whole image"),
        (nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")), "reflect"),
        (nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2).train()), "model.eval"),
        (lambda t: t.sum(dim=(1, 2, 3)), "not a torch.nn.Module"),
    ],
)
def test_unsupported_models_fall_back_with_a_reason(model, match):
    engine, reason = auto_engine(model, (3, 16, 16), "cpu")
    assert engine is None
    assert reason
    assert __import__("re").search(match, reason), reason


@st.composite
def geometries(draw):
    h = draw(st.integers(4, 20))
    w = draw(st.integers(4, 20))
    wh = draw(st.integers(1, h))
    ww = draw(st.integers(1, w))
    return (h, w), (wh, ww), (draw(st.integers(1, wh)), draw(st.integers(1, ww)))


def _tiny(h: int, w: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
    )
    with torch.no_grad():
        features = net(torch.zeros(1, 3, h, w)).shape[1]
    return nn.Sequential(net, nn.Linear(features, 2)).eval()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.sampled_from(["random-pixel", "blur"]))
def test_any_geometry_on_a_tiny_convnet(geo, baseline):
    (h, w), window, stride = geo
    model = _tiny(h, w)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * 31 + w))
    engine = IncrementalEngine.build(model, (3, h, w), "cpu")
    k = 2 if baseline == "random-pixel" else 1
    ref = _maps(model, x, None, window, stride, baseline, k)
    inc = _maps(model, x, engine, window, stride, baseline, k)
    torch.testing.assert_close(inc.delta, ref.delta, atol=ATOL, rtol=0)


def test_tiny_convnet_of_the_kernel_tests():
    model = tiny_convnet()
    engine, reason = auto_engine(model, (3, 12, 12), "cpu")
    assert engine is not None, reason
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    ref = _maps(model, x, None, [4, 4], [2, 2], "random-pixel", 3)
    inc = _maps(model, x, engine, [4, 4], [2, 2], "random-pixel", 3)
    torch.testing.assert_close(inc.delta, ref.delta, atol=ATOL, rtol=0)


class RowCountingEngine:
    """An engine that records how many copies each occluded pass gives it."""

    def __init__(self, engine: IncrementalEngine) -> None:
        self.engine, self.rows = engine, []

    def forward_occluded(self, x, fill, grid, img, draw, win):
        self.rows.append(int(img.shape[0]))
        return self.engine.forward_occluded(x, fill, grid, img, draw, win)


@pytest.mark.parametrize(
    ("n", "max_batch", "rows"),
    [
        (1, 256, [169]),  # 169 copies: one pass of 169 rows, not 256
        (3, 256, [169] * 3),
        (1, 100, [85, 85]),  # 169 = 85 + 84 (padded): two passes per image
        (2, 100, [85] * 4),
    ],
)
def test_fixed_passes_fit_the_copies_per_image(n, max_batch, rows):
    model = _eval(SeedCNN(num_classes=2, input_dim=32))
    engine = IncrementalEngine.build(model, (3, 32, 32), "cpu")
    assert engine is not None
    counting = RowCountingEngine(engine)
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opts = ComputeOptions(engine=counting, max_batch=max_batch, fixed_batch=True)
    got = attribute(model, x, window=[8, 8], stride=[2, 2], baseline="zero", options=opts)
    assert counting.rows == rows
    ref = attribute(model, x, window=[8, 8], stride=[2, 2], baseline="zero")  # generic
    torch.testing.assert_close(got.delta, ref.delta, atol=ATOL, rtol=0)
