"""The shareable data-curation report of a run (see docs/design.md, "Report folder").

Writes ``index.html`` (findings, the table of every group, the review queue, charts and the
first groups' evidence), one page per group in ``groups/``, the figures in ``img/``,
``report.js`` (sorting, filtering, map opacity; static, no data) and the CSV files
``summary.csv``, ``flags.csv``, ``curation.csv`` and ``review.csv``. One streaming pass over the
stored metrics (never the ``delta`` grids) gathers what every page lists; only the drawn images
are read again with their grids. Cost grows linearly with images and groups, and the index's
size with groups only: galleries, evidence and strategies on it are capped (:class:`Limits`).
Text cells of the CSV files are escaped against spreadsheet formula injection
(:mod:`~.csv_safe`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.aggregate import aggregate, audit_params, read_summary
from pipeline.data.stored import StoredImages
from pipeline.report import html as rh
from pipeline.report.assets import Assets
from pipeline.report.csv_safe import csv_text, escape_formula
from pipeline.report.facts import run_facts
from pipeline.report.figures import distribution_chart, ratio_chart
from pipeline.report.group_pages import GroupView, Limits, build_group_pages
from pipeline.report.names import GroupNames, group_key
from pipeline.report.outdir import join, local_out, report_dir
from pipeline.report.pool_chart import pool_section
from pipeline.report.review import fiftyone_view, off_object_members, review_queue, review_table
from pipeline.report.scan import Scan, curation, scan_run
from pipeline.report.strategies_section import marked, other_grouping, read_strategies
from pipeline.report.table import group_table
from pipeline.run.folder import RunFolder
from pipeline.run.record import RunRecord
from pipeline.storage.atomic import write_text
from pipeline.storage.paths import base_name, is_uri

__all__ = ["Limits", "escape_formula", "write_report"]


@dataclass(frozen=True)
class _Context:
    """What every part of one report reads."""

    run_dir: Any
    summary: pd.DataFrame
    group_by: list[str]
    params: Mapping[str, Any]
    names: GroupNames
    assets: Assets
    strategies: Any
    fill: str
    title: str
    rows: list[dict[str, Any]]  # the summary's rows
    labels: list[str]  # each group in words
    pages: list[str]  # each group's page
    classes: list[str | None]  # each group's class name, when known


def _charts(ctx: _Context, scan: Scan, max_groups: int) -> list[rh.Chart]:
    summary, params = ctx.summary, ctx.params
    shown = summary.head(max_groups)
    labels = ctx.labels[: len(shown)]
    counts = list(scan.hists[: len(shown)])
    t, conf = float(params["threshold"]), float(params["confidence"])
    t_text = rh.fmt_threshold(t)
    more = len(summary) - len(shown)
    omitted = f" {more} more groups are in the table only." if more else ""
    ratios = ratio_chart(
        labels, shown["gmean_ratio"], shown["ci_low"], shown["ci_high"], shown["status"], t, conf
    )
    spread = distribution_chart(labels, counts, list(shown["status"]), t)
    charts = [
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
    return [replace(c, src=ctx.assets.chart(f"chart-{k}", c.png)) for k, c in enumerate(charts)]


def _write_tables(
    out: Path, ctx: _Context, scan: Scan, limits: Limits
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Write summary, flags and curation CSVs (formula-escaped); return the findings
    ``(status, sentence, group page)`` and the curation note."""
    summary, group_by, params = ctx.summary, ctx.group_by, ctx.params
    write_text(out / "summary.csv", csv_text(summary))
    flagged = np.flatnonzero(summary["status"].isin(rh.REVIEW).to_numpy())
    flags = summary.iloc[flagged]
    reasons = [rh.finding_sentence(ctx.rows[k], group_by, params, ctx.labels[k]) for k in flagged]
    pages = [ctx.pages[k] for k in flagged]
    flags = flags[[*group_by, "status", "n", "n_valid", "gmean_ratio", "ci_low", "ci_high"]]
    flags = flags.assign(
        threshold=float(params["threshold"]), confidence=float(params["confidence"]), reason=reasons
    )
    write_text(out / "flags.csv", csv_text(flags))
    t = float(params["threshold"])
    rows, n_low = curation(scan, group_by, list(summary["status"].astype(str)), t,
                           limits.curation_limit, rh.fmt_threshold(t))  # fmt: skip
    write_text(out / "curation.csv", csv_text(rows))
    listed = int((rows["reason"].str.startswith("background-reliant")).sum())
    note = []
    if listed != n_low:
        note.append(
            f"curation.csv lists the {listed:,} most background-reliant of the {n_low:,} images "
            f"whose ratio is below the threshold {rh.fmt_threshold(t)}."
        )
    findings = list(zip(flags["status"].astype(str), reasons, pages, strict=True))
    return findings, note


def _review(out: Path, ctx: _Context, scan: Scan, limits: Limits) -> tuple[Any, int]:
    """Write ``review.csv``; return the index's table of its head and the queue's length."""
    images = scan.images
    codes = images["group"].to_numpy()
    summary = ctx.summary
    statuses = np.array([*summary["status"].astype(str), ""], dtype=object)
    pages = [*ctx.pages, ""]  # index -1: a group the summary lacks
    classes = [*(c or "" for c in ctx.classes), ""]
    off = {} if ctx.strategies is None else off_object_members(ctx.strategies)
    queue = review_queue(images, statuses[codes], off, float(ctx.params["threshold"]),
                         limits.review_limit)  # fmt: skip
    group = queue["group"].to_numpy()
    queue["page"] = [pages[g] for g in group]
    columns = ["rank", "image_id", "path", *ctx.group_by]
    if ctx.names.classes:
        queue["class"] = [classes[g] for g in group]
        columns.append("class")
    columns += ["group_status", "fg_bg_ratio", "swap_flip", "bg_reliance", "strategy", "why",
                "page"]  # fmt: skip
    write_text(out / "review.csv", csv_text(queue[columns]))
    return review_table(queue.head(limits.review_shown), [*ctx.labels, ""]), len(queue)


def _index(out: Path, ctx: _Context, record: RunRecord | None, folder: RunFolder,
           views: list[GroupView], scan: Scan, limits: Limits) -> rh.Page:  # fmt: skip
    summary = ctx.summary
    findings, note = _write_tables(out, ctx, scan, limits)
    review, total = _review(out, ctx, scan, limits)
    reviewed = [v for v in views if v.status in rh.REVIEW]
    flagged = [v.evidence for v in views if v.status == "flagged"]
    with_tiles: list[Any] = [v for v in views if v.strategies]
    if ctx.strategies is not None and ctx.strategies.group_by != tuple(ctx.group_by):
        with_tiles = other_grouping(ctx.assets, ctx.strategies, views)
    with_tiles.sort(key=lambda v: not marked(v))  # groups with a marked cluster first
    table = group_table(ctx.rows, ctx.group_by, ctx.classes, ctx.pages, rh.fmt)
    failures = [] if record is None else record.failures
    pool = pool_section(record) if record is not None else None
    if pool is not None:
        pool = replace(pool, src=ctx.assets.chart("actor-timeline", pool.png))
    return rh.Page(
        title=ctx.title,
        findings=findings[: rh.MAX_FINDINGS],
        more_findings=max(0, len(findings) - rh.MAX_FINDINGS),
        notes=rh.summary_notes(summary, ctx.group_by, ctx.params, ctx.names.label) + note,
        table=table,
        charts=_charts(ctx, scan, limits.max_groups),
        galleries=reviewed[: limits.gallery_groups] if limits.gallery_size > 0 else [],
        gallery_size=limits.gallery_size,
        more_galleries=max(0, len(reviewed) - limits.gallery_groups),
        facts=run_facts(record, ctx.params),
        failures=[
            rh.Failure(str(f.get("image_id", "")), str(f.get("error") or "")) for f in failures
        ],
        files=["summary.csv", "flags.csv", "curation.csv", "review.csv"],
        review=review if total else None,
        review_total=total,
        fiftyone=fiftyone_view(folder),
        evidence=flagged[: limits.evidence_groups] if scan.swaps else [],
        more_evidence=max(0, len(flagged) - limits.evidence_groups) if scan.swaps else 0,
        strategies=with_tiles[: limits.strategy_groups],
        more_strategies=max(0, len(with_tiles) - limits.strategy_groups),
        pool=pool,
    )


def write_report(
    run_dir: RunFolder | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    summary: pd.DataFrame | None = None,
    limits: Limits | None = None,
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
        limits: what the index and the group pages draw and list (:class:`Limits`: images
            per gallery and galleries, images drawn per group page, groups in the charts,
            rows of ``curation.csv`` and ``review.csv``...); all groups stay in the table, the
            group pages and the CSV files.

    Returns:
        ``out_dir / "index.html"`` (its URI in object storage).

    Example:
        >>> write_report("runs/val-audit", limits=Limits(page_images=None))  # doctest: +SKIP
        PosixPath('.../reports/val-audit/index.html')
    """
    limits = limits or Limits()
    folder = RunFolder.of(run_dir)  # one listing of the shards for the whole report
    run_dir = folder.path  # a Path, or the URI of a folder in object storage
    record = folder.read_record()  # None: a run folder without run.json
    if summary is None:
        stored = folder.store.exists(folder.SUMMARY)
        summary = read_summary(folder) if stored else aggregate(folder)
    summary = summary.reset_index(drop=True)
    group_by = list(summary.columns[: list(summary.columns).index("n")])
    params = summary.attrs.get("audit") or audit_params(record, group_by=group_by)
    target = report_dir(out_dir, record, run_dir)
    with local_out(target) as out:  # for a bucket: written locally, then each file uploaded
        index = _write(out, folder, record, summary, params, group_by, limits)
    return join(target, "index.html") if is_uri(target) else index


def _write(out: Path, folder: RunFolder, record: RunRecord | None, summary: pd.DataFrame,
           params: Mapping[str, Any], group_by: list[str], limits: Limits) -> Path:  # fmt: skip
    """Write every page and table into the local folder ``out``; return the index."""
    names = GroupNames.of(group_by, record)
    rows = summary.to_dict("records")
    ctx = _Context(
        run_dir=folder,
        summary=summary,
        group_by=group_by,
        params=params,
        names=names,
        assets=Assets(out, StoredImages(record.config.dataset) if record is not None else None),
        strategies=read_strategies(folder),
        fill=record.config.counterfactual.fill.value if record is not None else "mean",
        title=f"Occlusion audit: {record.name if record is not None else base_name(folder.path)}",
        rows=rows,
        labels=[names.label(s) for s in rows],
        pages=[names.page(s) for s in rows],
        classes=[names.class_name(s) for s in rows],
    )
    keys = {group_key(s, group_by): k for k, s in enumerate(rows)}
    scan = scan_run(folder, group_by, keys)
    views = build_group_pages(out, ctx, scan, limits)
    page = _index(out, ctx, record, folder, views, scan, limits)
    rh.write_script(out)
    index = out / "index.html"
    write_text(index, rh.render_page(page))  # last: every file it links to is in place
    return index
