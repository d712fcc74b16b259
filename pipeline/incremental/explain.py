"""Why the incremental engine refuses a model: one line naming the op and its module path.

A refusal is only useful when a user can find what stopped the engine in their own code, so every
message names the op as it was written (``function 'mean((2, 3))'``, ``method
'.permute(0, 3, 1, 2)'``, ``Softmax``) and the module it sits in (``layer1.0.se``), taken from
the module stack ``torch.fx`` records on each node. Failures of tracing itself name the module and
the source line where tracing stopped. TorchScript models, and ``torch.export`` graphs with an
aten op that has no torch-level equivalent, say that they run on the generic kernel and which model
sources give the incremental engine instead.
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "ROOT",
    "describe",
    "global_source",
    "module_path",
    "scripted",
    "trace_failure",
]

ROOT = "model"  # attribute under which the traced wrapper holds the user's model
_EAGER_SOURCES = (
    "load the eager model instead: model.factory, model.timm or model.torchvision (with its "
    "state_dict in model.weights)"
)
_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(__file__)  # the engine's own frames (the traced wrapper) name nothing


def _strip_root(path: str) -> str:
    if path == ROOT or not path:
        return "the model's forward"
    return path.removeprefix(ROOT + ".")


def module_path(node: fx.Node) -> str:
    """Qualified name of the module whose forward holds ``node`` (``"layer1.0.se"``), or of the
    module a ``call_module`` node calls. Read from the module stack fx records (for a module
    call its innermost entry is the module itself): a module lowered from a ``torch.export``
    graph sits elsewhere, its stack names the exported model's module."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return _strip_root(str(next(reversed(stack.values()))[0]))
    return _strip_root(str(node.target) if node.op == "call_module" else "")


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return "<tensor>" if a.op != "get_attr" else _strip_root(str(a.target))
    if isinstance(a, list | tuple):
        inner = ", ".join(_arg(x) for x in a)
        return f"({inner}{',' if len(a) == 1 else ''})"
    return repr(a)


def _call(name: str, node: fx.Node) -> str:
    """``name(args)`` with the arguments after the tensor it reads, as written."""
    parts = [_arg(a) for a in node.args[1:]] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    text = f"{name}({', '.join(parts)})"
    return text if len(text) <= 70 else f"{name}(...)"


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The op of ``node`` and where it is: ``"function 'mean((2, 3))' at layer1.0.se"``,
    ``"module Softmax at 1"``, ``"aten op 'roll.default((1,), (3,))' at shift"``."""
    where = module_path(node)
    if node.op == "call_module":
        return f"module {type(modules[str(node.target)]).__name__} at {where}"
    if node.op == "call_method":
        return f"method '.{_call(str(node.target), node)}' at {where}"
    if isinstance(node.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return f"aten op '{_call(str(node.target).removeprefix('aten.'), node)}' at {where}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"function '{_call(name, node)}' at {where}"


def aten_hint(node: fx.Node) -> str:
    """A hint for an aten op left in a ``torch.export`` graph after lowering
    (:mod:`pipeline.incremental.aten`), else ``""``."""
    if isinstance(node.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return (
            "; this aten op of a torch.export graph has no torch equivalent the incremental "
            "engine follows (it follows convolutions, linear layers, batch norm at eval, pools, "
            "element-wise ops, views and permutes): the model runs on the generic kernel; for "
            f"the incremental engine {_EAGER_SOURCES}"
        )
    return ""


def global_source(node: fx.Node, spatial: Iterable[str], consts: Iterable[str]) -> fx.Node | None:
    """The op upstream of ``node`` that reduces a spatial activation to a value of the whole
    image (the pool of a squeeze-excitation gate), found through its non-spatial inputs."""
    spatial, consts = set(spatial), set(consts)
    todo = [a for a in node.all_input_nodes if a.name not in spatial and a.name not in consts]
    seen: set[str] = set()
    while todo:
        n = todo.pop(0)
        if n.name in seen:
            continue
        seen.add(n.name)
        if any(a.name in spatial for a in n.all_input_nodes):
            return n
        todo.extend(a for a in n.all_input_nodes if a.name not in consts)
    return None


def scripted(model: nn.Module) -> str | None:
    """Why a model holding TorchScript runs on the generic kernel, or None."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            where = f" at {name}" if name else ""
            return (
                f"the model is TorchScript ({type(m).__name__}{where}), which torch.fx cannot "
                f"trace: it runs on the generic kernel; for the incremental engine {_EAGER_SOURCES}"
            )
    return None


def trace_failure(root: nn.Module, err: BaseException) -> str:
    """Where ``torch.fx`` stopped: the innermost module of ``root`` on the traceback and the
    innermost source line outside torch, e.g. ``"torch.fx cannot trace ResNetEmbeddings at
    model.embedder (modeling_resnet.py:88: `if num_channels != self.num_channels:`): TraceError:
    symbolically traced variables cannot be used as inputs to control flow"``."""
    names = {id(m): n for n, m in root.named_modules()}
    module: tuple[str, str] | None = None
    line = ""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = (type(owner).__name__, _strip_root(names[id(owner)]))
        filename = frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, _HERE)) and "<" not in filename:
            code = linecache.getline(filename, tb.tb_lineno).strip()
            line = f"{os.path.basename(filename)}:{tb.tb_lineno}: `{code}`"
        tb = tb.tb_next
    where = f" {module[0]} at {module[1]}" if module else " the model"
    at = f" ({line})" if line else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"torch.fx cannot trace{where}{at}: {type(err).__name__}: {first}"
