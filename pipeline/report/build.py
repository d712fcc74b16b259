"""The shareable data-curation report of a run (see docs/design.md).

Writes ``index.html`` (self-contained), ``summary.csv``, ``flags.csv`` and ``curation.csv``. One
streaming pass over the stored metrics (never the ``delta`` grids) gathers the per-group
histograms, the most background-reliant images of each flagged or inconclusive group and the rows
to review; only those few gallery rows are then read in full to draw their maps. Text cells of the
CSV files are escaped against spreadsheet formula injection (:mod:`~.csv_safe`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.audit.aggregate import (
    aggregate,
    audit_params,
    iter_batches,
    iter_groups,
    read_summary,
)
from pipeline.data.stored import StoredImages
from pipeline.report import html as rh
from pipeline.report.csv_safe import csv_text, escape_formula
from pipeline.report.evidence_section import run_evidence
from pipeline.report.figures import (
    HIST_EDGES,
    distribution_chart,
    log_histogram,
    ratio_chart,
    stored_row_figure,
)
from pipeline.report.outdir import join, local_out, report_dir
from pipeline.report.pool_chart import pool_section
from pipeline.report.strategies_section import strategy_groups
from pipeline.run.folder import RunFolder
from pipeline.run.record import RunRecord
from pipeline.schema import STATUS_OK
from pipeline.storage.atomic import write_text
from pipeline.storage.paths import base_name, is_uri

__all__ = ["escape_formula", "write_report"]

_SCAN_COLUMNS = ("image_id", "path", "status", "error", "fg_bg_ratio", "fg_share", "metric_note")
_REVIEW_STATUSES = ("flagged", "inconclusive")
GroupKey = tuple[str | None, ...]


@dataclass
class _Scan:
    """What one pass over the stored metrics gathers."""

    hists: dict[GroupKey, np.ndarray] = field(default_factory=dict)
    worst: dict[GroupKey, list[tuple[float, str]]] = field(default_factory=dict)  # (ratio, id)
    low: pd.DataFrame | None = None  # the lowest ratios below the threshold, at most `limit`
    n_low: int = 0  # all images below the threshold
    bad: list[pd.DataFrame] = field(default_factory=list)  # undefined ratio or error: all kept


def _key(row: Mapping[str, Any], group_by: Sequence[str]) -> GroupKey:
    return tuple(None if pd.isna(row[c]) else str(row[c]) for c in group_by)


def _scan(
    run_dir: Path,
    group_by: Sequence[str],
    statuses: Mapping[GroupKey, str],
    t: float,
    k: int,
    limit: int | None,
) -> _Scan:
    """Histograms per group, ``k`` lowest ratios per flagged/inconclusive group, rows to review.

    Memory stays bounded by ``limit`` low-ratio rows plus the undefined/error rows.
    """
    scan = _Scan()
    for batch in iter_batches(run_dir, [*_SCAN_COLUMNS, *group_by]):
        ok = pc.equal(batch.column("status"), STATUS_OK).fill_null(False)
        ok = ok.to_numpy(zero_copy_only=False)  # (rows,) bool
        r = batch.column("fg_bg_ratio").cast(pa.float64()).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            valid = ok & np.isfinite(r) & (r > 0)
            low = valid & (r < t)
        group_status = np.empty(batch.num_rows, dtype=object)
        for key, idx in iter_groups(batch, group_by):
            group_status[idx] = statuses.get(key, "")
            v = idx[valid[idx]]
            scan.hists[key] = scan.hists.get(key, 0) + log_histogram(r[v])
            if statuses.get(key) in _REVIEW_STATUSES and k > 0:
                lowest = v[np.argsort(r[v], kind="stable")[:k]]
                ids = batch.column("image_id").take(pa.array(lowest)).to_pylist()
                found = scan.worst.get(key, []) + list(zip(r[lowest].tolist(), ids, strict=True))
                scan.worst[key] = sorted(found)[:k]  # ties in ratio: smallest image_id first
        for keep, is_low in ((low, True), (~valid, False)):
            if not keep.any():
                continue
            part = batch.filter(pa.array(keep)).to_pandas()
            part["group_status"] = group_status[keep]
            if not is_low:
                scan.bad.append(part)
                continue
            scan.n_low += len(part)
            both = part if scan.low is None else pd.concat([scan.low, part], ignore_index=True)
            both = both.sort_values(["fg_bg_ratio", "image_id"], kind="stable")
            scan.low = both if limit is None else both.head(limit)
    return scan


def _curation(scan: _Scan, group_by: Sequence[str], threshold: float) -> pd.DataFrame:
    """Rows to review: low ratios (ascending), then undefined ratios, then errors, with reasons."""
    columns = ["image_id", "path", *group_by, "fg_bg_ratio", "fg_share", "status", "group_status"]
    parts = [p for p in (scan.low, *scan.bad) if p is not None]
    if not parts:
        return pd.DataFrame(columns=[*columns, "reason"])
    df = pd.concat(parts, ignore_index=True)
    r = df["fg_bg_ratio"].astype(float)
    is_ok = (df["status"] == STATUS_OK).to_numpy()
    valid = is_ok & np.isfinite(r.to_numpy()) & (r.to_numpy() > 0)
    undefined = is_ok & ~valid
    reason = np.empty(len(df), dtype=object)
    t = rh.fmt_threshold(threshold)
    reason[valid] = [f"background-reliant: fg/bg ratio {x:.3g} < threshold {t}" for x in r[valid]]
    reason[undefined] = [
        f"undefined ratio: {n}" if isinstance(n, str) and n else "undefined ratio"
        for n in df.loc[undefined, "metric_note"]
    ]
    reason[~is_ok] = [
        f"error: {e}" if isinstance(e, str) else "error" for e in df.loc[~is_ok, "error"]
    ]
    df["reason"] = reason
    df["_rank"] = np.select([valid, is_ok], [0, 1], 2)
    df = df.sort_values(["_rank", "fg_bg_ratio", "image_id"], kind="stable", na_position="last")
    return df[[*columns, "reason"]].reset_index(drop=True)


def _gallery_item(row: Mapping[str, Any], root: Any) -> rh.GalleryImage | rh.GalleryPlaceholder:
    """One gallery figure, or a placeholder that says why it could not be drawn."""
    image_id = str(row["image_id"])
    caption = f"{image_id}: fg/bg ratio {rh.fmt(row['fg_bg_ratio'], 3)}, "
    caption += f"fg_share {rh.fmt(row['fg_share'])} — {row['path']}"
    try:
        png, notes = stored_row_figure(row, root)
    except Exception as exc:  # one unreadable image must not sink the report: show why instead
        return rh.GalleryPlaceholder(f"Could not load {image_id}: {exc}", caption)
    return rh.GalleryImage(png, image_id, caption + "".join(f" [{n}]" for n in notes))


def _galleries(
    run_dir: Path, scan: _Scan, summary: pd.DataFrame, group_by: Sequence[str], root: Any
) -> list[rh.Gallery]:
    ids = sorted({image_id for worst in scan.worst.values() for _, image_id in worst})
    rows: dict[str, dict[str, Any]] = {}
    if ids:  # only these rows are read with their delta grids
        for batch in iter_batches(run_dir, None, filter=pc.field("image_id").isin(ids)):
            rows.update({r["image_id"]: r for r in batch.to_pylist()})
    galleries = []
    for _, srow in summary.iterrows():
        worst = scan.worst.get(_key(srow, group_by))
        if not worst:
            continue
        gallery = rh.Gallery(rh.group_label(srow, group_by), str(srow["status"]))
        for _, image_id in worst:
            gallery.items.append(_gallery_item(rows[image_id], root))
        galleries.append(gallery)
    return galleries


def _charts(
    summary: pd.DataFrame, group_by: Sequence[str], scan: _Scan, params: Mapping, max_groups: int
) -> list[rh.Chart]:
    shown = summary.head(max_groups)
    labels = [rh.group_label(s, group_by) for _, s in shown.iterrows()]
    empty = np.zeros(len(HIST_EDGES) - 1)
    counts = [scan.hists.get(_key(s, group_by), empty) for _, s in shown.iterrows()]
    t, conf = float(params["threshold"]), float(params["confidence"])
    t_text = rh.fmt_threshold(t)
    more = len(summary) - len(shown)
    omitted = f" {more} more groups are in the table only." if more else ""
    ratios = ratio_chart(
        labels, shown["gmean_ratio"], shown["ci_low"], shown["ci_high"], shown["status"], t, conf
    )
    spread = distribution_chart(labels, counts, list(shown["status"]), t)
    return [
        rh.Chart(
            "Geometric-mean fg/bg ratio per group",
            ratios,
            f"Dots: geometric mean of the per-image fg/bg ratios; bars: {conf:.0%} bootstrap "
            f"interval; dashed line: threshold {t_text}. Below the line, background pixels matter "
            f"more to the model than foreground pixels.{omitted}",
        ),
        rh.Chart(
            "Per-image fg/bg ratios per group",
            spread,
            f"Histogram of the valid per-image ratios of each group (log scale, each scaled to "
            f"its peak); dashed line: threshold {t_text}.{omitted}",
        ),
    ]


def _write_tables(
    out: Path, summary: pd.DataFrame, scan: _Scan, group_by: Sequence[str], params: Mapping
) -> list[tuple[str, str]]:
    """Write the three CSV files (formula-escaped); returns the (status, sentence) findings."""
    write_text(out / "summary.csv", csv_text(summary))
    flags = summary[summary["status"].isin(_REVIEW_STATUSES)]
    reasons = [rh.finding_sentence(s, group_by, params) for _, s in flags.iterrows()]
    flags = flags[[*group_by, "status", "n", "n_valid", "gmean_ratio", "ci_low", "ci_high"]]
    flags = flags.assign(
        threshold=float(params["threshold"]), confidence=float(params["confidence"]), reason=reasons
    )
    write_text(out / "flags.csv", csv_text(flags))
    curation = _curation(scan, group_by, float(params["threshold"]))
    write_text(out / "curation.csv", csv_text(curation))
    return list(zip(flags["status"].astype(str), reasons, strict=True))


def _curation_note(scan: _Scan, threshold: float) -> list[str]:
    listed = 0 if scan.low is None else len(scan.low)
    if listed == scan.n_low:
        return []
    return [
        f"curation.csv lists the {listed:,} most background-reliant of the {scan.n_low:,} images "
        f"whose ratio is below the threshold {rh.fmt_threshold(threshold)}."
    ]


def write_report(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    summary: pd.DataFrame | None = None,
    gallery_size: int = 6,
    max_groups: int = 40,
    curation_limit: int | None = 10_000,
) -> Any:
    """Write the data-curation report of a run and return the path of its ``index.html``.

    The run folder and the report folder may be local or in object storage (``s3://``,
    ``gs://``); a report for a bucket is written locally first and each file uploaded whole.

    Args:
        run_dir: run directory (``maps/part-*.parquet``, ``run.json``, ``summary.parquet``).
        out_dir: report folder; default ``config.output.report_dir`` of run.json, else
            ``reports/<run name>/`` under the current working directory.
        summary: per-group summary from :func:`pipeline.audit.aggregate.aggregate`; default
            ``RUN_DIR/summary.parquet``, computed (and written) with the run's defaults if absent.
        gallery_size: most background-reliant images shown per flagged/inconclusive group.
        max_groups: groups drawn in the charts (in summary order: flagged first); all groups
            stay in the table and the CSV files.
        curation_limit: most background-reliant images listed in ``curation.csv`` (``None``:
            every image below the threshold); images with an undefined ratio or an error are
            always all listed after them.

    Returns:
        ``out_dir / "index.html"`` (its URI in object storage); beside it ``summary.csv``,
        ``flags.csv``, ``curation.csv``.

    Example:
        >>> write_report("runs/val-audit")  # doctest: +SKIP
        PosixPath('.../reports/val-audit/index.html')
    """
    folder = RunFolder(run_dir)
    run_dir = folder.path  # a Path, or the URI of a folder in object storage
    record = folder.read_record()  # None: a run folder without run.json
    if summary is None:
        stored = folder.store.exists(folder.SUMMARY)
        summary = read_summary(run_dir) if stored else aggregate(run_dir)
    group_by = list(summary.columns[: list(summary.columns).index("n")])
    params = summary.attrs.get("audit") or audit_params(record, group_by=group_by)
    target = report_dir(out_dir, record, run_dir)
    with local_out(target) as out:  # for a bucket: written locally, then each file uploaded
        index = _write_page(out, folder, run_dir, record, summary, params, group_by, gallery_size,
                            curation_limit, max_groups)  # fmt: skip
    return join(target, "index.html") if is_uri(target) else index


def _write_page(
    out: Path,
    folder: RunFolder,
    run_dir: Any,
    record: RunRecord | None,
    summary: pd.DataFrame,
    params: Mapping[str, Any],
    group_by: list[str],
    gallery_size: int,
    curation_limit: int | None,
    max_groups: int,
) -> Path:
    """Write the page and its tables into the local folder ``out``; return its index."""
    statuses = {_key(s, group_by): str(s["status"]) for _, s in summary.iterrows()}
    t = float(params["threshold"])
    scan = _scan(run_dir, group_by, statuses, t, gallery_size, curation_limit)
    findings = _write_tables(out, summary, scan, group_by, params)
    columns, rows = rh.group_table(summary, group_by)
    root = StoredImages(record.config.dataset) if record is not None else None
    failures = [] if record is None else record.failures
    page = rh.Page(
        title=f"Occlusion audit: {record.name if record is not None else base_name(run_dir)}",
        findings=findings,
        notes=rh.summary_notes(summary, group_by, params) + _curation_note(scan, t),
        table_columns=columns,
        table_rows=rows,
        n_text_columns=len(group_by) + 1,
        charts=_charts(summary, group_by, scan, params, max_groups),
        galleries=_galleries(run_dir, scan, summary, group_by, root),
        evidence=run_evidence(folder, summary, group_by, params, record),
        strategies=strategy_groups(folder, root),
        facts=rh.run_facts(record, params),
        failures=[
            rh.Failure(str(f.get("image_id", "")), str(f.get("error") or "")) for f in failures
        ],
        files=["summary.csv", "flags.csv", "curation.csv"],
        pool=pool_section(record) if record is not None else None,
    )
    index = out / "index.html"
    write_text(index, rh.render_page(page))
    return index
