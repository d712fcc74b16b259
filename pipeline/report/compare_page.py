"""The outputs of ``occlusion-audit compare``: ``compare.parquet``, ``compare.json`` and
``compare.html`` in the look of the report (figures in ``img/``, ``report.js`` beside it).

At a thousand groups the page stays small: the changed groups come first (new flags,
regressions, cleared, improved, each by how far the ratio moved), the chart draws the first
:data:`CHART_GROUPS`, and the table lists every group, sortable and filterable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.compare import Comparison, group_label
from pipeline.data.stored import StoredImages
from pipeline.report.assets import Assets, Card
from pipeline.report.html import environment, fix_quotes, fmt, write_script
from pipeline.report.outdir import join, local_out
from pipeline.report.run_charts import VERDICT_COLORS, dumbbell_chart
from pipeline.report.table import Cell, Column, Filter, Row, Table, num
from pipeline.run.folder import RunFolder
from pipeline.storage.atomic import atomic_write, write_json, write_text
from pipeline.storage.paths import is_uri

__all__ = ["CHART_GROUPS", "write_comparison"]

_SENTENCES = {
    "new-flag": "flagged in B, not in A",
    "regressed": "the ratio fell (B relies more on background)",
    "cleared": "flagged in A, not in B",
    "improved": "the ratio rose (B relies less on background)",
}


#: Verdicts in the order the page lists them: what needs a look first.
_ORDER = {"new-flag": 0, "regressed": 1, "cleared": 2, "improved": 3, "unchanged": 4}
CHART_GROUPS = 40  # groups in the dumbbell chart, changed first
MAX_FINDINGS = 20  # changes named one by one above the table


@dataclass
class _Pair:
    caption: str
    cards: list[Card] = field(default_factory=list)


def _threshold(run: str) -> float:
    record = RunFolder(run).read_record()
    return 1.0 if record is None else record.config.audit.threshold


def _names(run: str, group_by: Sequence[str]) -> dict[str, str]:
    """Run B's class names, when it is grouped by ``label`` and knew them."""
    record = RunFolder(run).read_record()
    return dict(record.class_names) if record is not None and "label" in group_by else {}


def _labels(g: pd.DataFrame, group_by: Sequence[str], names: Mapping[str, str]) -> list[str]:
    out = []
    for r in g[list(group_by)].to_dict("records") if group_by else [{}] * len(g):
        name = names.get(str(r.get("label"))) if names else None
        out.append(group_label(r, group_by) + (f" ({name})" if name else ""))
    return out


def _ordered(c: Comparison) -> pd.DataFrame:
    """The groups, changed first (new flags, regressions, cleared, improved), each by how far
    the ratio moved."""
    g = c.groups.reset_index(drop=True)
    moved = np.abs(np.log(g["change"].to_numpy(dtype=np.float64)))
    keys = pd.DataFrame({"v": g["verdict"].map(_ORDER).fillna(9), "m": -np.nan_to_num(moved)})
    return g.loc[keys.sort_values(["v", "m"], kind="stable").index].reset_index(drop=True)


def _findings(g: pd.DataFrame, labels: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for label, r in zip(labels, g.to_dict("records"), strict=True):
        if r["verdict"] == "unchanged":
            continue
        text = (
            f"{label}: {_SENTENCES[r['verdict']]}, "
            f"{fmt(r['ratio_a'])} -> {fmt(r['ratio_b'])} (x{fmt(r['change'])}, interval "
            f"{fmt(r['change_low'])}-{fmt(r['change_high'])}"
            f"{', paired by image' if r['paired'] else ''})"
        )
        out.append((str(r["verdict"]), text))
    return out


def _root(run: str) -> StoredImages | None:
    record = RunFolder(run).read_record()
    return None if record is None else StoredImages(record.config.dataset)


def _moved(c: Comparison, out: Path) -> list[_Pair]:
    """Each most-moved image in run A and in run B, drawn as the report draws images."""
    pairs = []
    ids = set(c.moved["image_id"])
    frames, assets = {}, {}
    for tag, run in (("A", c.run_a), ("B", c.run_b)):
        assets[tag] = Assets(out, _root(run), tag=tag)
        try:  # only the moved images' rows: their maps are drawn
            frames[tag] = {r["image_id"]: r for r in
                           RunFolder(run).read_maps(image_ids=ids).to_dict("records")}  # fmt: skip
        except FileNotFoundError:
            frames[tag] = {}
    for m in c.moved.to_dict("records"):
        pair = _Pair(
            f"{m['image_id']} ({group_label(m, c.group_by)}): ratio {fmt(m['ratio_a'])} in A, "
            f"{fmt(m['ratio_b'])} in B"
        )
        for tag in ("A", "B"):
            row = frames[tag].get(m["image_id"])
            if row is None:
                continue
            try:
                item = assets[tag].load(row)
            except Exception as e:  # a missing image still leaves the rest of the page
                item = e
            pair.cards.append(assets[tag].card(row, item, f"run {tag}"))
        pairs.append(pair)
    return pairs


@dataclass
class _Page:
    title: str
    run_a: str
    run_b: str
    findings: list[tuple[str, str]]
    more_findings: int
    notes: list[str]
    chart: str
    chart_caption: str
    table: Table
    moved: list[_Pair]
    facts: list[tuple[str, str]]


def _table(g: pd.DataFrame, group_by: Sequence[str], labels: Sequence[str]) -> Table:
    columns = [
        Column("group", "group", "text", text=True),
        Column("images A", "n_a"),
        Column("images B", "n_b"),
        Column("ratio A", "ratio_a"),
        Column("ratio B", "ratio_b"),
        Column("status A", "status_a", text=True),
        Column("status B", "status_b", text=True),
        Column("change B/A", "change"),
        Column("interval", "interval", "none"),
        Column("verdict", "verdict", text=True),
    ]
    rows = []
    for label, r in zip(labels, g.to_dict("records"), strict=True):
        verdict = str(r["verdict"])
        cells = [
            Cell(label, label.lower()),
            Cell(str(r["n_a"]), num(r["n_a"])),
            Cell(str(r["n_b"]), num(r["n_b"])),
            Cell(fmt(r["ratio_a"]), num(r["ratio_a"])),
            Cell(fmt(r["ratio_b"]), num(r["ratio_b"])),
            Cell(str(r["status_a"] or "-")),
            Cell(str(r["status_b"] or "-")),
            Cell(fmt(r["change"]), num(r["change"])),
            Cell(f"{fmt(r['change_low'])}-{fmt(r['change_high'])}"),
            Cell(verdict, str(_ORDER.get(verdict, 9)), badge=verdict),
        ]
        rows.append(Row(cells, verdict))
    present = set(g["verdict"])
    filters = [
        Filter("text", "", "group contains"),
        Filter("choice", "verdict", "verdict", tuple(v for v in _ORDER if v in present)),
        Filter("max", "change", "change ≤"),
        Filter("min", "change", "change ≥"),
        Filter("min", "n_b", "images B ≥"),
    ]
    return Table("compare-table", columns, rows, filters)


def _page(c: Comparison, out: Path) -> _Page:
    g = _ordered(c)
    labels = _labels(g, c.group_by, _names(c.run_b, c.group_by))
    shown = g.head(CHART_GROUPS)
    chart = dumbbell_chart(
        labels[: len(shown)], shown["ratio_a"].tolist(), shown["ratio_b"].tolist(),
        shown["verdict"].tolist(), _threshold(c.run_b),
    )  # fmt: skip
    more = len(g) - len(shown)
    counts = c.summary["counts"]
    notes = [
        ", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(g)} groups.",
        f"The change is the ratio of the geometric means, B over A, with a "
        f"{c.summary.get('confidence', 0.95):.0%} bootstrap interval; a change is reported "
        f"only when the interval lies beyond x{c.summary['min_change']:g} (or its inverse).",
    ]
    facts = [("Run A", c.run_a), ("Run B", c.run_b), ("Group by", ", ".join(c.group_by) or "-")]
    facts += [(k, str(v)) for k, v in c.summary.get("settings", {}).items()]
    findings = _findings(g, labels)
    return _Page(
        title="Occlusion audit comparison",
        run_a=c.run_a,
        run_b=c.run_b,
        findings=findings[:MAX_FINDINGS]
        or [("unchanged", "No group changed its verdict or its ratio.")],
        more_findings=max(0, len(findings) - MAX_FINDINGS),
        notes=notes,
        chart=Assets(out, None).chart("dumbbell", chart),
        chart_caption=(
            "Per group, the geometric-mean fg/bg ratio in run A (open circle) and run B (dot); "
            "changed groups first, then those whose ratio moved most."
            + (f" {more} more groups are in the table." if more else "")
        ),
        table=_table(g, c.group_by, labels),
        moved=_moved(c, out),
        facts=facts,
    )


def write_comparison(c: Comparison, out_dir: str | os.PathLike[str] | None = None) -> Any:
    """Write ``compare.parquet``, ``compare.json`` and ``compare.html``; return the folder.

    Args:
        c: the comparison.
        out_dir: the folder, local or ``s3://``/``gs://`` (default ``RUN_B/compare``).
    """
    target = str(out_dir) if out_dir is not None else join(c.run_b, "compare")
    groups = c.groups.copy()
    for col in c.group_by:
        groups[col] = groups[col].astype("string")
    with local_out(target) as out:
        atomic_write(out / "compare.parquet", lambda p: groups.to_parquet(p, index=False))
        write_json(out / "compare.json", _jsonable(c.summary))
        template = environment().get_template("compare.html.j2")
        page = template.render(page=_page(c, out), root="", verdict_colors=VERDICT_COLORS)
        write_script(out)
        write_text(out / "compare.html", fix_quotes(page))
    return out if not is_uri(target) else target


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return json.loads(json.dumps(value, default=str))
