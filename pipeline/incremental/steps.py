"""Trunk steps: which node reading an activation is local, and how the engine runs it.

A node is a step when its output pixel reads a bounded neighbourhood of its inputs: a conv/pool
(``"window"``, :func:`pipeline.incremental.rules.window_op`), an element-wise op
(:func:`pipeline.incremental.rules.pointwise_problem`), or a per-position op over the channels,
including the permutes of a channels-last section (:mod:`pipeline.incremental.channels`), the
last two as ``"pointwise"`` steps. Each step records the layout of its value, so that the engine
can keep every region channels-first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from pipeline.incremental.channels import NOT_CHANNEL_OP, channel_problem, permute_layout
from pipeline.incremental.explain import describe, global_source
from pipeline.incremental.rules import Axis, pointwise_problem, window_op

__all__ = ["Step", "chw", "is_spatial", "local_step"]


@dataclass
class Step:
    """One trunk node, computed on the changed region of each occluded copy.

    Attributes:
        name: fx node name.
        kind: ``"input"``, ``"pointwise"`` (element-wise or per-position over the channels, any
            number of spatial inputs) or ``"window"`` (conv/pool: reads a crop with a halo).
        node: the fx node.
        shape: ``(C, H, W)`` of the activation (also for a channels-last value).
        inputs: names of the spatial nodes it reads.
        axes: ``(rows, cols)`` window geometry (window steps only).
        pad_value: value of the padding a window step sees beyond its input (0 or -inf).
        op: window steps: maps an unpadded crop ``(B, C, h_in, w_in)`` to ``(B, C', h, w)``.
        channels_last: the node's value is ``(N, H, W, C)`` (inside a channels-last section);
            its regions and cache are still kept ``(N, C, H, W)``.
        frozen: head nodes it also reads, ``(N, C, 1, 1)`` values of the whole image (a
            squeeze-excitation gate), taken from the unoccluded pass (approximate engine only).
    """

    name: str
    kind: str
    node: fx.Node
    shape: tuple[int, int, int]
    inputs: tuple[str, ...]
    axes: tuple[Axis, Axis] | None = None
    pad_value: float = 0.0
    op: Callable[[torch.Tensor], torch.Tensor] | None = None
    channels_last: bool = False
    frozen: tuple[str, ...] = ()


def is_spatial(value: Any) -> bool:
    """A 4-D tensor of the example pass's batch of two."""
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == 2


def chw(value: torch.Tensor, channels_last: bool = False) -> tuple[int, int, int]:
    """``(C, H, W)`` of a ``(N, C, H, W)`` value, or of a ``(N, H, W, C)`` one."""
    if channels_last:
        return (int(value.shape[3]), int(value.shape[1]), int(value.shape[2]))
    return (int(value.shape[1]), int(value.shape[2]), int(value.shape[3]))


def _per_channel(value: Any) -> bool:
    """An ``(N, C, 1, 1)`` value: it broadcasts over any region of an activation."""
    return is_spatial(value) and tuple(value.shape[2:]) == (1, 1)


def local_step(
    node: fx.Node,
    sp: list[str],
    deps: list[fx.Node],
    modules: dict[str, nn.Module],
    values: dict[str, Any],
    consts: dict[str, Any],
    spatial: dict[str, Step],
    freeze: bool = False,
) -> Step | str | None:
    """A trunk step for ``node``, a reason why a local-looking op is unsupported, or None when
    ``node`` is not a local op at all.

    Args:
        node: a node that reads the trunk nodes ``sp`` (and possibly head nodes: ``deps``).
        modules, values, consts: the traced modules, every node's example value, constants.
        spatial: the trunk steps sorted so far.
        freeze: an element-wise op of an activation and per-channel values of the whole image
            reads those values from the unoccluded pass (:attr:`Step.frozen`).
    """
    what = describe(node, modules)
    val = values[node.name]
    layouts = {spatial[s].channels_last for s in sp}
    if len(layouts) > 1:
        return f"cannot follow {what}: it mixes (N, C, H, W) and (N, H, W, C) activations"
    last = layouts.pop()
    inputs = tuple(dict.fromkeys(sp))
    permuted = permute_layout(node, modules, last)
    if isinstance(permuted, str):
        return permuted
    if permuted is not None:  # the permute of a channels-last section: no op on regions
        return Step(
            node.name, "pointwise", node, chw(val, permuted), inputs, channels_last=permuted
        )
    win = window_op(node, modules, values)
    if isinstance(win, str):
        return win
    if win is not None:
        if not is_spatial(val) or len(deps) != 1:
            return f"{what} does not map an image batch to an image batch"
        if last:
            return f"cannot follow {what}: it reads an (N, H, W, C) activation as (N, C, H, W)"
        axes, pad_value, op = win
        return Step(node.name, "window", node, chw(val), (sp[0],), axes, pad_value, op)
    problem = channel_problem(node, modules, values, consts, last)
    if problem == NOT_CHANNEL_OP:
        problem = pointwise_problem(node, modules, values, consts, last)
    elif problem is None and node.all_input_nodes[0].name not in spatial:
        return f"cannot follow {what}: an activation is not its first argument"
    gates = tuple(d.name for d in deps if d.name not in spatial)
    frozen: tuple[str, ...] = ()
    if gates and freeze and not last and all(_per_channel(values[g]) for g in gates):
        frozen, gates = gates, ()  # read from the unoccluded pass: element-wise on the rest
    if problem is None and gates:
        gate = global_source(node, spatial, consts)
        if gate is None:
            return (
                f"cannot follow {what}: it combines an activation with a value computed from "
                "the whole image, which is not local"
            )
        return (
            f"cannot follow {describe(gate, modules)} (a global op: its value, computed from the "
            f"whole image, gates {what}, as squeeze-excitation does; not local)"
        )
    if problem is None:
        shapes = {chw(values[s], last)[1:] for s in sp}
        if not is_spatial(val) or shapes != {chw(val, last)[1:]}:
            return (
                f"{what} changes or broadcasts the spatial size "
                f"({[tuple(values[s].shape) for s in sp]} -> {tuple(val.shape)})"
            )
        return Step(
            node.name, "pointwise", node, chw(val, last), inputs, channels_last=last, frozen=frozen
        )
    if problem != "not pointwise":
        return problem
    return None
