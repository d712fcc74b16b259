"""The outputs of ``occlusion-audit history``: ``history.parquet`` and a trend page."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.audit.compare import group_label
from pipeline.audit.history import History
from pipeline.report.html import environment, fmt
from pipeline.report.outdir import local_out
from pipeline.report.run_charts import trend_chart
from pipeline.storage.atomic import atomic_write, write_text
from pipeline.storage.paths import is_uri

__all__ = ["write_history"]


@dataclass
class _Page:
    title: str
    lede: str
    chart: bytes
    runs: list[str]
    rows: list[tuple[str, list[tuple[str, str]]]]  # group label, (status, ratio) per run


def _page(h: History) -> _Page:
    t = h.table
    labels = sorted({group_label(r, h.group_by) for _, r in t.iterrows()})
    series, rows = {}, []
    for label in labels:
        per_run = {r["run"]: r for _, r in t.iterrows() if group_label(r, h.group_by) == label}
        nan = float("nan")
        pick = [per_run.get(run) for run in h.runs]
        series[label] = (
            [nan if r is None else r["gmean_ratio"] for r in pick],
            [nan if r is None else r["ci_low"] for r in pick],
            [nan if r is None else r["ci_high"] for r in pick],
            ["" if r is None else r["status"] for r in pick],
        )
        rows.append((label, [("", "") if r is None else (r["status"], fmt(r["gmean_ratio"]))
                             for r in pick]))  # fmt: skip
    return _Page(
        title="Occlusion audit history",
        lede=f"{len(h.runs)} runs, oldest first: {h.runs[0]} to {h.runs[-1]}.",
        chart=trend_chart(h.runs, series, h.threshold),
        runs=h.runs,
        rows=rows,
    )


def write_history(h: History, out_dir: str | os.PathLike[str]) -> Any:
    """Write ``history.parquet`` and ``history.html`` into ``out_dir`` (local or
    ``s3://``/``gs://``); return it."""
    table = h.table.copy()
    for col in h.group_by:
        table[col] = table[col].astype("string")
    with local_out(out_dir) as out:
        atomic_write(out / "history.parquet", lambda p: table.to_parquet(p, index=False))
        html = environment().get_template("history.html.j2").render(page=_page(h))
        write_text(out / "history.html", html)
    return out if not is_uri(str(out_dir)) else str(out_dir)
