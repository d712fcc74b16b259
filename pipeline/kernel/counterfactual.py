"""Counterfactual backgrounds: does the score follow the object or its background?

After Xiao et al. 2020 ("Noise or Signal: The Role of Image Backgrounds in Object Recognition"):
the object is pasted onto other backgrounds and the score is read again. For each image ``x``
with foreground mask ``m``:

- a *background* of an image is the image with its own foreground filled (``fill``: the mean
  colour of its background pixels, or that fill blurred into the surroundings);
- **mixed-same**: ``m * x + (1 - m) * background(b)`` for bank images ``b`` of the same group:
  the group's kind of background, not this image's;
- **mixed-rand**: the same with bank images of other groups (the BG-gap of Xiao et al.);
- **no-fg**: ``background(x)``, the image without its object;
- **only-fg**: ``m * x + (1 - m) * 0.5``, the object on neutral grey.

From the scores: ``swap_delta = s(x) - mean s(mixed-same)``, ``nofg_delta = s(x) - s(no-fg)``,
``bg_reliance = |swap_delta| / (|swap_delta| + |nofg_delta|)`` in [0, 1] (1: the score follows
the background; NaN when both deltas are about 0), and for classification ``swap_flip``, the
share of mixed-same copies whose predicted class differs from ``x``'s. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.kernel.baselines import gaussian_blur

__all__ = ["NEUTRAL", "Counterfactuals", "background", "composite", "counterfactual_scores"]

NEUTRAL = 0.5  # the grey behind an only-fg copy, in [0, 1] pixel units
_BLUR_SIGMA = 8.0  # pixels: wide enough that no object shape survives in the fill


def background(image: torch.Tensor, mask: torch.Tensor, fill: str = "mean") -> torch.Tensor:
    """``image`` with its foreground filled: what remains of its background.

    Args:
        image: ``(C, H, W)`` pixels in [0, 1].
        mask: ``(H, W)`` bool foreground.
        fill: ``mean`` (the mean colour of the background pixels) or ``blur`` (that image,
            mean-filled, then blurred, used inside the mask only).

    Returns:
        ``(C, H, W)``; equal to ``image`` outside the mask.
    """
    m = mask.to(image.dtype)  # (H, W)
    keep = 1.0 - m
    area = keep.sum()
    mean = (image * keep).sum(dim=(1, 2)) / area.clamp(min=1.0)  # (C,)
    if float(area) == 0:  # an image that is all foreground has no background colour: grey
        mean = torch.full_like(mean, NEUTRAL)
    filled = image * keep + mean[:, None, None] * m
    if fill == "blur":
        blurred = gaussian_blur(filled[None], _BLUR_SIGMA)[0]
        filled = image * keep + blurred * m
    elif fill != "mean":
        raise ValueError(f"fill must be 'mean' or 'blur', got {fill!r}")
    return filled


def composite(image: torch.Tensor, mask: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """``image`` inside ``mask``, ``back`` outside: ``(C, H, W)``, ``(H, W)``, ``(C, H, W)``."""
    return torch.where(mask[None], image, back)


@dataclass(frozen=True)
class Counterfactuals:
    """Per-image results (tensors of shape ``(N,)`` unless said otherwise)."""

    swap_delta: torch.Tensor
    nofg_delta: torch.Tensor
    rand_delta: torch.Tensor  # NaN without mixed-rand backgrounds
    only_fg_delta: torch.Tensor
    swap_flip: torch.Tensor  # NaN for regression
    bg_reliance: torch.Tensor  # NaN where both deltas are about 0
    swap_scores: torch.Tensor  # (N, S) scores of the mixed-same copies
    pred: torch.Tensor  # (N, 1 + 2S + 1) argmax of [x, same..., rand..., only-fg]; -1 regression


@torch.inference_mode()
def counterfactual_scores(
    scores: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    masks: torch.Tensor,
    same: Sequence[Sequence[torch.Tensor]],
    rand: Sequence[Sequence[torch.Tensor]],
    target: torch.Tensor,
    fill: str = "mean",
    classification: bool = True,
) -> Counterfactuals:
    """Score each image on counterfactual backgrounds.

    Args:
        scores: maps ``(B, C, H, W)`` pixel images to ``(B, O)`` scores (the kernel's forward
            with its task, score and precision).
        images: ``(N, C, H, W)`` pixels in [0, 1].
        masks: ``(N, H, W)`` bool foregrounds.
        same: per image, ``S`` backgrounds ``(C, H, W)`` (already filled) of its own group.
        rand: per image, ``S`` backgrounds of other groups (may be empty lists).
        target: ``(N,)`` output index explained for each image.
        fill: how an image's own foreground is filled for no-fg.
        classification: whether predicted classes (argmax) mean anything.

    Returns:
        :class:`Counterfactuals`.
    """
    n = images.shape[0]
    s_same = len(same[0]) if n else 0
    s_rand = len(rand[0]) if n else 0
    copies = []
    for i in range(n):
        x, m = images[i], masks[i]
        copies.append(x)
        copies += [composite(x, m, b) for b in same[i]]
        copies += [composite(x, m, b) for b in rand[i]]
        copies.append(background(x, m, fill))  # no-fg
        copies.append(composite(x, m, torch.full_like(x, NEUTRAL)))  # only-fg
    per = 1 + s_same + s_rand + 2
    out = scores(torch.stack(copies)) if copies else torch.empty(0, 1)  # (N * per, O)
    out = out.reshape(n, per, -1)
    s = out.gather(2, target.view(n, 1, 1).expand(n, per, 1))[..., 0]  # (N, per)
    s0 = s[:, 0]
    swap = s0 - s[:, 1 : 1 + s_same].mean(dim=1)
    rand_delta = (
        s0 - s[:, 1 + s_same : 1 + s_same + s_rand].mean(dim=1)
        if s_rand
        else torch.full_like(s0, math.nan)
    )
    nofg = s0 - s[:, -2]
    only = s0 - s[:, -1]
    scale = s0.abs().clamp(min=1.0)
    tiny = (swap.abs() < 1e-6 * scale) & (nofg.abs() < 1e-6 * scale)
    reliance = swap.abs() / (swap.abs() + nofg.abs())
    reliance = torch.where(tiny, torch.full_like(reliance, math.nan), reliance)
    pred = out.argmax(dim=2) if classification else torch.full(s.shape, -1)
    flip = (
        (pred[:, 1 : 1 + s_same] != pred[:, :1]).float().mean(dim=1)
        if classification and s_same
        else torch.full_like(s0, math.nan)
    )
    return Counterfactuals(swap, nofg, rand_delta, only, flip, reliance, s[:, 1 : 1 + s_same], pred)
