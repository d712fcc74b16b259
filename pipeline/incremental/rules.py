"""The op rules of incremental inference: which fx nodes are local, and their window geometry.

A local op's output pixel depends only on a bounded neighbourhood of its input: element-wise ops
(neighbourhood of one pixel) and sliding windows (conv/pool: ``kernel``, ``stride``, ``padding``,
``dilation`` per axis). Anything else that reads a spatial activation must be a recognised head
entry (flatten, global pooling) or the model is not eligible.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair

from pipeline.incremental.channels import constant_fits
from pipeline.incremental.explain import describe
from pipeline.incremental.ops import slice_max_pool

__all__ = ["Axis", "entry_kind", "is_meta", "pointwise_problem", "window_op"]

_POINTWISE_MODULES = {
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.BatchNorm2d,
}  # fmt: skip
_POINTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.relu,
    torch.sigmoid, torch.tanh, torch.clamp, torch.cat, F.relu, F.relu6, F.leaky_relu, F.gelu,
    F.silu, F.elu, F.selu, F.celu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus,
    F.sigmoid, F.tanh, F.dropout,
}  # fmt: skip
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs",
    "exp", "contiguous", "float",
}  # fmt: skip
_FLATTENS: set[Any] = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}


@dataclass(frozen=True)
class Axis:
    """Sliding-window geometry of a conv/pool layer along one axis, in input pixels.

    Output index ``o`` reads inputs ``o * stride - pad + dilation * j`` for ``j < kernel``.
    """

    kernel: int
    stride: int
    pad: int
    dilation: int = 1

    @property
    def extent(self) -> int:
        """Input pixels spanned by one window."""
        return self.dilation * (self.kernel - 1) + 1

    def out_box(
        self, lo: torch.Tensor, hi: torch.Tensor, n_out: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output range ``[lo', hi')`` whose windows touch input range ``[lo, hi)`` (``(P,)``
        int64 each), clipped to ``[0, n_out)``. A superset when dilation leaves holes."""
        first = -torch.div(-(lo + self.pad - self.extent + 1), self.stride, rounding_mode="floor")
        last = torch.div(hi - 1 + self.pad, self.stride, rounding_mode="floor") + 1
        first = first.clamp(0, n_out)
        return first, torch.maximum(last.clamp(0, n_out), first)

    def out_centre(self, centre: torch.Tensor) -> torch.Tensor:
        """Where an input position maps to in the output, in continuous coordinates (index
        ``i`` spans ``[i, i + 1)``): the output whose window is centred on ``centre``."""
        return (centre + self.pad - self.extent / 2) / self.stride + 0.5

    def reads(self, n: int) -> int:
        """Input pixels that ``n`` consecutive outputs read."""
        return (n - 1) * self.stride + self.extent

    def crop(self, start: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """Input start and length that ``n`` outputs from ``start`` read (start may be < 0)."""
        return start * self.stride - self.pad, self.reads(n)


def is_meta(node: fx.Node) -> bool:
    """True for nodes that read only the shape/dtype of a tensor (``x.size(0)``, ``x.shape``)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return (
        node.op == "call_function"
        and node.target is builtins.getattr
        and node.args[1] in ("shape", "dtype", "device", "ndim")
    )


def _stochastic_depth(node: fx.Node) -> bool:
    """torchvision's ``stochastic_depth(input, p, mode, training)`` (a leaf of fx tracing,
    recognised by name): the identity at eval, random in training."""
    target = node.target
    return getattr(target, "__name__", None) == "stochastic_depth" and str(
        getattr(target, "__module__", "")
    ).startswith("torchvision.ops")


def _inplace(node: fx.Node, modules: dict[str, nn.Module], gm_module: nn.Module | None) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_module":
        return getattr(gm_module, "inplace", False) is True
    return node.kwargs.get("inplace") is True


def pointwise_problem(
    node: fx.Node,
    modules: dict[str, nn.Module],
    values: dict[str, Any],
    consts: dict[str, Any],
    channels_last: bool = False,
) -> str | None:
    """None when ``node`` is an element-wise op the engine runs on regions of an activation
    of this layout (``channels_last``: ``(N, H, W, C)``); ``"not pointwise"`` when it is some
    other op; else why this element-wise op cannot run on regions."""
    what = describe(node, modules)
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if node.op == "call_module":
        if type(module) not in _POINTWISE_MODULES:
            return "not pointwise"
        if isinstance(module, nn.BatchNorm2d) and (module.training or module.running_mean is None):
            return f"{what} normalises with batch statistics; call model.eval() first"
        if isinstance(module, nn.Dropout | nn.Dropout2d) and module.training and module.p > 0:
            return f"{what} is random in training mode; call model.eval() first"
    elif node.op == "call_function":
        if _stochastic_depth(node):
            training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
            if training:
                return f"{what} is random (training=True); call model.eval() first"
        elif node.target not in _POINTWISE_FUNCTIONS:
            return "not pointwise"
        if node.target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            channels = (3, -1) if channels_last else (1, -3)
            if dim not in channels:
                return (
                    f"{what} concatenates along dim {dim}; only the channels (dim "
                    f"{channels[0]}) are local"
                )
        if node.target is F.dropout:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training:
                return f"{what} is random (training=True)"
    elif node.op != "call_method" or node.target not in _POINTWISE_METHODS:
        return "not pointwise"
    for arg in node.all_input_nodes:
        if arg.name in consts and not constant_fits(consts[arg.name], channels_last):
            shape = tuple(consts[arg.name].shape)
            return f"{what} uses a constant of shape {shape} that varies over the image"
    if node.op == "call_module":
        original = node.graph.owning_module.get_submodule(str(node.target))  # type: ignore[union-attr]
    else:
        original = None
    if _inplace(node, modules, original) and len(node.all_input_nodes[0].users) > 1:
        return f"{what} works in place on a tensor that other nodes also read"
    return None


def _pool_module(node: fx.Node) -> nn.Module | None:
    """The module equivalent of a functional pooling call, or None."""
    names = {
        F.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
        F.avg_pool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
        F.adaptive_avg_pool2d: ("output_size",),
        F.adaptive_max_pool2d: ("output_size",),
    }
    kinds: dict[Any, type[nn.Module]] = {
        F.max_pool2d: nn.MaxPool2d,
        F.avg_pool2d: nn.AvgPool2d,
        F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
        F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
    }
    if node.op != "call_function" or node.target not in names:
        return None
    kw = dict(zip(names[node.target], node.args[1:], strict=False)) | dict(node.kwargs)
    if any(isinstance(v, fx.Node) for v in kw.values()) or kw.get("return_indices"):
        return None
    return kinds[node.target](**kw)


def _conv_axes(m: nn.Conv2d) -> tuple[Axis, Axis]:
    """Window geometry of a conv; ``padding="same"`` puts the smaller half first, as torch."""
    k, s, d = m.kernel_size, m.stride, m.dilation
    if m.padding == "valid":
        pads: Any = (0, 0)
    elif m.padding == "same":
        pads = tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
    else:
        pads = m.padding
    return (Axis(k[0], s[0], pads[0], d[0]), Axis(k[1], s[1], pads[1], d[1]))


def _conv_crop(m: nn.Conv2d, crop: torch.Tensor) -> torch.Tensor:
    """The conv on a crop that already holds its zero padding."""
    return F.conv2d(crop, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)


def window_op(
    node: fx.Node, modules: dict[str, nn.Module], values: dict[str, Any]
) -> tuple[tuple[Axis, Axis], float, Callable[[torch.Tensor], torch.Tensor]] | str | None:
    """``((rows, cols), pad_value, op)`` of a conv/pool node, where ``op`` runs the layer
    without padding on a crop that already holds its padding; a reason string when the layer
    cannot run on crops; None when ``node`` is not a conv/pool layer."""
    m = modules[str(node.target)] if node.op == "call_module" else _pool_module(node)
    if m is None:
        return None
    what = describe(node, modules)
    src = values[node.all_input_nodes[0].name]
    out = values[node.name]
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            return f"{what} pads with {m.padding_mode!r}; only zero padding is supported"
        return _conv_axes(m), 0.0, partial(_conv_crop, m)
    if type(m) is nn.MaxPool2d:
        if m.return_indices:
            return f"{what} returns indices"
        k, s, p, d = (
            _pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation)
        )
        axes = (Axis(k[0], s[0], p[0], d[0]), Axis(k[1], s[1], p[1], d[1]))
        return axes, float("-inf"), lambda t: slice_max_pool(t, k, s, d)
    if type(m) is nn.AvgPool2d:
        k, s, p = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        axes = (Axis(k[0], s[0], p[0]), Axis(k[1], s[1], p[1]))
        ends = [
            (n - 1) * a.stride - a.pad + a.kernel for a, n in zip(axes, out.shape[2:], strict=True)
        ]
        overhang = any(
            e > size + a.pad for e, a, size in zip(ends, axes, src.shape[2:], strict=True)
        )
        if m.divisor_override is None and (overhang or (max(p) > 0 and not m.count_include_pad)):
            return f"{what} divides border windows by their clipped size; not supported"
        div = m.divisor_override
        return axes, 0.0, lambda t: F.avg_pool2d(t, k, s, 0, False, True, div)
    if type(m) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        (h, w), (oh, ow) = src.shape[2:], out.shape[2:]
        if (oh, ow) == (1, 1) or h % oh or w % ow:
            return None  # a global pool, or uneven windows: a head entry, not a trunk layer
        k = (h // oh, w // ow)
        axes = (Axis(k[0], k[0], 0), Axis(k[1], k[1], 0))
        if type(m) is nn.AdaptiveMaxPool2d:
            return axes, float("-inf"), lambda t: slice_max_pool(t, k, k, (1, 1))
        return axes, 0.0, lambda t: F.avg_pool2d(t, k, k)
    return None


def entry_kind(node: fx.Node, modules: dict[str, nn.Module], values: dict[str, Any]) -> str | None:
    """How a non-local node may read a spatial activation: ``"flatten"`` (to ``(N, C*H*W)``),
    ``"gap"`` (global average pool), ``"splice"`` (other global/adaptive pools: run on the
    spliced full activation), or None (not allowed)."""
    src = values[node.all_input_nodes[0].name]
    out = values[node.name]
    if not isinstance(src, torch.Tensor) or src.dim() != 4 or not isinstance(out, torch.Tensor):
        return None
    n, c, h, w = src.shape
    op = modules[str(node.target)] if node.op == "call_module" else node.target
    pooled = {(n, c), (n, c, 1, 1)}
    if (op in _FLATTENS or isinstance(op, nn.Flatten)) and tuple(out.shape) == (n, c * h * w):
        return "flatten"
    if op in ("mean", torch.mean) and tuple(out.shape) in pooled and "dtype" not in node.kwargs:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, list | tuple) and {int(d) % 4 for d in dims} == {2, 3}:
            return "gap"
    pool = _pool_module(node) if node.op == "call_function" else op
    if type(pool) is nn.AdaptiveAvgPool2d and tuple(out.shape) == (n, c, 1, 1):
        return "gap"
    if isinstance(pool, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return "splice"
    if op in ("sum", "amax", torch.sum, torch.amax) and tuple(out.shape) in pooled:
        return "splice"
    return None
