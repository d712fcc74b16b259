"""Localisation metrics of a map against a foreground mask, as Quantus names and defines them.

So that a user can set our numbers beside papers that report them. Each takes the attribution
``a`` (here the positive part of the channel-mean occlusion map, the evidence *for* the score)
and the mask ``s``, flattened, and follows Quantus 0.6's ``evaluate_batch`` with ``abs=False,
normalise=False``:

- ``relevance_mass_accuracy`` (Arras et al. 2022): ``sum(a[s]) / sum(a)``;
- ``relevance_rank_accuracy`` (Arras et al. 2022): of the ``K = |s|`` highest attributions, the
  share inside ``s``;
- ``pointing_game`` (Zhang et al. 2018): 1 when a pixel holding the maximum attribution lies in
  ``s``, else 0;
- ``attribution_localisation`` (Kohlbrenner et al. 2020): ``sum(a[s]) / (sum(a) + 1e-9)`` over
  positive attributions; NaN where that exceeds 1.

All are NaN for an empty mask. Quantus returns a hit there for the pointing game (its NaN is
cast to a bool); we keep NaN, as for the other three. Plain torch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LOCALISATION_METRICS", "localisation_metrics"]

LOCALISATION_METRICS = (
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "pointing_game",
    "attribution_localisation",
)


def localisation_metrics(attribution: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The four metrics of one map.

    Args:
        attribution: ``(H, W)`` attribution (any sign; the caller chooses, e.g. ``max(map, 0)``).
        mask: ``(H, W)`` bool foreground.

    Returns:
        ``{name: value}`` for :data:`LOCALISATION_METRICS`, each in [0, 1] or NaN.

    Example:
        >>> a = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
        >>> localisation_metrics(a, torch.tensor([[False, False], [True, False]]))["pointing_game"]
        1.0
    """
    a = attribution.detach().reshape(-1).to(torch.float64)
    s = mask.detach().reshape(-1).to(torch.bool)
    k = int(s.sum())
    if k == 0:
        return dict.fromkeys(LOCALISATION_METRICS, math.nan)
    inside, total = float(a[s].sum()), float(a.sum())
    rma = inside / total if total != 0 else math.nan  # 0/0 is NaN, as numpy gives
    # argsort of -a, stable like numpy's default for ties in a quicksort-free way
    order = torch.argsort(-a, stable=True)
    rra = float(s[order[:k]].sum()) / k
    hit = bool(s[a == a.max()].any())
    positive = a.clamp(min=0)
    p_inside, p_total = float(positive[s].sum()), float(positive.sum())
    al = p_inside / (p_total + 1e-9)
    return {
        "relevance_mass_accuracy": rma,
        "relevance_rank_accuracy": rra,
        "pointing_game": 1.0 if hit else 0.0,
        "attribution_localisation": al if al <= 1 else math.nan,
    }
