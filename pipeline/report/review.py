"""The review queue: the images a curation team looks at first, across groups, and why.

An ``ok`` image is queued for any of three reasons: its fg/bg ratio is below the threshold
(``low ratio``), its prediction changed when its object was pasted onto other backgrounds of
its group (``swap flips``), or ``discover`` put it in a strategy cluster that looks off the
object or at a fixed place (``off-object strategy``). The queue puts images with more reasons
first, then those of flagged groups, then inconclusive and unreliable ones, then the lowest
ratio. The report writes it as ``review.csv`` (formula-escaped) and shows its head; ``export
--to fiftyone`` saves it as a view of the dataset (:data:`REVIEW_VIEW`) and records that in
``RUN_DIR/fiftyone.json``, which the report then names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.statistics import valid_ratios
from pipeline.report.assets import file_key
from pipeline.report.html import fmt
from pipeline.report.table import STATUS_RANK, Cell, Column, Filter, Row, Table, num
from pipeline.schema import STATUS_OK

__all__ = [
    "FIFTYONE_RECORD",
    "REVIEW_VIEW",
    "fiftyone_view",
    "off_object_members",
    "review_queue",
    "review_table",
]

REVIEW_VIEW = "occlusion-review"  # the saved view of a FiftyOne dataset that holds the queue
FIFTYONE_RECORD = "fiftyone.json"  # in the run folder: where the queue was exported to


def off_object_members(strategies: Any) -> dict[str, str]:
    """image id -> its strategy (``<group values>#<cluster> (off the object)``) for the members
    of clusters marked ``off_object`` or ``fixed_place``.

    Args:
        strategies: ``strategies.parquet`` read by
            :func:`~pipeline.report.strategies_section.read_strategies` (``table``,
            ``group_by``), or None.
    """
    if strategies is None or not len(strategies.table):
        return {}
    out: dict[str, str] = {}
    cols = list(strategies.group_by)
    for _, s in strategies.table.iterrows():
        kinds = [k for k, on in (("off the object", s["off_object"]),
                                 ("fixed place", s["fixed_place"])) if on]  # fmt: skip
        if not kinds:
            continue
        name = "/".join(str(s[c]) for c in cols) + f"#{s['cluster']} ({', '.join(kinds)})"
        for image_id in s["members"]:
            out.setdefault(str(image_id), name)
    return out


def review_queue(
    images: pd.DataFrame,
    group_status: Sequence[str] | np.ndarray,
    off_object: Mapping[str, str],
    threshold: float,
    limit: int | None = None,
) -> pd.DataFrame:
    """The queued images, first to look at first.

    Args:
        images: one row per image: ``image_id``, ``status``, ``fg_bg_ratio`` and, when the run
            stored them, ``swap_flip`` and ``bg_reliance``; other columns are kept.
        group_status: the status of each image's group, aligned with ``images``.
        off_object: image id -> strategy, from :func:`off_object_members`.
        threshold: the audit's threshold.
        limit: the most images returned (None: all).

    Returns:
        ``images``' rows that have a reason, in queue order, with ``rank`` (1 first),
        ``group_status``, ``strategy`` and ``why`` (the reasons in words, ``; ``-joined).
    """
    df = images.reset_index(drop=True).copy()
    df["group_status"] = np.asarray(group_status, dtype=object)
    r = df["fg_bg_ratio"].to_numpy(dtype=np.float64, na_value=np.nan)
    flip = _floats(df, "swap_flip")
    ok = (df["status"] == STATUS_OK).to_numpy()
    with np.errstate(invalid="ignore"):
        low = valid_ratios(r, ok) & (r < threshold)
        flips = ok & (flip > 0)
    strategy = df["image_id"].astype(str).map(off_object)
    off = ok & strategy.notna().to_numpy()
    reasons = low.astype(int) + flips.astype(int) + off.astype(int)
    keep = reasons > 0
    df = df.assign(strategy=strategy.where(strategy.notna(), ""), _reasons=-reasons)[keep]
    df["why"] = [
        "; ".join(
            w
            for w, on in (
                (f"low ratio {x:.3g} < {threshold:g}", a),
                (f"swap flips {f:.0%} of its class's backgrounds", b),
                (f"off-object strategy {s}", c),
            )
            if on
        )
        for x, f, s, a, b, c in zip(
            r[keep], flip[keep], df["strategy"], low[keep], flips[keep], off[keep], strict=True
        )
    ]
    df["_status"] = df["group_status"].map(lambda s: STATUS_RANK.get(s, 9))
    df["_ratio"] = np.where(np.isfinite(r[keep]), r[keep], np.inf)
    df = df.sort_values(["_reasons", "_status", "_ratio", "image_id"], kind="stable")
    df = df.drop(columns=["_reasons", "_status", "_ratio"])
    if limit is not None:
        df = df.head(limit)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df.reset_index(drop=True)


def _floats(df: pd.DataFrame, column: str) -> np.ndarray:
    if column not in df.columns:
        return np.full(len(df), np.nan)
    return df[column].to_numpy(dtype=np.float64, na_value=np.nan)


def fiftyone_view(folder: Any) -> dict[str, Any] | None:
    """What ``export --to fiftyone`` recorded in the run folder (``dataset``, ``view``,
    ``images``), or None when the run was not exported there."""
    data = folder.read_file(FIFTYONE_RECORD)
    if data is None:
        return None
    try:
        found = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged record names no view; the queue stands without it
    return found if isinstance(found, dict) and {"dataset", "view"} <= set(found) else None


def review_table(queue: pd.DataFrame, labels: Sequence[str]) -> Table:
    """The index's table of the queue's head: each image links to its card on its group page.

    Args:
        queue: rows of :func:`review_queue` with ``group`` (the summary row) and ``page``.
        labels: each summary row's group in words (indexed by ``group``).
    """
    columns = [
        Column("#", "rank"),
        Column("image", "image", "text", text=True),
        Column("group", "group", "text", text=True),
        Column("group status", "status", text=True),
        Column("fg/bg ratio", "ratio"),
        Column("swap flips", "swap_flip"),
        Column("why", "why", "text", text=True, wrap=True),
    ]
    rows = []
    for _, q in queue.iterrows():
        label = labels[int(q["group"])] if 0 <= int(q["group"]) < len(labels) else ""
        status = str(q["group_status"])
        flip = float(q.get("swap_flip", np.nan))
        cells = [
            Cell(str(q["rank"]), num(q["rank"])),
            Cell(str(q["image_id"]), href=f"{q['page']}#img-{file_key(str(q['image_id']))}"),
            Cell(label, label.lower(), href=q["page"] or None),
            Cell(status, str(STATUS_RANK.get(status, 9)), badge=status),
            Cell(fmt(float(q["fg_bg_ratio"]), 3), num(q["fg_bg_ratio"])),
            Cell("n/a" if flip != flip else f"{flip:.0%}", num(flip)),
            Cell(str(q["why"])),
        ]
        rows.append(Row(cells, status))
    filters = [Filter("text", "", "contains")]
    return Table("review-table", columns, rows, filters)
