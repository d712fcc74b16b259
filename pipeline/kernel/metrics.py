"""Per-image foreground/background saliency metrics (plain torch).

With importance ``I = |map|`` (mean over channels) and foreground mask ``F``:
``fg_share = sum(I[F]) / sum(I)``, ``fg_area = |F| / (H * W)``,
``fg_bg_ratio = mean(I[F]) / mean(I[~F])`` (1: no preference; < 1: background pixels matter more).
The ``_pos`` variants use ``I+ = max(map, 0)``, the evidence *for* the prediction.
With ``boundary_px = b > 0`` the foreground is eroded and the background taken outside the
dilated mask, so the band of width ``b`` around the object edge, where a window always straddles
both, counts for neither.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["image_metrics", "nan_metrics"]

_NAMES = ("fg_share", "fg_area", "fg_bg_ratio", "fg_share_pos", "fg_bg_ratio_pos")


def nan_metrics() -> dict[str, float]:
    """All metrics NaN (an image without a usable mask or map)."""
    return dict.fromkeys(_NAMES, math.nan)


def _grow(mask: torch.Tensor, b: int) -> torch.Tensor:
    """Binary dilation of an ``(H, W)`` mask by a ``(2b+1)^2`` square."""
    m = mask[None, None].float()
    return F.max_pool2d(m, 2 * b + 1, stride=1, padding=b)[0, 0] > 0


def _share_ratio(imp: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> tuple[float, float]:
    total = float(imp[fg].sum() + imp[bg].sum())
    if total == 0.0:
        return math.nan, math.nan
    share = float(imp[fg].sum()) / total
    mean_bg = float(imp[bg].mean())
    ratio = float(imp[fg].mean()) / mean_bg if mean_bg > 0 else math.inf
    return share, ratio


def image_metrics(
    attribution: torch.Tensor,
    mask: torch.Tensor | None,
    boundary_px: int = 0,
    ignore: torch.Tensor | None = None,
) -> tuple[dict[str, float], str | None]:
    """Foreground/background metrics of one map.

    Args:
        attribution: ``(H, W)`` or ``(C, H, W)`` occlusion map (score units).
        mask: ``(H, W)`` bool foreground mask, or None when the image has none.
        boundary_px: width in pixels of the edge band ignored on both sides of the mask edge.
        ignore: ``(H, W)`` bool pixels that are neither foreground nor background (a VOC
            border), or None.

    Returns:
        ``(metrics, note)``: the five metrics (NaN where undefined) and the reason they are NaN,
        or ``None`` when all are defined.
    """
    imp = attribution.abs().mean(dim=0) if attribution.dim() == 3 else attribution.abs()
    pos = attribution.clamp(min=0)
    pos = pos.mean(dim=0) if pos.dim() == 3 else pos  # (H, W)
    if mask is None:
        return nan_metrics(), "no foreground mask"
    if tuple(mask.shape) != tuple(imp.shape):
        raise ValueError(f"mask {tuple(mask.shape)} does not match the map {tuple(imp.shape)}")
    mask = mask.to(device=imp.device, dtype=torch.bool)
    fg, bg = mask, ~mask
    if boundary_px > 0:
        fg = ~_grow(~mask, boundary_px)  # erosion = complement of the dilated complement
        bg = ~_grow(mask, boundary_px)
    if ignore is not None:
        keep = ~ignore.to(device=imp.device, dtype=torch.bool)
        fg, bg = fg & keep, bg & keep
    out = nan_metrics()
    out["fg_area"] = float(mask.float().mean())
    if not bool(mask.any()):
        return out, "empty foreground mask"
    if not bool(fg.any()):
        return out, f"foreground vanishes after shrinking by boundary_px={boundary_px}"
    if not bool(bg.any()):
        return out, "the foreground mask covers the whole image: no background"
    out["fg_share"], out["fg_bg_ratio"] = _share_ratio(imp, fg, bg)
    out["fg_share_pos"], out["fg_bg_ratio_pos"] = _share_ratio(pos, fg, bg)
    if math.isnan(out["fg_share"]):
        return out, "the occlusion map is all zero"
    if math.isinf(out["fg_bg_ratio"]):
        return out, "zero background importance: ratio is infinite"
    if math.isnan(out["fg_share_pos"]):
        return out, "no window lowers the score: positive map is all zero"
    return out, None
