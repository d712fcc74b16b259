"""Two runs side by side: per group, how the fg/bg ratio moved, and a verdict on it.

For model v1 against v2, or last night against tonight. Per group the change is the ratio of
the two geometric means (B over A: above 1, B looks more at the foreground) with a seeded
bootstrap interval, paired by ``image_id`` when both runs audited the same images of the group
(resampling per-image log-ratio differences), unpaired otherwise. Verdicts, first match wins:

- ``new-flag``: flagged in B, not in A; ``cleared``: flagged in A, not in B;
- ``improved``: the interval lies above ``min_change`` (B relies less on background);
- ``regressed``: the interval lies below ``1 / min_change``;
- ``unchanged``: otherwise. Two models trained apart never give exactly equal ratios; a change
  smaller than ``min_change`` (default 1.5x) is not reported as one.

Runs whose maps are not comparable (other window, stride, baseline, image size) are refused
unless forced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.aggregate import aggregate, iter_batches
from pipeline.audit.statistics import group_rng, valid_ratios
from pipeline.config.typed import to_plain
from pipeline.run.folder import RunFolder
from pipeline.run.record import RunRecord

__all__ = ["VERDICTS", "CompareError", "Comparison", "compare_runs", "map_settings"]

VERDICTS = ("new-flag", "regressed", "cleared", "improved", "unchanged")
_BAD = ("new-flag", "regressed")


class CompareError(ValueError):
    """The two runs cannot be compared (other map settings, no record); the message says why."""


@dataclass
class Comparison:
    """The result of :func:`compare_runs`.

    Attributes:
        groups: one row per group: group columns, ``n_a``, ``n_b``, ``ratio_a``, ``ratio_b``,
            ``status_a``, ``status_b``, ``change`` with ``change_low``/``change_high``,
            ``paired``, ``verdict``.
        moved: the images whose ratio moved most (``image_id``, group columns, ``ratio_a``,
            ``ratio_b``, ``change``), largest ``|log change|`` first.
        summary: JSON-ready facts: the runs, counts and group labels per verdict.
    """

    groups: pd.DataFrame
    moved: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    group_by: tuple[str, ...] = ()
    run_a: str = ""
    run_b: str = ""


def map_settings(record: RunRecord) -> dict[str, Any]:
    """The settings that make two runs' maps and ratios comparable."""
    cfg = record.config
    occ = to_plain(cfg.occlusion)
    keep = ("mode", "window", "stride", "n_baselines", "baseline", "value", "blur_sigma")
    unused = cfg.occlusion.unused_settings  # they change nothing in this mode's maps
    keep = tuple(k for k in keep if k not in unused)
    return {
        **{f"occlusion.{k}": occ[k] for k in keep},
        "dataset.image_size": list(cfg.dataset.image_size),
        "audit.boundary_px": cfg.audit.boundary_px,
    }


def _check(a: RunRecord | None, b: RunRecord | None, force: bool) -> None:
    if force:
        return
    if a is None or b is None:
        missing = "A" if a is None else "B"
        raise CompareError(f"run {missing} has no run.json to check its settings; use --force")
    sa, sb = map_settings(a), map_settings(b)
    diff = [f"{k} ({sa[k]!r} -> {sb[k]!r})" for k in sa if sa[k] != sb[k]]
    if diff:
        raise CompareError(
            "the runs' maps are not comparable, their settings differ: "
            + "; ".join(diff)
            + " (--force compares them anyway)"
        )


def _ratios(run: RunFolder, group_by: Sequence[str]) -> pd.DataFrame:
    """Per-image valid ratios (``status ok``, finite, > 0) with ids and group columns."""
    cols = [*group_by, "image_id", "status", "fg_bg_ratio"]
    frames = [b.to_pandas() for b in iter_batches(run, cols)]
    df = pd.concat(frames, ignore_index=True)
    valid = valid_ratios(df["fg_bg_ratio"], df["status"] == "ok")
    return df.loc[valid, [*group_by, "image_id", "fg_bg_ratio"]]


def _change(
    a: pd.DataFrame, b: pd.DataFrame, key: tuple, seed: int, bootstrap: int, confidence: float
) -> tuple[float, float, float, bool]:
    """Ratio of geometric means B/A with a bootstrap interval, and whether it was paired."""
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan, False
    rng = group_rng(seed, key, "compare")
    ids_a, ids_b = a["image_id"].tolist(), b["image_id"].tolist()
    paired = set(ids_a) == set(ids_b)
    if paired:
        # B's ratio of each of A's images, in A's order (what an inner merge on the id gives,
        # without a DataFrame merge per group: a thousand groups cost seconds that way)
        at = {image_id: k for k, image_id in enumerate(ids_b)}
        rb = b["fg_bg_ratio"].to_numpy()[[at[i] for i in ids_a]]
        d = np.log(rb) - np.log(a["fg_bg_ratio"].to_numpy())
        boot = d[rng.integers(0, len(d), size=(bootstrap, len(d)))].mean(axis=1)
        est = float(d.mean())
    else:
        la, lb = np.log(a["fg_bg_ratio"].to_numpy()), np.log(b["fg_bg_ratio"].to_numpy())
        ia = rng.integers(0, len(la), size=(bootstrap, len(la)))
        ib = rng.integers(0, len(lb), size=(bootstrap, len(lb)))
        boot = lb[ib].mean(axis=1) - la[ia].mean(axis=1)
        est = float(lb.mean() - la.mean())
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return math.exp(est), math.exp(low), math.exp(high), paired


def _verdict(status_a: Any, status_b: Any, low: float, high: float, min_change: float) -> str:
    if status_b == "flagged" and status_a != "flagged":
        return "new-flag"
    if status_a == "flagged" and status_b != "flagged":
        return "cleared"
    if math.isfinite(low) and low > min_change:
        return "improved"
    if math.isfinite(high) and high < 1 / min_change:
        return "regressed"
    return "unchanged"


def compare_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    *,
    group_by: Sequence[str] | None = None,
    force: bool = False,
    min_change: float = 1.5,
    confidence: float = 0.95,
    bootstrap: int = 2000,
    seed: int = 0,
    top: int = 8,
) -> Comparison:
    """Compare run B against run A, group by group.

    Args:
        run_a, run_b: run folders (A the reference: last night, or model v1).
        group_by: group columns (default: run A's ``dataset.group_by``).
        force: compare runs whose map settings differ.
        min_change: smallest factor of change reported as improved or regressed (> 1).
        confidence: coverage of the change's bootstrap interval.
        bootstrap, seed: bootstrap resamples and seed (with the group key).
        top: how many most-moved images to return.

    Raises:
        CompareError: the settings differ (without ``force``), or a run has no record.
        FileNotFoundError: a folder holds no maps.
    """
    if not min_change >= 1:
        raise ValueError(f"min_change must be >= 1, got {min_change}")
    fa, fb = RunFolder.of(run_a), RunFolder.of(run_b)  # each folder listed once
    rec_a, rec_b = fa.read_record(), fb.read_record()
    _check(rec_a, rec_b, force)
    if group_by is None:
        group_by = rec_a.config.dataset.group_by if rec_a is not None else ()
    group_by = tuple(group_by)
    sa = aggregate(fa, group_by=group_by or None, write=False)
    sb = aggregate(fb, group_by=group_by or None, write=False)
    ra, rb = _ratios(fa, group_by), _ratios(fb, group_by)
    parts = [_by_key(df, group_by) for df in (sa, sb, ra, rb)]
    keys = sorted(set(parts[0]) | set(parts[1]), key=lambda k: [(v is None, str(v)) for v in k])
    rows = [_group_row(k, parts, seed, bootstrap, confidence, min_change) for k in keys]
    groups = pd.DataFrame(rows, columns=[*group_by, *_COLUMNS])
    moved = _moved(ra, rb, group_by, top)
    summary = _summary(groups, group_by, str(run_a), str(run_b), min_change)
    summary["confidence"] = confidence
    summary["settings"] = map_settings(rec_b) if rec_b is not None else {}
    return Comparison(groups, moved, summary, group_by, str(run_a), str(run_b))


_COLUMNS = ["n_a", "n_b", "ratio_a", "ratio_b", "status_a", "status_b", "change", "change_low",
            "change_high", "paired", "verdict"]  # fmt: skip


def _by_key(df: pd.DataFrame, group_by: Sequence[str]) -> dict[tuple, pd.DataFrame]:
    """The rows of each group, keyed by the group's values (``None`` for a missing value)."""
    if not group_by:
        return {(): df}
    out = {}
    for k, part in df.groupby(list(group_by), dropna=False, sort=False):
        values = k if isinstance(k, tuple) else (k,)
        out[tuple(None if pd.isna(v) else v for v in values)] = part
    return out


def _group_row(
    key: tuple,
    parts: Sequence[dict[tuple, pd.DataFrame]],
    seed: int,
    bootstrap: int,
    confidence: float,
    min_change: float,
) -> list:
    empty = pd.DataFrame(columns=["image_id", "fg_bg_ratio", "status", "gmean_ratio"])
    a, b, ia, ib = (p.get(key, empty) for p in parts)
    status_a = a["status"].iloc[0] if len(a) else None
    status_b = b["status"].iloc[0] if len(b) else None
    ratio_a = float(a["gmean_ratio"].iloc[0]) if len(a) else math.nan
    ratio_b = float(b["gmean_ratio"].iloc[0]) if len(b) else math.nan
    change, low, high, paired = _change(ia, ib, key, seed, bootstrap, confidence)
    verdict = _verdict(status_a, status_b, low, high, min_change)
    return [*key, len(ia), len(ib), ratio_a, ratio_b, status_a, status_b, change, low, high,
            paired, verdict]  # fmt: skip


def _moved(ra: pd.DataFrame, rb: pd.DataFrame, group_by: Sequence[str], top: int) -> pd.DataFrame:
    both = ra.merge(rb[["image_id", "fg_bg_ratio"]], on="image_id", suffixes=("_a", "_b"))
    both = both.rename(columns={"fg_bg_ratio_a": "ratio_a", "fg_bg_ratio_b": "ratio_b"})
    both["change"] = both["ratio_b"] / both["ratio_a"]
    order = np.argsort(-np.abs(np.log(both["change"].to_numpy())), kind="stable")
    return both.iloc[order[:top]].reset_index(drop=True)


def group_label(row: Any, group_by: Sequence[str]) -> str:
    """``room=kitchen, class=3``; ``all`` without group columns."""
    return ", ".join(f"{g}={row[g]}" for g in group_by) or "all"


def _summary(groups: pd.DataFrame, group_by, run_a: str, run_b: str, min_change: float) -> dict:
    by_verdict = {
        v: [group_label(r, group_by) for _, r in groups[groups["verdict"] == v].iterrows()]
        for v in VERDICTS
    }
    return {
        "run_a": run_a,
        "run_b": run_b,
        "group_by": list(group_by),
        "min_change": min_change,
        "counts": {v: len(g) for v, g in by_verdict.items()},
        "groups": by_verdict,
        "flagged_b": [
            group_label(r, group_by) for _, r in groups[groups["status_b"] == "flagged"].iterrows()
        ],
        "bad": sum(len(by_verdict[v]) for v in _BAD),
    }
