"""``torch.export`` graphs as the torch-level fx graph the incremental engine's rules read.

A ``.pt2`` archive loads as a ``GraphModule`` of aten ops (``aten.conv2d.default``,
``aten.batch_norm.default``, ``aten.relu_.default``, ...) with its parameters as ``get_attr``
nodes, where an eager model traces to ``call_module`` of an ``nn.Conv2d`` and calls of
``F.relu``, ``torch.flatten``, ``torch.batch_norm``. Two steps make the first look like the
second:

- :class:`AtenTracer` follows the ``GraphModule`` op by op (an :class:`torch.fx.Interpreter` on
  the trace's proxies), so that each node keeps the module path ``torch.export`` recorded on the
  aten node (``layer1.0.conv1``, prefixed with where the archive sits in the traced model),
  instead of the archive's own path that plain ``torch.fx`` would give every op;
- :func:`lower_aten` rewrites each aten node it knows into its torch equivalent: convolutions and
  linear layers with constant weights into ``nn.Conv2d``/``nn.Linear`` modules that share the
  graph's tensors, batch norm at eval into ``torch.batch_norm``, pools, element-wise ops, views
  and permutes into ``F``/``torch`` calls with the same arguments. In-place aten ops become the
  in-place torch forms, so the rules still refuse one that writes over a tensor others read.

Ops it does not know (and convolutions of computed weights) stay aten nodes: the rules refuse
them by name, with the module path kept (:func:`pipeline.incremental.explain.aten_hint`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx import traceback as fx_traceback

__all__ = ["AtenTracer", "is_aten_graph", "lower_aten"]

aten = torch.ops.aten
_OpOverload = torch._ops.OpOverload

# aten op -> torch callable taking the same arguments in the same order
_SAME_ARGS: dict[Any, Callable[..., Any]] = {
    aten.relu.default: torch.relu,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
    aten.neg.default: torch.neg,
    aten.abs.default: torch.abs,
    aten.exp.default: torch.exp,
    aten.clamp.default: torch.clamp,
    aten.add.Tensor: torch.add,
    aten.add.Scalar: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.sub.Scalar: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.mul.Scalar: torch.mul,
    aten.div.Tensor: torch.div,
    aten.div.Scalar: torch.div,
    aten.cat.default: torch.cat,
    aten.hardtanh.default: F.hardtanh,
    aten.leaky_relu.default: F.leaky_relu,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.dropout.default: F.dropout,  # (input, p, train): at eval the identity
    aten.batch_norm.default: torch.batch_norm,  # training=False is checked by the rules
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten._adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.mean.dim: torch.mean,
    aten.flatten.using_ints: torch.flatten,
    aten.view.default: torch.reshape,
    aten.reshape.default: torch.reshape,
    aten._unsafe_view.default: torch.reshape,
    aten.permute.default: torch.permute,
    aten.t.default: torch.t,
}
# in-place aten activations -> the F function, called with inplace=True
_INPLACE_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    aten.relu_.default: F.relu,
    aten.hardtanh_.default: F.hardtanh,
    aten.leaky_relu_.default: F.leaky_relu,
    aten.silu_.default: F.silu,
    aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid_.default: F.hardsigmoid,
}
# other in-place aten ops -> the in-place tensor method of the same arguments
_INPLACE_METHODS = {
    aten.add_.Tensor: "add_",
    aten.sub_.Tensor: "sub_",
    aten.mul_.Tensor: "mul_",
    aten.div_.Tensor: "div_",
    aten.sigmoid_.default: "sigmoid_",
    aten.tanh_.default: "tanh_",
}
# views, and copies nothing writes in place (dropout at eval after the core decompositions): the
# node is its input (an in-place op on a view then reads the input itself, so the rules refuse it
# when others read the input too; the engine itself never writes in place)
_VIEWS = {aten.alias.default, aten.detach.default}
# ops returning a tuple whose first item alone is used -> (torch callable, positional args kept)
_FIRST_OF_TUPLE: dict[Any, tuple[Callable[..., Any], int]] = {
    aten.max_pool2d_with_indices.default: (F.max_pool2d, 6),
    aten.adaptive_max_pool2d.default: (F.adaptive_max_pool2d, 2),
    aten.native_layer_norm.default: (F.layer_norm, 5),
}


def is_aten_graph(module: nn.Module) -> bool:
    """Whether ``module`` is a ``GraphModule`` calling aten ops (a ``torch.export`` program's
    module)."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, _OpOverload) for n in module.graph.nodes
    )


class AtenTracer(fx.Tracer):
    """A ``torch.fx`` tracer that follows a ``GraphModule`` of aten ops node by node, each new
    node carrying the module path ``torch.export`` recorded (module docstring)."""

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict
    ) -> Any:
        if kwargs or not is_aten_graph(m):
            return super().call_module(m, forward, args, kwargs)
        prefix = self.path_of_module(m)
        outer = dict(self.module_stack)  # the modules around the archive (a Normalized)
        before = len(self.graph.nodes)
        # Node meta preserved: each node created while the interpreter runs an aten node
        # copies that node's nn_module_stack (paths within the exported model)
        with fx_traceback.preserve_node_meta():
            out = fx.Interpreter(m).run(*args)
        for node in list(self.graph.nodes)[before:]:
            stack = node.meta.get("nn_module_stack") or {}
            node.meta["nn_module_stack"] = outer | {
                f"{prefix}.{key}": (".".join(p for p in (prefix, path) if p), kind)
                for key, (path, kind) in stack.items()
            }
        return out


def _param(value: torch.Tensor) -> nn.Parameter:
    """``value`` itself when it is a parameter, else a parameter over its storage (no copy)."""
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def _attr(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node holds; None for any other argument."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    value: Any = gm
    for part in str(arg.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def _bound(node: fx.Node) -> dict[str, Any]:
    """Every argument of an aten call by its schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _two(value: Any) -> Any:
    """An aten ``int[2]`` argument as two ints (aten repeats a single one); a string as is."""
    if isinstance(value, list | tuple):
        return tuple(value) * 2 if len(value) == 1 else tuple(value)
    return value


def _conv(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | None:
    """An ``nn.Conv2d`` sharing the weights of a 2-D aten convolution, or None."""
    a = _bound(node)
    w, b = _attr(gm, a["weight"]), _attr(gm, a["bias"])
    if a.get("transposed") or w is None or w.dim() != 4 or (a["bias"] is not None and b is None):
        return None
    groups = int(a["groups"])
    conv = nn.Conv2d(
        w.shape[1] * groups,
        w.shape[0],
        tuple(w.shape[2:]),
        stride=_two(a["stride"]),
        padding=_two(a["padding"]),
        dilation=_two(a["dilation"]),
        groups=groups,
        bias=False,
        device="meta",  # no weights allocated: the graph's are shared
    )
    conv.weight = _param(w)
    conv.bias = None if b is None else _param(b)  # type: ignore[assignment]
    return conv


def _is_transpose(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        node.target is aten.t.default
        or (node.target is aten.permute.default and list(node.args[1]) == [1, 0])  # type: ignore[arg-type]
    )


def _linear(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Linear, fx.Node] | None:
    """An ``nn.Linear`` sharing the weights of ``linear(x, w, b)``, ``addmm(b, x, t(w))`` or
    ``mm(x, t(w))`` (the core aten decompositions' linear), and the node ``x``; or None."""
    a = _bound(node)
    if node.target is aten.linear.default:
        x, w_arg, b_arg = a["input"], a["weight"], a["bias"]
    elif _is_transpose(a["mat2"]) and a.get("beta", 1) == 1 and a.get("alpha", 1) == 1:
        x, w_arg = a.get("mat1", a["self"]), a["mat2"].args[0]
        b_arg = a["self"] if node.target is aten.addmm.default else None
    else:
        return None
    w, b = _attr(gm, w_arg), _attr(gm, b_arg)
    if w is None or w.dim() != 2 or (b_arg is not None and (b is None or b.dim() != 1)):
        return None
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = _param(w)
    linear.bias = None if b is None else _param(b)  # type: ignore[assignment]
    return linear, x


def _replace(node: fx.Node, op: str, target: Any, args: tuple, kwargs: dict) -> None:
    """Put a node of ``op``/``target`` in place of ``node``, keeping its meta (module path)."""
    with node.graph.inserting_before(node):
        new = node.graph.create_node(op, target, args, kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _first_of_tuple(node: fx.Node, target: Callable[..., Any], args: tuple) -> None:
    """``node`` returns a tuple: when only its item 0 is read, that read becomes
    ``target(*args)``."""
    users = list(node.users)
    if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
        return
    for u in users:
        u.meta = dict(node.meta)  # the getitem's path is the op's
        _replace(u, "call_function", target, args, {})
    node.graph.erase_node(node)


def _lower_reading_others(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    """Rewrite the aten nodes whose torch form depends on the nodes around them: tuple results
    read at item 0, convolutions and linear layers of constant weights."""
    t = node.target
    if t in _FIRST_OF_TUPLE:
        target, keep = _FIRST_OF_TUPLE[t]
        _first_of_tuple(node, target, node.args[:keep])
    elif t is aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var, momentum, eps = _bound(node).values()
        _first_of_tuple(node, torch.batch_norm, (x, w, b, mean, var, False, momentum, eps, False))
    elif t in (aten.conv2d.default, aten.conv2d.padding, aten.convolution.default):
        conv = _conv(gm, node)
        if conv is not None:
            gm.add_submodule(name, conv)
            _replace(node, "call_module", name, (node.args[0],), {})
    elif t in (aten.linear.default, aten.addmm.default, aten.mm.default):
        found = _linear(gm, node)
        if found is not None:
            wt = node.args[2] if t is aten.addmm.default else node.args[1]
            gm.add_submodule(name, found[0])
            _replace(node, "call_module", name, (found[1],), {})
            if isinstance(wt, fx.Node) and not wt.users:  # the weight's transpose
                node.graph.erase_node(wt)


def _lower_call(node: fx.Node) -> None:
    """Rewrite an aten node into the torch call of the same arguments, if it has one."""
    t = node.target
    if t in _SAME_ARGS:
        kwargs = {k: v for k, v in node.kwargs.items() if not (k == "dtype" and v is None)}
        _replace(node, "call_function", _SAME_ARGS[t], node.args, kwargs)
    elif t in _INPLACE_FUNCTIONS:
        _replace(node, "call_function", _INPLACE_FUNCTIONS[t], node.args, {"inplace": True})
    elif t in _INPLACE_METHODS:
        _replace(node, "call_method", _INPLACE_METHODS[t], node.args, dict(node.kwargs))
    elif t is aten.layer_norm.default:  # without the trailing cudnn_enable
        _replace(node, "call_function", F.layer_norm, node.args[:5], {})
    elif t is aten.clone.default and _written_in_place(node):
        # a copy that an in-place op writes: kept, so that the rules see it has one reader
        _replace(node, "call_method", "contiguous", node.args[:1], {})
    elif t is aten.sym_size.int:
        _replace(node, "call_method", "size", node.args, {})
    elif t in _VIEWS or t is aten.clone.default:
        node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
        node.graph.erase_node(node)


def lower_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every aten node that has a torch equivalent rewritten into it, in place.

    Args:
        gm: a traced module, possibly holding aten nodes (:class:`AtenTracer`).

    Returns:
        ``gm`` itself, recompiled; its new modules sit under ``_lowered``.
    """
    graph = gm.graph
    aten_nodes = [n for n in graph.nodes if _is_aten(n)]
    # first the ops that read other aten nodes (a linear's t(w)), before those are rewritten
    for i, node in enumerate(aten_nodes):
        _lower_reading_others(gm, node, f"_lowered.{i}")
    for node in [n for n in graph.nodes if _is_aten(n)]:
        _lower_call(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:  # weights now held by the new modules
            graph.erase_node(node)
    gm.recompile()
    return gm


def _is_aten(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, _OpOverload)


def _written_in_place(node: fx.Node) -> bool:
    """Whether an in-place aten op (``relu_``, ``add_``) reads ``node``."""
    return any(_is_aten(u) and u.target._schema.is_mutable for u in node.users)  # type: ignore[union-attr]
