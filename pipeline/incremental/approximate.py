"""Approximate incremental inference: Krypton's projective-field thresholding.

The exact engine recomputes, per layer, the whole projective field of a window (plus halo); in a
deep net that field grows until it covers most of the map, and the saving shrinks. Thresholding
(Nakandala, Kumar and Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations", SIGMOD 2019) caps the side of each layer's changed
region at ``tau`` times that layer's side, centred on the window's projection, and keeps the
unoccluded activations outside it: the change is cut off at the edges of the projective field,
where a trained net's effective receptive field gives it the least weight. ``tau = 1`` is the
exact engine.

The maps are approximate, so the error is measured, not assumed: :func:`pipeline.attribute`
also computes the exact score of ``approx_check_windows`` windows per image, drawn uniformly and
seeded by the seed and the image id, with :attr:`exact` (the same cached activations, so the
check costs that many exact windows) and returns the largest difference as
``OcclusionResult.approx_error``: with ``n`` windows, at least the ``q``-quantile of the image's
window errors with probability ``1 - q^n`` (:mod:`pipeline.kernel.approx_check`).

Models whose only non-local ops are squeeze-excitation gates (a per-channel value of the whole
activation scaling it: global pool, small MLP, sigmoid, multiply) run with the gates *frozen*:
the multiply reads the unoccluded image's gate instead of recomputing it from the occluded copy.
The exact engine refuses such models, so their check windows are scored by full forward passes
(:class:`FullPasses`), and ``approx_error`` measures the frozen gates and the capped fields
together.

Example:
    >>> from pipeline import ComputeOptions, attribute
    >>> from pipeline.models.nets import SeedCNN
    >>> net = SeedCNN(num_classes=2, input_dim=32).eval()
    >>> opts = ComputeOptions(engine="approximate", approx_threshold=0.5)
    >>> r = attribute(net, torch.rand(2, 3, 32, 32), window=[8, 8], options=opts)
    >>> r.approx_error.shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.incremental.engine import IncrementalEngine
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.options import check_threshold

__all__ = ["ApproximateEngine", "Cost", "FullPasses"]


@dataclass(frozen=True)
class Cost:
    """Work of one occluded copy, counted from a plan's region sizes (deterministic).

    Attributes:
        elements: activation elements recomputed per copy: ``C * h * w`` of the region of
            every trunk node but the input, summed.
        conv_macs: multiply-accumulates of the convolutions on their regions, per copy.
        full_elements: the same sum over whole activations (one full forward pass's trunk).
        full_conv_macs: multiply-accumulates of the convolutions in one full forward pass.
    """

    elements: int
    conv_macs: int
    full_elements: int
    full_conv_macs: int


class FullPasses:
    """Exact occluded outputs by full forward passes of the copies: the check windows of a
    model the exact incremental engine cannot run (frozen gates)."""

    name = "generic"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def forward_occluded(
        self,
        x: torch.Tensor,
        fill: torch.Tensor,
        grid: WindowGrid,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
    ) -> Any:
        """The model's outputs of occluded copies (arguments as
        :meth:`IncrementalEngine.forward_occluded`)."""
        mask = grid.masks(device=x.device)[win]  # (B, 1|C, H, W)
        return self.model(torch.where(mask, fill[img, draw], x[img]))  # (B, C, H, W) copies

    def clear(self) -> None:
        """Nothing is cached."""


class ApproximateEngine:
    """The incremental engine with each layer's changed region capped at ``tau`` of its side.

    Args:
        engine: the incremental engine of the model, exact or with frozen gates.
        approx_threshold: tau in (0, 1], the largest side of a layer's recomputed region as a
            fraction of that layer's output side (1: exact but for frozen gates).
        exact: what computes the exact scores of the check windows: ``engine`` itself by
            default (its cached activations are shared), :class:`FullPasses` with frozen gates.

    Raises:
        ValueError: ``approx_threshold`` is not in (0, 1] (the message names it).
    """

    name = "approximate"

    def __init__(
        self,
        engine: IncrementalEngine,
        approx_threshold: float,
        exact: IncrementalEngine | FullPasses | None = None,
    ) -> None:
        self.engine = engine
        self.exact = engine if exact is None else exact
        self.approx_threshold = check_threshold(approx_threshold)

    @property
    def frozen_gates(self) -> bool:
        """Whether squeeze-excitation gates are read from the unoccluded pass."""
        return any(st.frozen for st in self.engine.traced.steps)

    @classmethod
    def build_or_reason(
        cls,
        model: nn.Module | Any,
        image_shape: Sequence[int],
        device: torch.device | str,
        approx_threshold: float,
    ) -> tuple[ApproximateEngine | None, str]:
        """An approximate engine for ``model`` on ``(C, H, W)`` images (with frozen gates where
        the exact engine refuses only those), or None and why the model does not allow it."""
        check_threshold(approx_threshold)
        exact, reason = IncrementalEngine.build_or_reason(model, image_shape, device)
        if exact is not None:
            return cls(exact, approx_threshold), ""
        frozen, _ = IncrementalEngine.build_or_reason(model, image_shape, device, True)
        if frozen is None:
            return None, reason
        return cls(frozen, approx_threshold, FullPasses(model)), ""

    @torch.inference_mode()
    def forward_occluded(
        self,
        x: torch.Tensor,
        fill: torch.Tensor,
        grid: WindowGrid,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
    ) -> torch.Tensor:
        """Approximate raw outputs ``(B, ...)`` of occluded copies (arguments as
        :meth:`IncrementalEngine.forward_occluded`)."""
        return self.engine.forward_occluded(x, fill, grid, img, draw, win, self.approx_threshold)

    def cost(self, grid: WindowGrid, approx_threshold: float | None = None) -> Cost:
        """Work per occluded copy on ``grid`` at ``approx_threshold`` (default: this engine's).

        The region of a node is the same size for every window, so the count is exact for
        every copy (the exact engine's is ``approx_threshold=1``).
        """
        cap = self.approx_threshold if approx_threshold is None else approx_threshold
        plan = self.engine.plan(grid, torch.device("cpu"), check_threshold(cap))
        t = self.engine.traced
        by_name = {st.name: st for st in t.steps}
        elements = conv_macs = full_elements = full_macs = 0
        for st in t.steps[1:]:
            c, h, w = st.shape
            rh, rw = plan.regions[st.name].size
            elements += c * rh * rw
            full_elements += c * h * w
            module = t.modules.get(str(st.node.target)) if st.node.op == "call_module" else None
            if isinstance(module, nn.Conv2d):
                c_in = by_name[st.inputs[0]].shape[0]
                per_output = c_in // module.groups * module.kernel_size[0] * module.kernel_size[1]
                conv_macs += c * rh * rw * per_output
                full_macs += c * h * w * per_output
        return Cost(elements, conv_macs, full_elements, full_macs)

    def clear(self) -> None:
        """Release the cached activations."""
        self.engine.clear()
        self.exact.clear()
