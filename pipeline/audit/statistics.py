"""Per-group statistics of fg/bg occlusion ratios (docs/design.md, "Statistics").

For one group's per-image fg/bg ratios this computes the geometric-mean ratio with a percentile
bootstrap confidence interval (log-ratios resampled), the median and the share below 1; the
resample generator is seeded by the run seed and the group key alone, so results do not depend on
group order, sharding or batching. :func:`group_status` turns the interval into the group's
verdict (``unreliable``, ``too-few``, ``flagged``, ``inconclusive`` or ``ok``). Pure numpy, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

__all__ = [
    "RATIO_STAT_NAMES",
    "STATUS_ORDER",
    "GroupKey",
    "finite_mean",
    "group_rng",
    "group_status",
    "ratio_stats",
    "valid_ratios",
]

#: A group's key: one value per group column, ``None`` for null.
GroupKey = tuple[str | None, ...]

#: Keys of the dict returned by :func:`ratio_stats`, in order.
RATIO_STAT_NAMES = ("gmean_ratio", "ci_low", "ci_high", "median_ratio", "share_below_1")

#: Sort rank of each verdict: flagged groups first, then inconclusive ones, then the rest.
STATUS_ORDER = {"flagged": 0, "inconclusive": 1, "unreliable": 1, "ok": 2, "too-few": 2}

_BOOT_CELLS = 4_000_000  # resample indices drawn at once; bounds bootstrap memory (~32 MB)


def valid_ratios(ratio: Any, ok: Any = True) -> np.ndarray:
    """Which fg/bg ratios a verdict counts: the image is ``ok`` and its ratio is finite and
    > 0 (a ratio of 0 or infinity has no logarithm). The one definition of a valid image.

    Args:
        ratio: ``(n,)`` ratios (NaN where undefined).
        ok: ``(n,)`` whether each image's status is ``ok`` (True: all are).

    Returns:
        ``(n,)`` bool.
    """
    r = np.asarray(ratio, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.asarray(ok, dtype=bool) & np.isfinite(r) & (r > 0)


def group_rng(seed: int, key: GroupKey, stream: str) -> np.random.Generator:
    """A generator fixed by the run seed, the group key and ``stream`` alone (not by group order).

    Args:
        seed: run seed; taken modulo 2**32.
        key: the group key, one value per group column.
        stream: names the statistic drawing from it (e.g. ``"ratio"``, ``"pos"``), so that two
            statistics of one group draw independent numbers.
    """
    digest = hashlib.sha256(json.dumps([list(key), stream]).encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**32, *words]))


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite entries of ``values`` (shape (N,)), or NaN when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def ratio_stats(
    ratios: np.ndarray, confidence: float, bootstrap: int, rng: np.random.Generator
) -> dict[str, float]:
    """Geometric mean of positive finite ``ratios`` with a percentile bootstrap interval.

    Args:
        ratios: (N,) fg/bg ratios (unitless), all finite and > 0, ideally sorted.
        confidence: interval coverage in (0, 1), e.g. 0.95.
        bootstrap: bootstrap resamples of the log-ratios; at least 1.
        rng: source of the resample indices.

    Returns:
        The keys of ``RATIO_STAT_NAMES``: ``gmean_ratio``, ``ci_low``, ``ci_high`` (interval on
        the geometric mean), ``median_ratio`` and ``share_below_1`` (fraction in [0, 1]); all NaN
        when ``ratios`` is empty.
    """
    n = len(ratios)
    if n == 0:
        return dict.fromkeys(RATIO_STAT_NAMES, math.nan)
    logs = np.log(ratios)
    means = np.empty(bootstrap)  # (bootstrap,) mean log-ratio of each resample
    step = max(1, _BOOT_CELLS // n)
    for start in range(0, bootstrap, step):
        stop = min(start + step, bootstrap)
        means[start:stop] = logs[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {
        "gmean_ratio": float(np.exp(logs.mean())),
        "ci_low": float(np.exp(low)),
        "ci_high": float(np.exp(high)),
        "median_ratio": float(np.median(ratios)),
        "share_below_1": float((ratios < 1.0).mean()),
    }


def group_status(
    n_valid: int,
    ci_low: float,
    ci_high: float,
    threshold: float,
    min_images: int,
    *,
    n: int = 0,
    n_error: int = 0,
    max_error_share: float = 1.0,
    q_value: float = math.nan,
    fdr: float | None = None,
) -> str:
    """A group's verdict from its interval on the geometric-mean ratio.

    Args:
        n_valid: number of valid ratios in the group.
        ci_low: lower end of the interval (unitless ratio).
        ci_high: upper end of the interval.
        threshold: ratio below which a group is flagged.
        min_images: fewest valid ratios for a verdict (at least 1 is always required).
        n: images of the group, errors included.
        n_error: images of the group whose maps failed.
        max_error_share: largest share of failed images that still allows a verdict.
        q_value: the group's Benjamini-Hochberg q-value (:mod:`pipeline.audit.fdr`).
        fdr: with a value, a group is flagged when ``q_value <= fdr``; None: when
            ``ci_high < threshold``.

    Returns:
        ``unreliable`` (more than ``max_error_share`` of the images failed: the valid ones may
        not represent the group), ``too-few`` (fewer than ``min_images`` valid ratios, or a
        non-finite interval), ``flagged`` (``q_value <= fdr``, or ``ci_high < threshold``
        without ``fdr``), ``inconclusive`` (``ci_low <= threshold``), else ``ok``.
    """
    if n > 0 and n_error / n > max_error_share:
        return "unreliable"
    if n_valid < max(1, min_images) or not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "too-few"
    if (q_value <= fdr) if fdr is not None else (ci_high < threshold):
        return "flagged"
    if ci_low <= threshold:
        return "inconclusive"
    return "ok"
