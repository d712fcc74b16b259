"""Many groups at once: a one-sided p-value per group and Benjamini-Hochberg q-values.

Flagging each group whose own 95% interval lies below the threshold flags up to 2.5% of the
groups whose true ratio sits at the threshold: on 1,000 classes, about 25 false flags. Instead
each group gets a p-value for "its geometric-mean ratio is below the threshold" (a one-sample
t-test on the log-ratios, one-sided), and the q-values of Benjamini and Hochberg (1995) across
the groups of one audit bound the expected share of false flags among the flagged groups by
``audit.fdr``. Pure numpy and scipy, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["below_threshold_p", "bh_qvalues"]


def below_threshold_p(ratios: np.ndarray, threshold: float) -> float:
    """One-sided p-value of H1 "geometric mean of ``ratios`` < ``threshold``".

    A one-sample t-test of the mean log-ratio against ``log(threshold)``: small when the group's
    ratios sit clearly below the threshold.

    Args:
        ratios: (N,) fg/bg ratios, finite and > 0.
        threshold: the flag threshold (a ratio, > 0).

    Returns:
        The p-value in [0, 1]; NaN with fewer than 2 ratios. With no spread at all it is 0
        below the threshold and 1 otherwise.

    Example:
        >>> round(below_threshold_p(np.array([0.4, 0.5, 0.6, 0.5]), 1.0), 5)
        0.00039
    """
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    n = len(logs)
    if n < 2:
        return math.nan
    diff = logs.mean() - math.log(threshold)
    sd = logs.std(ddof=1)
    if sd == 0 or not math.isfinite(sd):
        return 0.0 if diff < 0 else 1.0
    t = diff / (sd / math.sqrt(n))
    return float(stats.t.cdf(t, df=n - 1))


def bh_qvalues(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of one family of tests.

    NaN p-values (groups without a test) stay NaN and do not count towards the family size.

    Args:
        p_values: (G,) p-values in [0, 1] or NaN.

    Returns:
        (G,) q-values: ``min over k >= rank of p_(k) * m / k``, capped at 1, in input order.

    Example:
        >>> bh_qvalues(np.array([0.01, 0.04, np.nan, 0.03])).round(3).tolist()
        [0.03, 0.04, nan, 0.04]
    """
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full_like(p, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = len(tested)
    if m == 0:
        return q
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q
