"""Which models incremental inference can run: trace with ``torch.fx`` and sort the nodes.

``torch.export`` graphs (aten ops) are traced and lowered to the torch ops of an eager trace
first (:mod:`pipeline.incremental.aten`), so the same rules sort them.

A model qualifies when every node that reads a spatial activation ``(N, C, H, W)`` is *local*
(its output pixel depends on a bounded input neighbourhood: convolutions, pools, element-wise
ops) or a recognised *head entry* (flatten, global pooling, the output). Trunk nodes become
:class:`Step` objects with their sliding-window geometry; a flatten feeding a ``Linear`` and a
global average pool become :class:`Entry` objects that the engine updates from the changed region
only (Nakandala et al., "Incremental and Approximate Inference for Faster Occlusion-based Deep
CNN Explanations", SIGMOD 2019).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.incremental.aten import AtenTracer, lower_aten
from pipeline.incremental.explain import ROOT, aten_hint, describe, scripted, trace_failure
from pipeline.incremental.ops import run_node
from pipeline.incremental.rules import entry_kind, is_meta
from pipeline.incremental.steps import Step, chw, is_spatial, local_step
from pipeline.incremental.tracer import ImageShapeTracer

__all__ = ["Entry", "Step", "Traced", "trace_model"]


@dataclass
class Entry:
    """A head node whose value is updated from the changed region instead of recomputed.

    Attributes:
        name: node whose value is produced (the ``Linear`` node for ``"linear"``, the pooling
            node for ``"gap"``).
        source: the spatial node it reads.
        kind: ``"linear"`` (flatten, then ``Linear``) or ``"gap"`` (global average pool).
        module: the ``Linear`` of a ``"linear"`` entry.
    """

    name: str
    source: str
    kind: str
    module: nn.Linear | None = None


@dataclass
class Traced:
    """The sorted graph of a model.

    Attributes:
        gm: the traced module.
        steps: trunk steps in execution order (the first is the input).
        entries: incrementally updated head nodes.
        consts: values of the nodes that do not depend on the input.
        modules: modules by qualified name (in-place activations replaced by copies).
        head: nodes that depend on the input and are not trunk steps, in order.
    """

    gm: fx.GraphModule
    steps: list[Step]
    entries: dict[str, Entry]
    consts: dict[str, Any]
    modules: dict[str, nn.Module]
    head: list[fx.Node] = field(default_factory=list)


def _modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Modules by name; in-place activations become out-of-place copies, because the engine
    keeps regions that several consumers read."""
    mods = dict(gm.named_modules())
    for name, m in mods.items():
        if getattr(m, "inplace", False) is True:
            m2 = copy.copy(m)
            m2.inplace = False
            mods[name] = m2
    return mods


def _example_values(
    gm: fx.GraphModule, modules: dict[str, nn.Module], image_shape: tuple[int, int, int], device
) -> dict[str, Any]:
    """Every node's value on a batch of two zero images (two, so the batch axis is visible)."""
    env: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = torch.zeros((2, *image_shape), device=device)
        elif node.op != "output":
            env[node.name] = run_node(node, env, modules, gm)
    return env


class _ImageOnly(nn.Module):
    """The model called with the image alone, so that fx binds every other parameter of its
    forward to its default (a timm ViT's ``attn_mask=None``) instead of making it an input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, ROOT, model)

    def forward(self, x: torch.Tensor) -> Any:
        return getattr(self, ROOT)(x)  # (N, C, H, W) -> the model's output


def trace_model(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    device: torch.device,
    freeze_gates: bool = False,
) -> Traced | str:
    """Trace ``model`` and sort its nodes, or say why it cannot run incrementally.

    Args:
        model: a module mapping ``(N, C, H, W)`` images to outputs.
        image_shape: ``(C, H, W)`` of the images, in pixels.
        device: where the example pass runs.
        freeze_gates: an element-wise op of an activation and a per-channel value of the whole
            image (a squeeze-excitation gate) becomes a step that reads that value from the
            unoccluded pass (:attr:`Step.frozen`): approximate, for the approximate engine only.

    Returns:
        A :class:`Traced`, or a human-readable reason string starting ``"incremental engine: "``
        and naming the op and module that stopped it (:mod:`pipeline.incremental.explain`).
    """
    traced = _trace(model, image_shape, device, freeze_gates)
    return f"incremental engine: {traced}" if isinstance(traced, str) else traced


def _trace(
    model: nn.Module, image_shape: tuple[int, int, int], device: torch.device, freeze: bool
) -> Traced | str:
    if not isinstance(model, nn.Module):
        return f"the model is a {type(model).__name__}, not a torch.nn.Module that fx can trace"
    why = scripted(model)
    if why is not None:
        return why
    root = _ImageOnly(model)
    name = type(model).__name__
    try:
        gm = fx.GraphModule(root, AtenTracer().trace(root), name)
    except Exception:  # fx raises many types on data-dependent control flow
        # again, with the input's shape known: Hugging Face models check it in Python
        try:
            gm = fx.GraphModule(root, ImageShapeTracer(image_shape).trace(root), name)
        except Exception as e:
            return trace_failure(root, e)
    gm = lower_aten(gm)  # a torch.export graph as the torch ops the rules know
    modules = _modules(gm)
    try:
        values = _example_values(gm, modules, image_shape, device)
    except Exception as e:
        return f"the model failed on a {tuple(image_shape)} example ({type(e).__name__}: {e})"
    return _sort_nodes(gm, modules, values, freeze)


def _sort_nodes(
    gm: fx.GraphModule, modules: dict[str, nn.Module], values: dict[str, Any], freeze: bool
) -> Traced | str:
    """Classify every node as constant, trunk step, entry or head (see the module docstring)."""
    out = Traced(gm=gm, steps=[], entries={}, consts={}, modules=modules)
    spatial: dict[str, Step] = {}
    head: set[str] = set()
    skipped: set[str] = set()  # nodes bypassed by a "linear" entry
    for node in gm.graph.nodes:
        deps = [a for a in node.all_input_nodes if a.name in spatial or a.name in head]
        if node.op == "placeholder":
            if not is_spatial(values[node.name]):
                return "the input is not an (N, C, H, W) image batch"
            spatial[node.name] = Step(node.name, "input", node, chw(values[node.name]), ())
            continue
        if node.op == "output":
            break
        if not deps:
            out.consts[node.name] = values[node.name]
            continue
        sp = [a.name for a in deps if a.name in spatial]
        if not sp or node.name in skipped:
            head.add(node.name)
            continue
        step = local_step(node, sp, deps, modules, values, out.consts, spatial, freeze)
        if isinstance(step, Step):
            spatial[node.name] = step
            continue
        if step is not None:
            return step
        if is_meta(node):
            head.add(node.name)
            continue
        last = [s for s in sp if spatial[s].channels_last]
        if last:
            return (
                f"cannot follow {describe(node, modules)}: it reads the (N, H, W, C) activation "
                f"of {describe(spatial[last[0]].node, modules)}; only per-position ops and a "
                "permute(0, 3, 1, 2) back to (N, C, H, W) may follow a permute(0, 2, 3, 1)"
            )
        kind = entry_kind(node, modules, values)
        if kind is None:
            src = spatial[sp[0]]
            read = "the input image" if src.kind == "input" else describe(src.node, modules)
            return (
                f"cannot follow {describe(node, modules)}: it reads the activation of {read} "
                "and is neither local (conv, pool, element-wise) nor a head the engine updates "
                f"(flatten into a Linear, global pooling){aten_hint(node)}"
            )
        head.add(node.name)
        if kind == "gap":
            out.entries[node.name] = Entry(node.name, sp[0], "gap")
        elif kind == "flatten":
            linear, chain = _linear_after(node, modules)
            if linear is not None:
                skipped.update(chain)
                out.entries[linear.name] = Entry(
                    linear.name,
                    sp[0],
                    "linear",
                    modules[str(linear.target)],  # type: ignore[arg-type]
                )
    out.steps = list(spatial.values())
    out.head = [n for n in gm.graph.nodes if n.name in head]
    _drop_unused_entries(out)
    return out


def _drop_unused_entries(out: Traced) -> None:
    """Drop entries the output does not read: a frozen gate's pool is read from the unoccluded
    pass, and updating it per copy would only cost time and keep its source region alive."""
    steps = {st.name for st in out.steps}
    output = next(n for n in out.gm.graph.nodes if n.op == "output")
    need: set[str] = set()
    todo = list(output.all_input_nodes)
    while todo:
        n = todo.pop()
        if n.name not in need and n.name not in steps:
            need.add(n.name)
            todo.extend(n.all_input_nodes)
    out.entries = {k: e for k, e in out.entries.items() if k in need}


_PASS_THROUGH = (nn.Dropout, nn.Identity)


def _linear_after(flat: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, list[str]]:
    """The ``Linear`` that a flatten feeds through eval-mode dropouts/identities, if any, and
    the names of the nodes in between (flatten included)."""
    chain = [flat.name]
    node = flat
    while len(node.users) == 1:
        (user,) = node.users
        if user.op == "call_function" and user.target is F.dropout:
            training = user.args[2] if len(user.args) > 2 else user.kwargs.get("training", True)
            if training:  # a random mask: not the identity the linear update assumes
                return None, []
        elif user.op == "call_module":
            m = modules[str(user.target)]
            if type(m) is nn.Linear and user.args[0] is node:
                return user, chain
            if not isinstance(m, _PASS_THROUGH) or m.training:
                return None, []
        else:
            return None, []
        chain.append(user.name)
        node = user
    return None, []
