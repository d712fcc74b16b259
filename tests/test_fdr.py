"""Many groups: p-values and q-values against scipy, and false flags under simulation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pipeline.audit import aggregate
from pipeline.audit.fdr import below_threshold_p, bh_qvalues
from pipeline.audit.statistics import group_status, ratio_stats
from tests._runfixtures import make_row, write_run


def test_p_values_equal_scipys_one_sided_t_test():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 60))
        ratios = np.exp(rng.normal(rng.normal(0, 0.5), rng.uniform(0.1, 1.5), n))
        threshold = float(rng.uniform(0.5, 2.0))
        ref = stats.ttest_1samp(np.log(ratios), math.log(threshold), alternative="less").pvalue
        assert below_threshold_p(ratios, threshold) == pytest.approx(ref, rel=1e-10, abs=1e-15)
    assert math.isnan(below_threshold_p(np.array([0.5]), 1.0))
    assert below_threshold_p(np.full(5, 0.5), 1.0) == 0.0  # no spread, clearly below
    assert below_threshold_p(np.full(5, 2.0), 1.0) == 1.0


def test_q_values_equal_scipys_benjamini_hochberg():
    rng = np.random.default_rng(1)
    for m in (1, 2, 7, 50, 400):
        p = rng.uniform(0, 1, m) ** 3
        np.testing.assert_allclose(bh_qvalues(p), stats.false_discovery_control(p), rtol=1e-12)
    with_nan = np.array([0.01, np.nan, 0.02, 0.5])
    expected = stats.false_discovery_control(with_nan[~np.isnan(with_nan)])
    got = bh_qvalues(with_nan)
    assert math.isnan(got[1]) and np.allclose(got[[0, 2, 3]], expected)


def _verdicts(ratios_per_group, threshold: float, fdr: float | None, seed: int) -> list[str]:
    """The flag decision of ``aggregate`` for simulated groups (same functions, no files)."""
    rng = np.random.default_rng(seed)
    cis = [ratio_stats(np.sort(r), 0.95, 500, rng) for r in ratios_per_group]
    q = bh_qvalues(np.array([below_threshold_p(r, threshold) for r in ratios_per_group]))
    return [
        group_status(len(r), c["ci_low"], c["ci_high"], threshold, 20, q_value=qv, fdr=fdr)
        for r, c, qv in zip(ratios_per_group, cis, q, strict=True)
    ]


def _groups(rng, n_null: int, n_biased: int, n: int = 30, sd: float = 0.8):
    null = [np.exp(rng.normal(0.0, sd, n)) for _ in range(n_null)]  # true ratio = threshold
    biased = [np.exp(rng.normal(math.log(0.5), sd, n)) for _ in range(n_biased)]
    return null + biased


def test_false_flags_stay_at_the_nominal_rate_and_biased_groups_are_found():
    rng = np.random.default_rng(2)
    audits, per_group_flags, fdr_any_false = 20, 0, 0
    fdp, power = [], []
    for a in range(audits):
        groups = _groups(rng, n_null=200, n_biased=0)
        per_group_flags += _verdicts(groups, 1.0, None, a).count("flagged")
        fdr_any_false += "flagged" in _verdicts(groups, 1.0, 0.05, a)
        mixed = _groups(rng, n_null=180, n_biased=20)
        flagged = np.array(_verdicts(mixed, 1.0, 0.05, a)) == "flagged"
        fdp.append(flagged[:180].sum() / max(1, flagged.sum()))
        power.append(flagged[180:].mean())
    # the per-group rule flags about 2.5% of 200 null groups per audit; BH controls the
    # chance of any false flag among only null groups at 5%
    assert per_group_flags / audits >= 2.0
    assert fdr_any_false <= 3  # expected 1 in 20
    assert np.mean(fdp) <= 0.05 + 0.02  # false discovery proportion, averaged over audits
    assert np.mean(power) >= 0.95  # clearly biased groups are still found


def test_summary_stores_p_and_q_values_and_null_restores_the_interval_rule(tmp_path: Path):
    rng = np.random.default_rng(3)
    rows = []
    for g in range(40):
        center = 0.5 if g < 4 else 1.0
        for i, r in enumerate(np.exp(rng.normal(math.log(center), 0.8, 30))):
            rows.append(make_row(f"g{g}-{i}", {"room": f"room{g:02d}"}, float(r)))
    run = write_run(tmp_path / "run", rows, ["room"])
    summary = aggregate(run, write=False)
    assert {"p_value", "q_value"} <= set(summary.columns)
    flagged = set(summary.loc[summary["status"] == "flagged", "room"])
    assert flagged == {"room00", "room01", "room02", "room03"}
    assert (summary.loc[summary["status"] == "flagged", "q_value"] <= 0.05).all()
    q = bh_qvalues(summary["p_value"].to_numpy())
    np.testing.assert_allclose(summary["q_value"], q)
    per_group = aggregate(run, write=False, fdr="off")
    by_ci = per_group.loc[per_group["ci_high"] < 1.0, "room"]
    assert set(per_group.loc[per_group["status"] == "flagged", "room"]) == set(by_ci)
    rows_before = aggregate(run, write=False, fdr=0.5)
    assert (rows_before["status"] == "flagged").sum() >= len(flagged)
