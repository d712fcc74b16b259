"""Per-group evidence beside the ratio: background reliance from swaps, accuracies, BG-gap,
localisation means, and whether a flag is confirmed.

``bg_reliance`` is averaged over the group's images with a seeded percentile bootstrap interval
(``bg_reliance_low``/``_high``); a flagged group is ``confirmed`` when that interval lies above
0.5, i.e. its scores follow the background more than the object. With integer class labels the
accuracies on the original, mixed-same, mixed-rand and only-foreground images give the BG-gap of
Xiao et al. 2020 (``acc_mixed_same - acc_mixed_rand``). Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pipeline.audit.statistics import finite_mean
from pipeline.schema import COUNTERFACTUAL_METRICS, LOCALISATION_METRICS

__all__ = ["CONFIRM_ABOVE", "EVIDENCE_COLUMNS", "evidence_stats"]

CONFIRM_ABOVE = 0.5  # bg_reliance_low above this confirms a flag
#: per-image columns the aggregation reads for this, when the run stored them
EVIDENCE_COLUMNS = (*LOCALISATION_METRICS, *COUNTERFACTUAL_METRICS)


def _mean_interval(
    values: np.ndarray, confidence: float, bootstrap: int, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Mean of the finite ``values`` with a percentile bootstrap interval (NaN when empty)."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    means = v[rng.integers(0, len(v), size=(bootstrap, len(v)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(v.mean()), float(low), float(high)


def evidence_stats(
    values: Mapping[str, np.ndarray],
    status: str,
    confidence: float,
    bootstrap: int,
    rng: np.random.Generator,
) -> dict[str, float | bool]:
    """The evidence columns of one group's summary row.

    Args:
        values: per-image values of :data:`EVIDENCE_COLUMNS` over the group's ``ok`` rows
            (absent columns count as none).
        status: the group's verdict (only a flagged group can be confirmed).
        confidence, bootstrap, rng: of the ``bg_reliance`` bootstrap interval.

    Returns:
        ``bg_reliance``, ``bg_reliance_low``, ``bg_reliance_high``, ``swap_flip_rate``,
        ``acc_original``, ``acc_mixed_same``, ``acc_mixed_rand``, ``acc_only_fg``, ``bg_gap``,
        ``confirmed`` and ``mean_<metric>`` for each localisation metric.
    """
    empty = np.empty(0)
    mean, low, high = _mean_interval(values.get("bg_reliance", empty), confidence, bootstrap, rng)
    out: dict[str, float | bool] = {
        "bg_reliance": mean,
        "bg_reliance_low": low,
        "bg_reliance_high": high,
        "swap_flip_rate": finite_mean(values.get("swap_flip", empty)),
    }
    for name in ("acc_original", "acc_mixed_same", "acc_mixed_rand", "acc_only_fg"):
        out[name] = finite_mean(values.get(name, empty))
    out["bg_gap"] = float(out["acc_mixed_same"]) - float(out["acc_mixed_rand"])
    out["confirmed"] = bool(status == "flagged" and math.isfinite(low) and low > CONFIRM_ABOVE)
    for name in LOCALISATION_METRICS:
        out[f"mean_{name}"] = finite_mean(values.get(name, empty))
    return out
