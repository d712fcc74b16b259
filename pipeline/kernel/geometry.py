"""Sliding-window geometry of occlusion, and the exact expansion of a window grid to pixels.

Windows follow Captum's ``Occlusion``: along an axis of size ``D`` with window ``W`` and stride
``S`` they start at ``0, S, 2S, ...``; there are ``ceil((D - W) / S) + 1`` of them and the last one
is clipped at the edge, so every pixel is covered. A pixel's attribution is the mean of the
deltas of the windows that cover it, which factorises per axis: with a 0/1 cover matrix
``A_d`` of shape ``(D, G)`` per axis, ``sum = A_c @ delta @ A_h^T @ A_w^T`` and
``count = A_c 1 (x) A_h 1 (x) A_w 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from pipeline.kernel.defaults import default_stride

__all__ = ["WindowGrid"]


def _as_triple(name: str, value: Sequence[int], channels: int) -> tuple[int, int, int]:
    values = tuple(int(v) for v in value)
    if len(values) == 2:
        # [h, w]: the window spans all channels, so there is a single channel position.
        return (channels, values[0], values[1])
    if len(values) == 3:
        return (values[0], values[1], values[2])
    raise ValueError(f"{name} must be [h, w] or [c, h, w], got {list(value)}")


@dataclass(frozen=True)
class WindowGrid:
    """Window positions over one image shape.

    Attributes:
        image: ``(C, H, W)`` of the images, in pixels.
        window: ``(c, h, w)`` window extent.
        stride: ``(c, h, w)`` step between window starts.
    """

    image: tuple[int, int, int]
    window: tuple[int, int, int]
    stride: tuple[int, int, int]

    @classmethod
    def create(
        cls,
        image: Sequence[int],
        window: Sequence[int],
        stride: Sequence[int] | None = None,
    ) -> WindowGrid:
        """Validate and normalise a window/stride pair for images of shape ``(C, H, W)``.

        ``window`` and ``stride`` are ``[h, w]`` (all channels at once) or ``[c, h, w]``.
        ``stride=None`` means half the window (at least 1 pixel), the usual overlap.

        Raises:
            ValueError: a window larger than the image, a non-positive stride, or a stride larger
                than the window along an axis the window does not fully cover (pixels would be
                skipped).
        """
        c, h, w = (int(v) for v in image)
        win = _as_triple("window", window, c)
        stride = default_stride(window) if stride is None else stride
        stride_t = _as_triple("stride", stride, c)
        if len(tuple(stride)) == 2 and len(tuple(window)) == 3:
            stride_t = (win[0], stride_t[1], stride_t[2])
        names = ("channel", "height", "width")
        for axis, (dim, wv, sv) in enumerate(zip((c, h, w), win, stride_t, strict=True)):
            if wv < 1:
                raise ValueError(f"window {names[axis]} must be >= 1, got {wv}")
            if wv > dim:
                raise ValueError(
                    f"window {[int(v) for v in window]} is larger than the image "
                    f"{[h, w] if len(tuple(window)) == 2 else [c, h, w]} along {names[axis]} "
                    f"({wv} > {dim}); use a smaller window or a larger image_size"
                )
            if sv < 1:
                raise ValueError(f"stride must be positive, got {sv} along {names[axis]}")
            if sv > wv and wv < dim:
                raise ValueError(
                    f"stride {sv} is larger than the window {wv} along {names[axis]}: pixels "
                    "between windows would never be occluded; use stride <= window"
                )
        return cls(image=(c, h, w), window=win, stride=stride_t)

    @cached_property
    def counts(self) -> tuple[int, int, int]:
        """Window positions per axis ``(Gc, Gh, Gw)``."""
        return tuple(  # type: ignore[return-value]
            math.ceil((d - wv) / sv) + 1
            for d, wv, sv in zip(self.image, self.window, self.stride, strict=True)
        )

    @property
    def n_windows(self) -> int:
        """Total window positions ``Gc * Gh * Gw``."""
        gc, gh, gw = self.counts
        return gc * gh * gw

    def spans(self, axis: int) -> list[tuple[int, int]]:
        """``[start, end)`` of every window along ``axis`` (0=c, 1=h, 2=w), clipped at the edge."""
        d, wv, sv = self.image[axis], self.window[axis], self.stride[axis]
        return [(i * sv, min(i * sv + wv, d)) for i in range(self.counts[axis])]

    def boxes(self) -> torch.Tensor:
        """Window boxes in row-major ``(c, h, w)`` order.

        Returns:
            ``(P, 6)`` int64 tensor of ``[c0, c1, y0, y1, x0, x1]`` (end-exclusive).
        """
        rows = [
            (*cs, *hs, *ws) for cs in self.spans(0) for hs in self.spans(1) for ws in self.spans(2)
        ]
        return torch.tensor(rows, dtype=torch.int64)

    def masks(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean occlusion masks of every window.

        Returns:
            ``(P, C', H, W)`` bool, ``C' = 1`` when windows span all channels (it broadcasts),
            else ``C``. ``True`` inside the window.
        """
        c, h, w = self.image
        full_channels = self.counts[0] == 1 and self.window[0] == c
        cov = [self.cover(axis, device=device, dtype=torch.bool) for axis in range(3)]
        if full_channels:
            cov[0] = torch.ones((1, 1), dtype=torch.bool, device=device)
        # (Gc, C', 1, 1) & (Gh, 1, H, 1) & (Gw, 1, 1, W) -> (Gc, Gh, Gw, C', H, W)
        m = (
            cov[0].T[:, None, None, :, None, None]
            & cov[1].T[None, :, None, None, :, None]
            & cov[2].T[None, None, :, None, None, :]
        )
        return m.reshape(self.n_windows, m.shape[3], h, w)

    def cover(
        self, axis: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """0/1 matrix ``(D, G)``: entry ``[d, g]`` is 1 when window ``g`` covers index ``d``."""
        a = torch.zeros((self.image[axis], self.counts[axis]), dtype=dtype, device=device)
        for g, (s, e) in enumerate(self.spans(axis)):
            a[s:e, g] = 1
        return a

    def expand(self, delta: torch.Tensor) -> torch.Tensor:
        """Full-resolution attribution from window deltas, exactly as Captum accumulates it.

        Args:
            delta: ``(..., Gc, Gh, Gw)`` score drop per window position.

        Returns:
            ``(..., C, H, W)`` mean of the deltas of the windows covering each pixel, in
            ``delta``'s dtype (accumulated in float64).
        """
        if tuple(delta.shape[-3:]) != self.counts:
            raise ValueError(f"delta grid {tuple(delta.shape[-3:])} != window grid {self.counts}")
        a_c, a_h, a_w = (self.cover(i, device=delta.device) for i in range(3))
        total = torch.einsum("...ijk,ci,hj,wk->...chw", delta.double(), a_c, a_h, a_w)
        count = torch.einsum("ci,hj,wk->chw", a_c, a_h, a_w)  # (C, H, W), >= 1 everywhere
        return (total / count).to(delta.dtype)
