"""Tracing with the image's shape known, for models that check their input's shape in Python.

Hugging Face vision models start with ``if pixel_values.shape[1] != self.num_channels: raise``:
control flow on a traced value, where plain ``torch.fx`` stops. The engine is built for one image
shape ``(C, H, W)`` anyway (it refuses images of another), so the tracer here answers
``x.shape`` of the input with ``(N, C, H, W)``: ``C, H, W`` as Python ints, the batch ``N`` a
traced ``x.size(0)`` (it varies from pass to pass). The same holds for element-wise arithmetic of
the input with a constant that broadcasts to its shape (``(x - mean) / std`` of
:class:`~pipeline.models.Normalized`), so wrapped models trace too.

Only the input's shape becomes constant. Ops of the graph that use it on a trunk activation are
no local ops (a reshape, an interpolation to a size) and are refused anyway, and head ops run on
full activations of the image size it was traced for.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from pipeline.incremental.aten import AtenTracer

__all__ = ["ImageShapeTracer"]

_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv}


class _ImageProxy(fx.Proxy):
    """A proxy of a value of the input's shape, whose ``shape`` is known but for the batch."""

    @property
    def shape(self) -> tuple[Any, ...]:  # type: ignore[override]
        tracer: ImageShapeTracer = self.tracer  # type: ignore[assignment]
        batch = tracer.create_proxy("call_method", "size", (self, 0), {})
        return (batch, *tracer.image_shape)


class ImageShapeTracer(AtenTracer):
    """A ``torch.fx`` tracer whose input answers ``.shape`` with ``(N, C, H, W)`` (module
    docstring); ``torch.export`` graphs inside are followed as :class:`AtenTracer` does.

    Args:
        image_shape: ``(C, H, W)`` of the images the engine is built for.
    """

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.image_shape = image_shape
        self._root: nn.Module | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._root = root if isinstance(root, nn.Module) else None
        return super().trace(root, concrete_args)

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if kind == "placeholder" or (
            kind == "call_function" and target in _ARITHMETIC and self._keeps_shape(args)
        ):
            return _ImageProxy(proxy.node, self)
        return proxy

    def _keeps_shape(self, args: Any) -> bool:
        """``image <op> other`` where ``other`` broadcasts to the image's shape unchanged."""
        if len(args) != 2 or not isinstance(args[0], _ImageProxy):
            return False
        other = args[1]
        if isinstance(other, int | float):
            return True
        value: Any = other  # a buffer is a tensor here, a parameter a get_attr proxy
        if isinstance(other, fx.Proxy) and other.node.op == "get_attr" and self._root is not None:
            value = self._root
            for part in str(other.node.target).split("."):
                value = getattr(value, part, None)
        if not isinstance(value, torch.Tensor):
            return False
        full = (2, *self.image_shape)
        try:
            return tuple(torch.broadcast_shapes(full, value.shape)) == full
        except RuntimeError:
            return False
