"""Archives with a declared input: ``torch.export`` programs (and the input check of any model
that declares one, ONNX files included).

An exported program fixes which input shapes it accepts when it is exported: a batch exported
as ``1`` (no ``dynamic_shapes``) accepts only 1 image, and fails every later call with ``Guard
failed: x.size()[0] == 1``. :func:`input_signature` reads the declared shape of a loaded model,
so the pre-run check refuses such an archive in one line, naming the fix, before any worker
starts.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.models.factory import ModelLoadError

__all__ = ["InputSignature", "check_signature", "input_signature", "load_export"]

# The attribute a loader sets on the module it returns (see input_signature).
_SIGNATURE = "_occlusion_input_signature"
_FIX = {
    "export": "re-export with a dynamic batch dimension: torch.export.export(model, args, "
    "dynamic_shapes=({0: torch.export.Dim('batch')},))",
    "onnx": "re-export with a dynamic batch axis: torch.onnx.export(model, args, f, "
    "input_names=['x'], dynamic_axes={'x': {0: 'batch'}})",
}


@dataclass(frozen=True)
class InputSignature:
    """The input an archive declares: ``(low, high)`` per dimension of its one input tensor.

    ``high`` is None where the dimension is unbounded; a static dimension has ``low == high``.
    """

    kind: str  # "export" | "onnx": which re-export fixes a mismatch
    where: str  # the archive, for messages
    dims: tuple[tuple[int, int | None], ...]

    def attach(self, module: nn.Module) -> nn.Module:
        """Record this signature on ``module`` (found again by :func:`input_signature`)."""
        object.__setattr__(module, _SIGNATURE, self)
        return module


def input_signature(model: nn.Module) -> InputSignature | None:
    """The declared input of ``model`` or of a module inside it (through ``Normalized``); None
    for a model that declares none (any eager module)."""
    for m in model.modules():
        sig = getattr(m, _SIGNATURE, None)
        if isinstance(sig, InputSignature):
            return sig
    return None


def check_signature(
    sig: InputSignature, batches: Sequence[int], chw: Sequence[int], max_batch_key: str
) -> str | None:
    """Why the workers' inputs do not fit ``sig``, in one line with the fix; None when they do.

    Args:
        batches: the batch sizes the workers pass (the pre-run call's 2, the unoccluded and the
            occluded passes' rows).
        chw: ``(C, H, W)`` of the images after resize.
        max_batch_key: how the largest batch is set (``occlusion.max_batch``), for the fix.
    """
    if len(sig.dims) != 4:
        return f"{sig.where} takes a {len(sig.dims)}-d input; the images are (N, C, H, W)"
    (lo, hi), *rest = sig.dims
    need_lo, need_hi = min(batches), max(batches)
    if lo == hi:
        return (
            f"{sig.where} was exported for a fixed batch of {lo} image(s), but the workers pass "
            f"batches of {need_lo} to {need_hi}: {_FIX[sig.kind]}"
        )
    if lo > need_lo:
        return f"{sig.where} accepts batches of at least {lo}, the workers pass {need_lo}"
    if hi is not None and hi < need_hi:
        return (
            f"{sig.where} accepts batches of at most {hi}, the workers pass up to {need_hi}: set "
            f"{max_batch_key}: {hi}, or re-export with a larger maximum batch"
        )
    if any(n < a or (b is not None and n > b) for (a, b), n in zip(rest, chw, strict=True)):
        declared = "x".join(str(a) if a == b else "?" for a, b in rest)
        (h, h_hi), (w, w_hi) = rest[1], rest[2]
        resize = f"set dataset.image_size: [{h}, {w}], or " if (h, w) == (h_hi, w_hi) else ""
        return (
            f"{sig.where} was exported for {declared} images, the images are "
            f"{'x'.join(map(str, chw))}: {resize}re-export at dataset.image_size (or with "
            "dynamic height and width)"
        )
    return None


def load_export(path: Path) -> nn.Module:
    """The module of the ``torch.export`` archive at ``path``, in eval mode, its declared input
    recorded (:func:`input_signature`).

    Raises:
        ModelLoadError: not a torch.export archive, or exported in training mode.
    """
    try:
        program = torch.export.load(str(path))
    except RuntimeError as err:
        raise ModelLoadError(
            f"{path} is not a torch.export archive; a state_dict needs model.factory plus "
            "weights, a TorchScript archive goes in model.torchscript"
        ) from err
    module = program.module()
    for gm in module.modules():
        for node in gm.graph.nodes if isinstance(gm, torch.fx.GraphModule) else ():
            if _in_training_mode(node):
                raise ModelLoadError(
                    f"{path} was exported in training mode ({node.target} at node {node.name}), "
                    "so dropout/batch-norm would make maps random; call model.eval() before "
                    "torch.export.export"
                )
    # An exported module raises on train()/eval(), and Normalized.eval() recurses into it. The
    # graph fixed its mode at export time and was just checked to be an inference graph, so let
    # eval() pass and keep train() refused.
    for sub in module.modules():
        sub.training = False
    module.train = types.MethodType(_eval_only_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(nn.Module.eval, module)  # type: ignore[method-assign]
    dims = _declared_dims(program)
    if dims is not None:
        InputSignature("export", f"model.export {path.name}", dims).attach(module)
    return module


Dims = tuple[tuple[int, int | None], ...]


def _declared_dims(program: torch.export.ExportedProgram) -> Dims | None:
    """``(low, high)`` per dimension of the program's first tensor input, from its range
    constraints (None: no tensor input)."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if node.name not in users or not isinstance(value, torch.Tensor):
            continue
        dims: list[tuple[int, int | None]] = []
        for size in value.shape:
            if isinstance(size, int):
                dims.append((size, size))
                continue
            bound = program.range_constraints.get(size.node.expr)
            # sympy bounds; torch's unbounded int_oo is no sympy Integer
            lo = int(bound.lower) if bound is not None and bound.lower.is_Integer else 0
            hi = int(bound.upper) if bound is not None and bound.upper.is_Integer else None
            dims.append((lo, hi))
        return tuple(dims)
    return None


def _in_training_mode(node: torch.fx.Node) -> bool:
    """Whether an aten call has a ``train``/``training`` argument set to True (dropout, BN)."""
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name in ("train", "training"):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if value is True:
                return True
    return False


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise NotImplementedError("a torch.export graph cannot be switched to training mode")
    return self
