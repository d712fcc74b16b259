"""What ``approx_error`` means: the quantile its check windows cover, the bound behind it, and
check windows that are a uniform sample seeded by the image alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.kernel import defaults
from pipeline.kernel.approx_check import (
    CONFIDENCE,
    check_windows,
    covered_quantile,
    error_meaning,
    miss_probability,
)


def _miss(errors: np.ndarray, q: float, n: int) -> tuple[float, int]:
    """Exact probability that ``n`` windows drawn uniformly without replacement all fall below
    the ``q``-quantile of ``errors`` (P,), and how many windows are below it."""
    quantile = np.quantile(errors, q, method="inverted_cdf")
    below = int((errors < quantile).sum())
    p = len(errors)
    return (math.comb(below, n) / math.comb(p, n) if n <= p else 0.0), below


def test_covered_quantile_of_the_default_and_the_old_default():
    assert defaults.APPROX_CHECK_WINDOWS == 29
    assert covered_quantile(29) == 0.9 and 1 - miss_probability(29, 0.9) > CONFIDENCE
    assert covered_quantile(59) == 0.95 and 1 - miss_probability(59, 0.95) > CONFIDENCE
    assert covered_quantile(4) == 0.47  # 4 windows: barely above the median
    assert covered_quantile(28) < 0.9  # 29 is the fewest for the 90th percentile
    assert covered_quantile(0) == 0.0 and miss_probability(0, 0.9) == 1.0
    for n in range(1, 300):  # the stated quantile always keeps the stated confidence
        assert 1 - miss_probability(n, covered_quantile(n)) >= CONFIDENCE, n
    text = error_meaning(29)
    assert "29 check windows" in text and "90th percentile" in text and "0.953" in text
    assert "47th percentile" in error_meaning(4)
    assert "not measured" in error_meaning(0)


@settings(max_examples=200, deadline=None)
@given(
    errors=st.lists(st.integers(0, 6), min_size=1, max_size=150),  # small ints: many ties
    n=st.integers(1, 160),
    q=st.sampled_from([0.47, 0.5, 0.9, 0.95, 0.99]),
)
def test_the_maximum_of_n_windows_misses_the_quantile_with_probability_at_most_q_to_the_n(
    errors, n, q
):
    e = np.asarray(errors, dtype=np.float64)
    miss, below = _miss(e, q, n)
    assert below < q * len(e)  # fewer than q P windows lie below the q-quantile
    assert miss <= miss_probability(n, q) + 1e-12
    if n >= len(e):  # every window checked: the maximum is the largest error
        assert miss == 0.0


def test_check_windows_are_a_uniform_sample_that_covers_the_stated_quantile():
    """2,000 image ids, 121 windows, 29 checks: every window is drawn about 29/121 of the time,
    and the largest of a fixed error vector over each id's windows reaches its 90th percentile
    as often as the bound says (deterministic: fixed ids and seed)."""
    p, n, ids = 121, defaults.APPROX_CHECK_WINDOWS, [f"img-{i}" for i in range(2000)]
    wins = check_windows(p, n, ids, seed=0)  # (2000, 29)
    assert wins.shape == (2000, n)
    counts = np.bincount(wins.flatten().numpy(), minlength=p)
    expected = len(ids) * n / p  # 479 per window
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)  # binomial sd ~19
    errors = np.random.default_rng(0).gamma(1.0, size=p)  # (P,) one image's window errors
    q = covered_quantile(n)
    quantile = np.quantile(errors, q, method="inverted_cdf")
    covered = (errors[wins.numpy()].max(axis=1) >= quantile).mean()
    exact = 1 - _miss(errors, q, n)[0]
    assert exact >= 1 - miss_probability(n, q) >= CONFIDENCE
    assert covered == pytest.approx(exact, abs=0.015)  # sd of the share: 0.004
    # seeded by (seed, image id) alone: the same id gets the same windows in any company
    assert np.array_equal(check_windows(p, n, ids[5:6], 0), wins[5:6])
    assert np.array_equal(check_windows(p, n, ids[::-1], 0).flip(0), wins)
    # the first c of the 29 are what c check windows draw
    fewer = check_windows(p, 4, ids[:50], 0)
    assert all(set(fewer[i].tolist()) <= set(wins[i].tolist()) for i in range(50))
