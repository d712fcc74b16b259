"""Per-group aggregation over hand-built run directories with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.audit.aggregate import aggregate, read_summary
from pipeline.schema import summary_schema
from tests._runfixtures import make_row, spread_ratios, standard_rows, write_run


@pytest.fixture
def standard_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", standard_rows(), ["room"], parts=3)


def _by(df: pd.DataFrame, col: str = "room") -> dict[str, pd.Series]:
    return {row[col]: row for _, row in df.iterrows()}


def test_known_verdicts_counts_and_order(standard_run: Path) -> None:
    df = aggregate(standard_run)
    rooms = _by(df)
    assert {k: v["status"] for k, v in rooms.items()} == {
        "kitchen": "flagged",
        "bath": "ok",
        "hall": "inconclusive",
        "garage": "too-few",
    }
    # flagged, inconclusive, then by geometric mean ascending (garage 0.5 before bath 2)
    assert list(df["room"]) == ["kitchen", "hall", "garage", "bath"]
    k = rooms["kitchen"]
    assert (k["n"], k["n_valid"], k["n_error"], k["n_nan"]) == (52, 48, 2, 2)
    assert k["gmean_ratio"] == pytest.approx(0.5, rel=1e-12)
    assert k["ci_low"] < 0.5 < k["ci_high"] < 1.0
    assert rooms["bath"]["ci_low"] > 1.0
    assert rooms["hall"]["ci_low"] <= 1.0 <= rooms["hall"]["ci_high"]
    assert rooms["hall"]["share_below_1"] == 0.5
    assert list(df.columns) == summary_schema(["room"]).names
    assert df.attrs["audit"]["threshold"] == 1.0


def test_summary_parquet_has_the_declared_schema(standard_run: Path) -> None:
    df = aggregate(standard_run)
    table = pq.read_table(standard_run / "summary.parquet")
    assert table.schema.equals(summary_schema(["room"]))  # names, types, nullability
    stored = read_summary(standard_run)
    pd.testing.assert_frame_equal(stored, df)
    assert stored.attrs == df.attrs
    assert not any(p.name.endswith(".tmp") for p in standard_run.iterdir())


def test_write_false_leaves_the_run_untouched(standard_run: Path) -> None:
    aggregate(standard_run, write=False)
    assert not (standard_run / "summary.parquet").exists()


def test_interval_is_reproducible_and_seeded(standard_run: Path) -> None:
    a = aggregate(standard_run, write=False)
    b = aggregate(standard_run, write=False)
    pd.testing.assert_frame_equal(a, b)
    explicit = aggregate(standard_run, seed=0, write=False)  # run.json's audit.seed is 0
    pd.testing.assert_frame_equal(a, explicit)
    other = aggregate(standard_run, seed=1, write=False)
    assert not np.allclose(a["ci_low"], other["ci_low"])
    pd.testing.assert_series_equal(a["gmean_ratio"], other["gmean_ratio"])


def test_interval_does_not_depend_on_other_groups(tmp_path: Path) -> None:
    rows = standard_rows()
    alone = [r for r in rows if r["room"] == "hall"]
    full = _by(aggregate(write_run(tmp_path / "all", rows, ["room"])))["hall"]
    part = _by(aggregate(write_run(tmp_path / "hall", alone[::-1], ["room"], parts=4)))["hall"]
    assert (full["ci_low"], full["ci_high"]) == (part["ci_low"], part["ci_high"])


def test_bootstrap_interval_matches_normal_theory(tmp_path: Path) -> None:
    n, spread = 400, 0.5
    rows = [
        make_row(f"i{i}", {"room": "a"}, float(r))
        for i, r in enumerate(spread_ratios(1.3, spread, n))
    ]
    run = write_run(tmp_path / "run", rows, ["room"])
    s = aggregate(run, bootstrap=4000).iloc[0]
    half = 1.959964 * spread / math.sqrt(n)  # of the mean log-ratio
    assert math.log(s["ci_low"]) == pytest.approx(math.log(1.3) - half, abs=0.1 * half)
    assert math.log(s["ci_high"]) == pytest.approx(math.log(1.3) + half, abs=0.1 * half)
    narrow = aggregate(run, bootstrap=4000, confidence=0.5, write=False).iloc[0]
    assert s["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < s["ci_high"]


def test_overrides_change_the_verdicts(standard_run: Path) -> None:
    low = _by(aggregate(standard_run, threshold=0.4, write=False))
    assert low["kitchen"]["status"] == "ok"
    assert low["hall"]["status"] == "ok"
    few = _by(aggregate(standard_run, min_images=5, write=False))
    assert few["garage"]["status"] == "flagged"
    assert few["garage"]["n_valid"] == 6


def test_threshold_default_comes_from_run_json(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", standard_rows(), ["room"], audit={"threshold": 0.4})
    df = aggregate(run)
    assert df.attrs["audit"]["threshold"] == 0.4
    assert _by(df)["kitchen"]["status"] == "ok"


def _mixed_rows(n: int = 600, seed: int = 3) -> list[dict]:
    """Random rows over room x cls with NaN, zero, inf ratios, errors and a missing class."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        groups = {
            "room": str(rng.choice(["kitchen", "hall", "bath"])),
            "cls": None if i % 97 == 0 else str(rng.choice(["chair", "lamp"])),
        }
        ratio = float(np.exp(rng.normal(-0.2, 0.7)))
        kind = rng.random()
        if kind < 0.04:
            ratio = math.nan
        elif kind < 0.06:
            ratio = 0.0
        elif kind < 0.07:
            ratio = math.inf
        pos = float(np.exp(rng.normal(0.1, 0.5))) if rng.random() > 0.05 else math.nan
        error = "decode failed" if rng.random() < 0.03 else None
        rows.append(
            make_row(
                f"img-{i:04d}",
                groups,
                ratio,
                fg_share=float(rng.random()),
                fg_area=float(rng.uniform(0.05, 0.6)),
                ratio_pos=pos,
                error=error,
            )
        )
    return rows


def _by_hand(rows: list[dict], group_by: list[str]) -> pd.DataFrame:
    """The statistics of docs/design.md computed directly with pandas from the per-image metrics."""
    df = pd.DataFrame(rows)
    ok = df["status"] == "ok"
    r, rp = df["fg_bg_ratio"].astype(float), df["fg_bg_ratio_pos"].astype(float)
    df["valid"] = ok & np.isfinite(r) & (r > 0)
    df["valid_pos"] = ok & np.isfinite(rp) & (rp > 0)
    out = []
    for key, g in df.groupby(group_by, dropna=False):
        v, vp = g[g["valid"]], g[g["valid_pos"]]
        out.append(
            {
                **{c: (None if pd.isna(k) else k) for c, k in zip(group_by, key, strict=True)},
                "n": len(g),
                "n_valid": len(v),
                "n_error": int((g["status"] == "error").sum()),
                "n_nan": int((g["status"] == "ok").sum() - len(v)),
                "gmean_ratio": float(np.exp(np.log(v["fg_bg_ratio"]).mean())),
                "median_ratio": float(v["fg_bg_ratio"].median()),
                "share_below_1": float((v["fg_bg_ratio"] < 1).mean()),
                "mean_fg_share": float(v["fg_share"].mean()),
                "mean_fg_area": float(v["fg_area"].mean()),
                "gmean_ratio_pos": float(np.exp(np.log(vp["fg_bg_ratio_pos"]).mean())),
                "median_ratio_pos": float(vp["fg_bg_ratio_pos"].median()),
                "share_below_1_pos": float((vp["fg_bg_ratio_pos"] < 1).mean()),
                "mean_fg_share_pos": float(vp["fg_share_pos"].mean()),
            }
        )
    return pd.DataFrame(out)


def test_two_group_columns_match_pandas_by_hand(tmp_path: Path) -> None:
    rows = _mixed_rows()
    run = write_run(tmp_path / "run", rows, ["room", "cls"], parts=4, audit={"min_images": 10})
    got = aggregate(run)
    assert list(got.columns) == summary_schema(["room", "cls"]).names
    expected = _by_hand(rows, ["room", "cls"])
    assert len(got) == len(expected) == 9  # 3 rooms x (2 classes + missing)
    key = ["room", "cls"]
    got_k = got.assign(cls=got["cls"].fillna("<none>")).set_index(key).sort_index()
    exp_k = expected.assign(cls=expected["cls"].fillna("<none>")).set_index(key).sort_index()
    for col in exp_k.columns:
        np.testing.assert_allclose(
            got_k[col].to_numpy(float), exp_k[col].to_numpy(float), rtol=1e-12, err_msg=col
        )
    some = got[got["n_valid"] > 0]
    assert (some["ci_low"] <= some["gmean_ratio"]).all()
    assert (some["gmean_ratio"] <= some["ci_high"]).all()
    assert (some["ci_low_pos"] <= some["gmean_ratio_pos"]).all()
    assert got.loc[got["cls"].isna(), "status"].eq("too-few").all()  # 7 rows per room
    assert int(got["n"].sum()) == len(rows)


def test_many_part_files_give_the_same_answer_as_one(tmp_path: Path) -> None:
    rows = _mixed_rows(900, seed=11)
    one = aggregate(write_run(tmp_path / "one", rows, ["room", "cls"], parts=1), write=False)
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    many = aggregate(write_run(tmp_path / "many", shuffled, ["room", "cls"], parts=37), write=False)
    pd.testing.assert_frame_equal(one, many, check_exact=True)


def test_group_with_only_failures(tmp_path: Path) -> None:
    rows = standard_rows() + [
        make_row(f"attic-{i}", {"room": "attic"}, math.nan, error="unreadable") for i in range(3)
    ]
    attic = _by(aggregate(write_run(tmp_path / "run", rows, ["room"])))["attic"]
    assert (attic["n"], attic["n_valid"], attic["n_error"], attic["n_nan"]) == (3, 0, 3, 0)
    assert attic["status"] == "unreliable"  # every image failed: no verdict stands
    assert math.isnan(attic["gmean_ratio"]) and math.isnan(attic["ci_high"])


def test_group_by_other_stored_column_and_no_run_json(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", standard_rows(), ["room"])
    (run / "run.json").unlink()
    df = aggregate(run, group_by=["label"])
    assert list(df["label"]) == ["1"] and df.iloc[0]["n"] == 138
    with pytest.raises(ValueError, match="group_by"):
        aggregate(run)


def test_actionable_errors(tmp_path: Path, standard_run: Path) -> None:
    with pytest.raises(ValueError, match=r"\['floor'\] not in the stored maps"):
        aggregate(standard_run, group_by=["floor"])
    with pytest.raises(FileNotFoundError, match="occlusion-audit run"):
        aggregate(tmp_path / "empty", group_by=["room"])
    with pytest.raises(ValueError, match="confidence"):
        aggregate(standard_run, confidence=95)
