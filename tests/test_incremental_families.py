"""Per-position ops over the channels: timm's functional batch norm (``BatchNormAct2d``) and the
channels-last sections of ConvNeXt (timm, torchvision) run incrementally, and their maps equal
the generic kernel's; near misses are refused by name."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.incremental.engine import IncrementalEngine, auto_engine
from pipeline.incremental.select import select_engine
from pipeline.kernel.targets import score_tensor
from pipeline.models.loading import Normalized
from tests.test_incremental import _eval, _maps

SIDE = 64  # stage 1 of ConvNeXt is 16x16: its 7x7 convs change part of it
# (window, stride, baseline, draws): overlapping and clipped windows, a per-channel window
SETTINGS = [([8, 8], [4, 4], "random-pixel", 2), ([12, 12], [10, 10], "blur", 1)]


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _eval(timm.create_model(name, pretrained=False, num_classes=3, **kwargs))


def _torchvision_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    blocks = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return _eval(ConvNeXt(blocks, layer_scale=1.0, num_classes=3))


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "convnext":
        cfg = tf.ConvNextConfig(
            depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], layer_scale_init_value=1.0
        )
        return _eval(tf.ConvNextForImageClassification(cfg))
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return _eval(tf.ResNetForImageClassification(cfg))


class _Logits(nn.Module):
    """The score tensor of a ``ModelOutput``, as the bench wraps Hugging Face models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return score_tensor(self.model(x))


FAMILIES = {
    # BatchNormAct2d: F.batch_norm inside timm's module
    "timm-mobilenetv2": lambda: _timm("mobilenetv2_035"),
    "timm-regnet": lambda: _timm("regnetx_002"),
    # BatchNormAct2d and concatenation over the channels
    "timm-densenet": lambda: _timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2)),
    # LayerNorm2d (permute, layer_norm, permute) and a 1x1-conv MLP
    "timm-convnext-conv-mlp": lambda: _timm(
        "convnext_atto", depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], ls_init_value=1.0
    ),
    # permute, LayerNorm, Linear, GELU, Linear, permute; layer scale on channels-first
    "timm-convnext": lambda: _timm(
        "convnext_atto",
        depths=[1, 1, 1, 1],
        dims=[8, 16, 32, 64],
        ls_init_value=1.0,
        conv_mlp=False,
    ),
    # Permute modules, nn.LayerNorm, nn.Linear, layer scale (C, 1, 1), stochastic depth
    "torchvision-convnext": _torchvision_convnext,
    # traced with the input's shape known: they check it in Python
    "hf-convnext": lambda: _hf("convnext"),
    "hf-resnet": lambda: _hf("resnet"),
    "hf-resnet-logits": lambda: _Logits(_hf("resnet")),
    "hf-convnext-normalized": lambda: Normalized(_hf("convnext"), [0.4, 0.5, 0.6], [0.2] * 3),
}


def assert_maps_equal_the_generic_kernels(model: nn.Module, side: int = SIDE) -> None:
    """``auto`` picks the incremental engine for ``model`` at ``side`` px, and its maps of two
    seeded images equal the generic kernel's under every one of :data:`SETTINGS`."""
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    engine, note = select_engine("auto", model, x.shape[1:], "cpu")
    assert isinstance(engine, IncrementalEngine), note
    for window, stride, baseline, k in SETTINGS:
        ref = _maps(model, x, None, window, stride, baseline, k)
        inc = _maps(model, x, engine, window, stride, baseline, k)
        scale = float(ref.delta.abs().max())
        assert scale > 1e-3  # the maps are not trivially zero
        tol = 1e-4 * max(1.0, scale)
        torch.testing.assert_close(inc.delta, ref.delta, atol=tol, rtol=1e-4)
        torch.testing.assert_close(inc.delta_std, ref.delta_std, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_maps_equal_the_generic_kernel(family):
    assert_maps_equal_the_generic_kernels(FAMILIES[family]())


class _Net(nn.Module):
    """A conv, then ``body`` on its activation, then a global average pool into a Linear."""

    def __init__(self, body) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = body
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.conv(x)).mean(dim=(2, 3)))


class _Fn(nn.Module):
    def __init__(self, fn, **params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _last(*mods: nn.Module) -> nn.Module:
    """``mods`` inside a channels-last round trip."""
    return _Round(nn.Sequential(*mods))


class _Round(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


NEAR_MISSES = [
    (
        _Fn(lambda s, x: x.permute(0, 1, 3, 2)),
        r"method '\.permute\(0, 1, 3, 2\)' at body: .*not a channels-last round trip",
    ),
    (
        _Fn(lambda s, x: x.permute(0, 2, 3, 1).permute(0, 2, 3, 1).permute(0, 2, 3, 1)),
        r"permutes an \(N, H, W, C\) activation to \(0, 2, 3, 1\)",
    ),
    (nn.LayerNorm([SIDE, SIDE]), r"module LayerNorm at body: it normalises over the last 2 dim"),
    (_last(nn.LayerNorm([SIDE, 8])), r"LayerNorm at body\.inner\.0: it normalises over the last 2"),
    (nn.Linear(SIDE, SIDE), r"module Linear at body: a Linear on an \(N, C, H, W\) activation"),
    (
        _Fn(
            lambda s, x: F.batch_norm(x, s.m, s.v, training=True), m=torch.zeros(8), v=torch.ones(8)
        ),
        r"function 'batch_norm\(.*\)' at body normalises with batch statistics",
    ),
    (
        _Fn(
            lambda s, x: (x.permute(0, 2, 3, 1) * s.w).permute(0, 3, 1, 2),
            w=torch.rand(SIDE, SIDE, 8),
        ),
        r"function 'mul\(body\.w\)' at body uses a constant of shape \(64, 64, 8\)",
    ),
    (
        _Fn(lambda s, x: x.permute(0, 2, 3, 1).mean(dim=(1, 2), keepdim=True).permute(0, 3, 1, 2)),
        r"'\.mean\(dim=\(1, 2\), keepdim=True\)' at body: it reads the \(N, H, W, C\) activation",
    ),
]


@pytest.mark.parametrize(("body", "match"), NEAR_MISSES)
def test_near_misses_are_refused_by_name(body, match):
    engine, reason = auto_engine(_Net(body).eval(), (3, SIDE, SIDE), "cpu")
    assert engine is None
    assert re.search(match, reason), reason
