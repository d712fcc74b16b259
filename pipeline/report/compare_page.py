"""The outputs of ``occlusion-audit compare``: ``compare.parquet``, ``compare.json`` and a
self-contained ``compare.html`` in the look of the report."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.audit.compare import Comparison, group_label
from pipeline.data.stored import StoredImages
from pipeline.report.figures import stored_row_figure
from pipeline.report.html import environment, fmt
from pipeline.report.outdir import join, local_out
from pipeline.report.run_charts import VERDICT_COLORS, dumbbell_chart
from pipeline.run.folder import RunFolder
from pipeline.storage.atomic import atomic_write, write_json, write_text
from pipeline.storage.paths import is_uri

__all__ = ["write_comparison"]

_SENTENCES = {
    "new-flag": "flagged in B, not in A",
    "regressed": "the ratio fell (B relies more on background)",
    "cleared": "flagged in A, not in B",
    "improved": "the ratio rose (B relies less on background)",
}


@dataclass
class _Item:
    caption: str
    png: bytes | None = None
    message: str = ""


@dataclass
class _Pair:
    caption: str
    items: list[_Item] = field(default_factory=list)


def _threshold(run: str) -> float:
    record = RunFolder(run).read_record()
    return 1.0 if record is None else record.config.audit.threshold


def _findings(c: Comparison) -> list[tuple[str, str]]:
    out = []
    for _, r in c.groups.iterrows():
        if r["verdict"] == "unchanged":
            continue
        text = (
            f"{group_label(r, c.group_by)}: {_SENTENCES[r['verdict']]}, "
            f"{fmt(r['ratio_a'])} -> {fmt(r['ratio_b'])} (x{fmt(r['change'])}, interval "
            f"{fmt(r['change_low'])}-{fmt(r['change_high'])}"
            f"{', paired by image' if r['paired'] else ''})"
        )
        out.append((str(r["verdict"]), text))
    return out


def _root(run: str) -> str | None:
    record = RunFolder(run).read_record()
    return None if record is None else StoredImages(record.config.dataset)


def _moved(c: Comparison) -> list[_Pair]:
    pairs = []
    ids = set(c.moved["image_id"])
    frames, roots = {}, {}
    for run in (c.run_a, c.run_b):
        roots[run] = _root(run)
        try:  # only the moved images' rows: their maps are drawn
            frames[run] = RunFolder(run).read_maps(image_ids=ids)
        except FileNotFoundError:
            frames[run] = pd.DataFrame(columns=["image_id"])
    for _, m in c.moved.iterrows():
        pair = _Pair(
            f"{m['image_id']} ({group_label(m, c.group_by)}): ratio {fmt(m['ratio_a'])} in A, "
            f"{fmt(m['ratio_b'])} in B"
        )
        for name, run in (("A", c.run_a), ("B", c.run_b)):
            hit = frames[run][frames[run]["image_id"] == m["image_id"]]
            caption = f"run {name}"
            try:
                png, _ = stored_row_figure(hit.iloc[0].to_dict(), roots[run])
                pair.items.append(_Item(caption, png))
            except Exception as e:  # a missing image still leaves the rest of the page
                pair.items.append(_Item(caption, message=f"cannot draw: {e}"))
        pairs.append(pair)
    return pairs


@dataclass
class _Page:
    title: str
    run_a: str
    run_b: str
    findings: list[tuple[str, str]]
    notes: list[str]
    chart: bytes
    columns: list[str]
    rows: list[tuple[str, list[str]]]
    n_text: int
    moved: list[_Pair]
    facts: list[tuple[str, str]]


def _page(c: Comparison) -> _Page:
    g = c.groups
    labels = [group_label(r, c.group_by) for _, r in g.iterrows()]
    chart = dumbbell_chart(
        labels, g["ratio_a"].tolist(), g["ratio_b"].tolist(), g["verdict"].tolist(),
        _threshold(c.run_b),
    )  # fmt: skip
    columns = [*c.group_by, "images A", "images B", "ratio A", "ratio B", "status A", "status B",
               "change B/A", "interval", "verdict"]  # fmt: skip
    rows = []
    for _, r in g.iterrows():
        cells = [str(r[k]) for k in c.group_by]
        cells += [str(r["n_a"]), str(r["n_b"]), fmt(r["ratio_a"]), fmt(r["ratio_b"])]
        cells += [str(r["status_a"] or "-"), str(r["status_b"] or "-"), fmt(r["change"])]
        cells += [f"{fmt(r['change_low'])}-{fmt(r['change_high'])}", str(r["verdict"])]
        rows.append((str(r["verdict"]), cells))
    counts = c.summary["counts"]
    notes = [
        ", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(g)} groups.",
        f"The change is the ratio of the geometric means, B over A, with a "
        f"{c.summary.get('confidence', 0.95):.0%} bootstrap interval; a change is reported "
        f"only when the interval lies beyond x{c.summary['min_change']:g} (or its inverse).",
    ]
    facts = [("Run A", c.run_a), ("Run B", c.run_b), ("Group by", ", ".join(c.group_by) or "-")]
    facts += [(k, str(v)) for k, v in c.summary.get("settings", {}).items()]
    return _Page(
        title="Occlusion audit comparison",
        run_a=c.run_a,
        run_b=c.run_b,
        findings=_findings(c) or [("unchanged", "No group changed its verdict or its ratio.")],
        notes=notes,
        chart=chart,
        columns=columns,
        rows=rows,
        n_text=len(c.group_by),
        moved=_moved(c),
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
        env = environment()
        env.globals["verdict_colors"] = VERDICT_COLORS
        page = env.get_template("compare.html.j2").render(page=_page(c))
        write_text(out / "compare.html", page)
    return out if not is_uri(target) else target


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return json.loads(json.dumps(value, default=str))
