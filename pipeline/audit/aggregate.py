"""Per-group summary of stored occlusion metrics (docs/design.md, "Statistics").

Streams ``RUN_DIR/maps/part-*.parquet`` batch by batch, reading only the group columns, the status
and the per-image metrics (never the ``delta`` grids), so a million-image run needs a few float
arrays per group rather than its maps in memory. Writes ``RUN_DIR/summary.parquet``. The
statistics and verdict of each group come from :mod:`pipeline.audit.statistics`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.audit.evidence import EVIDENCE_COLUMNS, evidence_stats
from pipeline.audit.fdr import below_threshold_p, bh_qvalues
from pipeline.audit.params import audit_params
from pipeline.audit.statistics import (
    STATUS_ORDER,
    GroupKey,
    finite_mean,
    group_rng,
    group_status,
    ratio_stats,
    valid_ratios,
)
from pipeline.run.folder import RunFolder
from pipeline.run.identity import check_one_audit
from pipeline.run.maps import stored_columns
from pipeline.schema import IMAGE_METRICS, STATUS_OK, summary_schema

__all__ = [
    "aggregate",
    "audit_params",
    "iter_batches",
    "iter_groups",
    "read_summary",
]

_METRIC_COLUMNS = ("status", *IMAGE_METRICS)
_META_KEY = b"occlusion_audit.audit"  # summary.parquet schema metadata: parameters used


def iter_batches(
    run: RunFolder | str | os.PathLike[str],
    columns: Sequence[str] | None,
    filter: pc.Expression | None = None,
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (``None``: all) over the run's shards, in order: the run
    folder's one reader (:meth:`pipeline.run.folder.RunFolder.iter_batches`).

    Raises:
        FileNotFoundError: the run has no part files.
        ValueError: a requested column is not stored, naming it and the stored ones.
    """
    return RunFolder.of(run).iter_batches(columns, filter)


def iter_groups(
    batch: pa.RecordBatch, group_by: Sequence[str]
) -> Iterator[tuple[GroupKey, np.ndarray]]:
    """``(group key, row indices)`` for each group present in ``batch``; nulls key as ``None``."""
    n = batch.num_rows
    if n == 0:
        return
    code = np.zeros(n, dtype=np.int64)
    decoders: list[list[str | None]] = []
    for name in group_by:
        encoded = pc.dictionary_encode(batch.column(name).cast(pa.string()))
        values: list[str | None] = [None, *encoded.dictionary.to_pylist()]
        # mixed-radix composite code: index 0 stands for null, so nulls form their own group
        code = code * len(values) + (encoded.indices.fill_null(-1).to_numpy() + 1)
        decoders.append(values)
    uniques, inverse = np.unique(code, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniques)))[:-1]
    for u, idx in zip(uniques.tolist(), np.split(order, bounds), strict=True):
        key: list[str | None] = []
        for values in reversed(decoders):
            u, digit = divmod(u, len(values))
            key.append(values[digit])
        yield tuple(reversed(key)), idx


def _floats(batch: pa.RecordBatch, name: str) -> np.ndarray:
    # nulls become NaN, so "not finite" covers both
    return batch.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)


@dataclass
class _Acc:
    """Running counts and valid-row values of one group (8 bytes per value)."""

    n: int = 0
    n_error: int = 0
    n_nan: int = 0
    chunks: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, name: str, values: np.ndarray) -> None:
        self.chunks.setdefault(name, []).append(values)

    def values(self, name: str) -> np.ndarray:
        # sorted, so every statistic is independent of row order, sharding and batching
        parts = self.chunks.get(name, [])
        return np.sort(np.concatenate(parts)) if parts else np.empty(0)


def _accumulate(folder: RunFolder, group_by: Sequence[str]) -> dict[GroupKey, _Acc]:
    accs: dict[GroupKey, _Acc] = {}
    # the evidence columns this run stored (runs of older versions have none)
    evidence = [c for c in EVIDENCE_COLUMNS if c in stored_columns(folder)]
    for batch in folder.iter_batches([*group_by, *_METRIC_COLUMNS, *evidence]):
        ok = pc.equal(batch.column("status"), STATUS_OK).fill_null(False)
        ok = ok.to_numpy(zero_copy_only=False)  # (rows,) bool
        m = {name: _floats(batch, name) for name in IMAGE_METRICS}
        with np.errstate(invalid="ignore"):
            valid = valid_ratios(m["fg_bg_ratio"], ok)
            valid_pos = valid_ratios(m["fg_bg_ratio_pos"], ok)
        for key, idx in iter_groups(batch, group_by):
            acc = accs.setdefault(key, _Acc())
            v, vp = idx[valid[idx]], idx[valid_pos[idx]]
            acc.n += len(idx)
            acc.n_error += int((~ok[idx]).sum())
            acc.n_nan += int(ok[idx].sum()) - len(v)
            # the means and the _pos statistics are over the rows valid for their own ratio
            for name in ("fg_bg_ratio", "fg_share", "fg_area"):
                acc.add(name, m[name][v])
            for name in ("fg_bg_ratio_pos", "fg_share_pos"):
                acc.add(name, m[name][vp])
            okx = idx[ok[idx]]
            for name in evidence:  # NaN where an image has none; the statistics skip NaN
                acc.add(name, _floats(batch, name)[okx])
    return accs


def _summary_row(key: GroupKey, acc: _Acc, group_by: Sequence[str], p: Mapping[str, Any]) -> dict:
    ratios, ratios_pos = acc.values("fg_bg_ratio"), acc.values("fg_bg_ratio_pos")
    main = ratio_stats(ratios, p["confidence"], p["bootstrap"], group_rng(p["seed"], key, "ratio"))
    pos = ratio_stats(ratios_pos, p["confidence"], p["bootstrap"], group_rng(p["seed"], key, "pos"))
    row: dict[str, Any] = dict(zip(group_by, key, strict=True))
    row.update(n=acc.n, n_valid=len(ratios), n_error=acc.n_error, n_nan=acc.n_nan, **main)
    row.update({f"mean_{k}": finite_mean(acc.values(k)) for k in ("fg_share", "fg_area")})
    row.update({f"{k}_pos": v for k, v in pos.items()})
    row["mean_fg_share_pos"] = finite_mean(acc.values("fg_share_pos"))
    # only groups that can get a verdict are tested: the family is what could be flagged
    testable = len(ratios) >= max(2, p["min_images"]) and (
        acc.n_error <= p["max_error_share"] * acc.n
    )
    row["p_value"] = below_threshold_p(ratios, p["threshold"]) if testable else math.nan
    return row


def _set_status(
    rows: list[dict[str, Any]], accs: Sequence[tuple[GroupKey, _Acc]], p: Mapping[str, Any]
) -> None:
    """q-values across the groups, then each group's verdict and evidence."""
    q = bh_qvalues(np.array([row["p_value"] for row in rows], dtype=np.float64))
    for row, qv in zip(rows, q.tolist(), strict=True):
        row["q_value"] = qv
        row["status"] = group_status(
            row["n_valid"],
            row["ci_low"],
            row["ci_high"],
            p["threshold"],
            p["min_images"],
            n=row["n"],
            n_error=row["n_error"],
            max_error_share=p["max_error_share"],
            q_value=qv,
            fdr=p["fdr"],
        )
    for row, (key, acc) in zip(rows, accs, strict=True):
        values = {name: acc.values(name) for name in EVIDENCE_COLUMNS}
        rng = group_rng(p["seed"], key, "bg_reliance")
        row.update(evidence_stats(values, row["status"], p["confidence"], p["bootstrap"], rng))


def _sort_key(row: Mapping[str, Any], group_by: Sequence[str]) -> tuple:
    g = row["gmean_ratio"]
    names = tuple((row[c] is None, row[c] or "") for c in group_by)
    return (STATUS_ORDER[row["status"]], math.isnan(g), 0.0 if math.isnan(g) else g, names)


def aggregate(
    run_dir: RunFolder | str | os.PathLike[str],
    group_by: Sequence[str] | None = None,
    threshold: float | None = None,
    min_images: int | None = None,
    confidence: float | None = None,
    seed: int | None = None,
    bootstrap: int | None = None,
    write: bool = True,
    max_error_share: float | None = None,
    fdr: float | str | None = None,
) -> pd.DataFrame:
    """Summarise the stored per-image metrics of a run per group (docs/design.md).

    A row is valid when its status is ``ok`` and its ``fg_bg_ratio`` is finite and > 0. Per group:
    counts (``n``, ``n_valid``, ``n_error``, ``n_nan``), the geometric mean of the valid ratios
    with a percentile bootstrap interval (log-ratios resampled; the generator is seeded by the
    run seed and the group key, so results do not depend on group order or sharding), median,
    share below 1, mean ``fg_share``/``fg_area`` over valid rows, and the same for the ``_pos``
    metrics. A one-sided p-value per group (t-test of the log-ratios against the threshold) and
    Benjamini-Hochberg q-values across the groups that can get a verdict.
    Status: ``unreliable`` (error share above ``max_error_share``), ``too-few``
    (n_valid < min_images), ``flagged`` (q_value <= fdr; with fdr off, ci_high < threshold),
    ``inconclusive`` (ci_low <= threshold <= ci_high), else ``ok``.

    Args:
        run_dir: run directory holding ``maps/part-*.parquet`` (and usually ``run.json``).
        group_by: group columns; default ``config.dataset.group_by`` of run.json.
        threshold: fg/bg ratio below which a group is flagged (unitless); default
            ``config.audit.threshold``, else 1.0.
        min_images: fewest valid images for a verdict; default audit config, else 20.
        confidence: interval coverage in (0, 1); default audit config, else 0.95.
        seed: bootstrap seed; default ``audit.seed`` (0).
        bootstrap: bootstrap resamples; default ``audit.bootstrap``, else 2000.
        max_error_share: largest share of failed images that still allows a verdict; default
            ``audit.max_error_share``, else 0.1.
        fdr: false-discovery rate of the flags; default ``audit.fdr``, else 0.05; ``"off"``
            flags by each group's own interval instead.
        write: also write ``RUN_DIR/summary.parquet`` (atomically).

    Returns:
        One row per group with columns ``summary_schema(group_by).names``: flagged groups first,
        then inconclusive ones, then by geometric-mean ratio ascending. ``df.attrs["audit"]``
        holds the parameters used.

    Example:
        >>> summary = aggregate("runs/val", group_by=["room"], threshold=0.8)  # doctest: +SKIP
    """
    folder = RunFolder.of(run_dir)
    folder.require_shards()
    record = folder.read_record()
    check_one_audit(folder, record)
    params = audit_params(
        record,
        group_by=group_by,
        threshold=threshold,
        min_images=min_images,
        confidence=confidence,
        seed=seed,
        bootstrap=bootstrap,
        max_error_share=max_error_share,
        fdr=fdr,
    )
    group_by = params["group_by"]
    accs = _accumulate(folder, group_by)
    rows = [_summary_row(key, acc, group_by, params) for key, acc in accs.items()]
    _set_status(rows, list(accs.items()), params)
    rows.sort(key=lambda row: _sort_key(row, group_by))
    meta = {_META_KEY: json.dumps({**params, "group_by": list(group_by)}).encode()}
    table = pa.Table.from_pylist(rows, schema=summary_schema(group_by).with_metadata(meta))
    if write:
        folder.write_summary(table)
    return _to_frame(table)


def _to_frame(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is not None:
        audit = json.loads(raw)
        audit["group_by"] = tuple(audit["group_by"])
        if "n_boot" in audit:  # a summary written before the setting's one name
            audit["bootstrap"] = audit.pop("n_boot")
        df.attrs["audit"] = audit
    return df


def read_summary(run_dir: RunFolder | str | os.PathLike[str]) -> pd.DataFrame:
    """``RUN_DIR/summary.parquet`` as written by :func:`aggregate`, with ``attrs["audit"]``."""
    return _to_frame(RunFolder.of(run_dir).read_summary())
