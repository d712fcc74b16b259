"""Per-position ops over the channels, and the channels-last sections ConvNeXt writes.

An op that mixes the channels of one pixel and nothing else is as local as an element-wise op:
its output pixel reads one input pixel. The engine runs such ops on regions like element-wise
ones. Recognised:

- batch norm at eval, as a function (``F.batch_norm``, ``torch.batch_norm``, as timm's
  ``BatchNormAct2d`` calls it): running statistics and a per-channel affine on ``(N, C, H, W)``;
- a *channels-last section*: ``permute(0, 2, 3, 1)`` to ``(N, H, W, C)``, then ops on the last
  dim (``LayerNorm`` over ``C`` alone, ``Linear``, element-wise ops with constants that vary over
  ``C`` alone, such as a layer-scale ``(C,)`` parameter), then ``permute(0, 3, 1, 2)`` back. This
  is ConvNeXt's block in timm, torchvision and Hugging Face, and timm's ``LayerNorm2d``.

The engine keeps every region as ``(B, C, h, w)`` whatever the layout of the node: a node of a
channels-last section gets its inputs permuted to ``(B, h, w, C)`` views and its output permuted
back, so crops, merges and caches stay one layout. Anything else that permutes an activation, a
``LayerNorm`` over spatial dims or a ``Linear`` on a channels-first activation (it would mix
columns) is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.incremental.explain import describe

__all__ = ["NOT_CHANNEL_OP", "channel_problem", "constant_fits", "permute_layout"]

NOT_CHANNEL_OP = "not a channel op"
_TO_LAST, _TO_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)
_BATCH_NORMS = {F.batch_norm, torch.batch_norm}


def _is_permute(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target is torch.permute
    )


def _permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (method or function), normalised to ``0..3``; None for
    dims that are not plain ints."""
    rest = [node.kwargs["dims"]] if "dims" in node.kwargs else list(node.args[1:])
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) % 4 for d in dims)


def permute_layout(
    node: fx.Node, modules: dict[str, nn.Module], channels_last: bool
) -> bool | str | None:
    """The layout after a permute of an activation: True (channels-last) for
    ``permute(0, 2, 3, 1)`` of a channels-first one, False for ``permute(0, 3, 1, 2)`` back; a
    reason for any other permute; None when ``node`` is no permute."""
    if not _is_permute(node):
        return None
    dims = _permute_dims(node)
    if dims == (_TO_FIRST if channels_last else _TO_LAST):
        return not channels_last
    layout = "(N, H, W, C)" if channels_last else "(N, C, H, W)"
    return (
        f"cannot follow {describe(node, modules)}: it permutes an {layout} activation to "
        f"{dims}, not a channels-last round trip (0, 2, 3, 1) ... (0, 3, 1, 2)"
    )


def constant_fits(value: Any, channels_last: bool) -> bool:
    """Whether a constant operand broadcasts over an activation without varying over the batch
    or the pixels: a scalar, or ``(C, 1, 1)``-like channels-first, ``(C,)``-like channels-last."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return True
    if channels_last:
        return value.dim() <= 4 and all(s == 1 for s in value.shape[:-1])
    if value.dim() < 2 or value.dim() > 4 or value.shape[-1] != 1 or value.shape[-2] != 1:
        return False
    return value.dim() < 4 or value.shape[0] == 1


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def channel_problem(
    node: fx.Node,
    modules: dict[str, nn.Module],
    values: dict[str, Any],
    consts: dict[str, Any],
    channels_last: bool,
) -> str | None:
    """None when ``node`` is a per-position op over the channels of an activation of this
    layout (module docstring); :data:`NOT_CHANNEL_OP` when it is no such op; else why not."""
    what = describe(node, modules)
    src = values[node.all_input_nodes[0].name]
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if node.op == "call_function" and node.target in _BATCH_NORMS:
        kind = "batch_norm"
        # F.batch_norm(x, mean, var, weight, bias, training); torch.batch_norm(x, weight,
        # bias, mean, var, training, ...): both have training at index 5
        training = _arg(node, 5, "training", False)
        mean = _arg(node, 1 if node.target is F.batch_norm else 3, "running_mean")
        if training or mean is None:
            return f"{what} normalises with batch statistics; call model.eval() first"
    elif type(module) is nn.LayerNorm or (
        node.op == "call_function" and node.target is F.layer_norm
    ):
        kind = "layer_norm"
        shape = module.normalized_shape if module is not None else _arg(node, 1, "normalized_shape")
        if not channels_last or tuple(shape) != (src.shape[-1],):
            return (
                f"cannot follow {what}: it normalises over the last {len(tuple(shape))} dim(s) of "
                f"a {tuple(src.shape)} {'(N, H, W, C)' if channels_last else '(N, C, H, W)'} "
                "activation, which mixes pixels; only a LayerNorm over the channels is local"
            )
    elif type(module) is nn.Linear or (node.op == "call_function" and node.target is F.linear):
        kind = "linear"
        if not channels_last:
            return (
                f"cannot follow {what}: a Linear on an (N, C, H, W) activation mixes the pixels "
                "of a row; only a Linear over the channels of (N, H, W, C) is local"
            )
    else:
        return NOT_CHANNEL_OP
    if kind == "batch_norm" and channels_last:
        return f"cannot follow {what}: batch norm of an (N, H, W, C) activation normalises rows"
    others = node.all_input_nodes[1:]
    if any(a.name not in consts for a in others):
        return f"cannot follow {what}: its parameters are computed from the image"
    return None
