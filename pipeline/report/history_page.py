"""The outputs of ``occlusion-audit history``: ``history.parquet`` and a trend page.

The page scales with groups: one pass pivots the history into a row per group (linear in rows),
the chart draws the groups that changed most (:data:`CHART_GROUPS`), and the table lists every
group, changed ones first, sortable and filterable by ``report.js``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.compare import group_label
from pipeline.audit.history import History
from pipeline.report.assets import Assets
from pipeline.report.html import environment, fix_quotes, fmt, write_script
from pipeline.report.outdir import local_out
from pipeline.report.run_charts import trend_chart
from pipeline.report.table import STATUS_RANK, Cell, Column, Filter, Row, Table, num
from pipeline.storage.atomic import atomic_write, write_text
from pipeline.storage.paths import is_uri

__all__ = ["CHART_GROUPS", "TABLE_RUNS", "write_history"]

CHART_GROUPS = 12  # groups drawn in the trend chart, the most changed first
TABLE_RUNS = 12  # the newest runs given a column of the table (history.parquet has them all)


@dataclass
class _Page:
    title: str
    lede: str
    chart: str
    caption: str
    table: Table


def _per_group(h: History) -> pd.DataFrame:
    """One row per group: its label, its ``(status, ratio, ci_low, ci_high)`` per run (None
    where absent), how often its status changed and the ratio's change from its first run to
    its last; the groups whose status changed most often first, then those that moved most."""
    t = h.table.reset_index(drop=True)
    keys = [tuple(None if pd.isna(v) else str(v) for v in vals)
            for vals in t[list(h.group_by)].itertuples(index=False)]  # fmt: skip
    runs = {run: i for i, run in enumerate(h.runs)}
    cells: dict[tuple, list[Any]] = {}
    columns = [t[c] for c in ("run", "status", "gmean_ratio", "ci_low", "ci_high")]
    for key, run, status, ratio, low, high in zip(keys, *columns, strict=True):
        per_run = cells.setdefault(key, [None] * len(h.runs))
        per_run[runs[run]] = (str(status), float(ratio), float(low), float(high))
    out = []
    names = dict(getattr(h, "class_names", None) or {})
    for key, per_run in cells.items():
        values = dict(zip(h.group_by, key, strict=True))
        label = group_label(values, h.group_by) or "all"
        name = names.get(values.get("label") or "") if "label" in h.group_by else None
        seen = [c for c in per_run if c is not None]
        statuses = [c[0] for c in seen]
        ratios = [c[1] for c in seen if math.isfinite(c[1]) and c[1] > 0]
        change = ratios[-1] / ratios[0] if len(ratios) >= 2 else math.nan
        out.append(
            {
                "label": f"{label} ({name})" if name else label,
                "cells": per_run,
                "flips": sum(a != b for a, b in itertools.pairwise(statuses)),
                "change": change,
                "latest": seen[-1][0] if seen else "",
            }
        )
    df = pd.DataFrame(out)
    moved = np.abs(np.log(df["change"].to_numpy(dtype=np.float64)))
    df["_moved"] = np.nan_to_num(moved, nan=-1.0)
    df = df.sort_values(["flips", "_moved", "label"], ascending=[False, False, True])
    return df.reset_index(drop=True)


def _table(h: History, groups: pd.DataFrame) -> Table:
    shown = h.runs[-TABLE_RUNS:]
    first = len(h.runs) - len(shown)
    columns = [Column("group", "group", "text", text=True)]
    columns += [Column(run, f"run:{k}", "num") for k, run in enumerate(shown, start=first)]
    columns += [Column("latest status", "status", text=True), Column("change", "change"),
                Column("status changes", "flips")]  # fmt: skip
    rows = []
    for g in groups.itertuples(index=False):
        cells = [Cell(g.label, g.label.lower())]
        for c in g.cells[first:]:
            cells.append(Cell("-") if c is None else Cell(fmt(c[1]), num(c[1]), badge=c[0]))
        status = g.latest
        cells.append(Cell(status, str(STATUS_RANK.get(status, 9)), badge=status))
        cells += [Cell(fmt(g.change), num(g.change)), Cell(str(g.flips), num(g.flips))]
        rows.append(Row(cells, flags={"changed": "yes"} if g.flips else {}))
    present = set(groups["latest"])
    filters = [
        Filter("text", "", "group contains"),
        Filter("choice", "status", "latest status", tuple(s for s in STATUS_RANK if s in present)),
        Filter("flag", "changed", "status changed"),
        Filter("min", "flips", "status changes ≥"),
    ]
    return Table("history-table", columns, rows, filters)


def _page(h: History, assets: Assets) -> _Page:
    groups = _per_group(h)
    top = groups.head(CHART_GROUPS)
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[str]]] = {}
    for g in top.itertuples(index=False):
        per = [c if c is not None else ("", math.nan, math.nan, math.nan) for c in g.cells]
        ratios, lows, highs = ([float(c[k]) for c in per] for k in (1, 2, 3))
        series[str(g.label)] = (ratios, lows, highs, [str(c[0]) for c in per])
    more = len(groups) - len(top)
    caption = (
        "Each charted group's geometric-mean fg/bg ratio per run; the dots are coloured by the "
        "group's verdict in that run. The groups whose verdict changed most often come first, "
        "then those whose ratio moved most."
        + (f" {more} more groups are in the table." if more else "")
    )
    return _Page(
        title="Occlusion audit history",
        lede=(
            f"{len(h.runs)} runs, oldest first: {h.runs[0]} to {h.runs[-1]}; {len(groups)} groups."
        ),
        chart=assets.chart("trend", trend_chart(h.runs, series, h.threshold)),
        caption=caption,
        table=_table(h, groups),
    )


def write_history(h: History, out_dir: str | os.PathLike[str]) -> Any:
    """Write ``history.parquet``, ``history.html`` (with ``report.js`` and ``img/``) into
    ``out_dir`` (local or ``s3://``/``gs://``); return it."""
    table = h.table.copy()
    for col in h.group_by:
        table[col] = table[col].astype("string")
    with local_out(out_dir) as out:
        atomic_write(out / "history.parquet", lambda p: table.to_parquet(p, index=False))
        page = _page(h, Assets(out, None))
        html = environment().get_template("history.html.j2").render(page=page, root="")
        write_script(out)
        write_text(out / "history.html", fix_quotes(html))
    return out if not is_uri(str(out_dir)) else str(out_dir)
