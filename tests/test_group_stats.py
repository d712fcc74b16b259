"""Per-group ratio statistics and verdicts on small hand-computed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.audit.statistics import (
    RATIO_STAT_NAMES,
    finite_mean,
    group_rng,
    group_status,
    ratio_stats,
)


def test_finite_mean_skips_nan_and_inf() -> None:
    assert finite_mean(np.array([1.0, np.nan, 3.0, np.inf, -np.inf])) == 2.0
    assert math.isnan(finite_mean(np.array([np.nan])))
    assert math.isnan(finite_mean(np.empty(0)))


def test_ratio_stats_of_reciprocal_pair() -> None:
    # logs are -ln 2 and +ln 2: geometric mean 1, median 1.25, one of two below 1; every
    # resample mean of the logs lies in [-ln 2, ln 2], so the interval lies in [0.5, 2]
    stats = ratio_stats(np.array([0.5, 2.0]), 0.9, 500, np.random.default_rng(0))
    assert list(stats) == list(RATIO_STAT_NAMES)
    assert stats["gmean_ratio"] == pytest.approx(1.0, abs=1e-15)
    assert stats["median_ratio"] == 1.25
    assert stats["share_below_1"] == 0.5
    assert 0.5 - 1e-12 <= stats["ci_low"] <= 1.0 <= stats["ci_high"] <= 2.0 + 1e-12


def test_ratio_stats_of_constant_ratios_has_a_point_interval() -> None:
    stats = ratio_stats(np.full(5, 0.25), 0.95, 100, np.random.default_rng(1))
    for name in ("gmean_ratio", "ci_low", "ci_high", "median_ratio"):
        assert stats[name] == pytest.approx(0.25, rel=1e-12)
    assert stats["share_below_1"] == 1.0


def test_ratio_stats_of_no_ratios_is_all_nan() -> None:
    stats = ratio_stats(np.empty(0), 0.95, 100, np.random.default_rng(0))
    assert set(stats) == set(RATIO_STAT_NAMES)
    assert all(math.isnan(v) for v in stats.values())


def test_group_rng_depends_on_seed_key_and_stream_only() -> None:
    def draw(seed: int, key: tuple[str | None, ...], stream: str) -> np.ndarray:
        return group_rng(seed, key, stream).integers(0, 2**62, size=4)

    same = draw(3, ("kitchen", None), "ratio")
    assert np.array_equal(same, draw(3, ("kitchen", None), "ratio"))
    assert np.array_equal(same, draw(3 + 2**32, ("kitchen", None), "ratio"))  # seed mod 2**32
    assert not np.array_equal(same, draw(3, ("kitchen", None), "pos"))
    assert not np.array_equal(same, draw(3, ("kitchen", "a"), "ratio"))
    assert not np.array_equal(same, draw(4, ("kitchen", None), "ratio"))


@pytest.mark.parametrize(
    ("n_valid", "ci_low", "ci_high", "expected"),
    [
        (19, 0.1, 0.2, "too-few"),  # below min_images, however clear the interval
        (20, math.nan, 0.2, "too-few"),
        (20, 0.1, math.inf, "too-few"),
        (20, 0.1, 0.99, "flagged"),
        (20, 0.1, 1.0, "inconclusive"),  # ci_high == threshold is not below it
        (20, 1.0, 1.5, "inconclusive"),  # ci_low == threshold still overlaps it
        (20, 1.01, 1.5, "ok"),
    ],
)
def test_group_status(n_valid: int, ci_low: float, ci_high: float, expected: str) -> None:
    assert group_status(n_valid, ci_low, ci_high, threshold=1.0, min_images=20) == expected


def test_group_status_needs_one_valid_ratio_even_with_min_images_zero() -> None:
    assert group_status(0, 0.1, 0.2, threshold=1.0, min_images=0) == "too-few"
    assert group_status(1, 0.1, 0.2, threshold=1.0, min_images=0) == "flagged"
