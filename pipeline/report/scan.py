"""The report's one streaming pass over the stored metrics (never the ``delta`` grids).

It keeps every image's light columns (id, group, path, mask, status, ratio, share, swap
evidence; held as a DataFrame and as Arrow: about 330 bytes an image with short paths), tagged
with the index of its group's summary row, and each group's histogram of log ratios. Everything
the pages list (the group pages' images, the galleries, the review queue, ``curation.csv``) is
chosen from this table; only the images that are drawn are read again with their grids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.audit.aggregate import iter_batches, iter_groups
from pipeline.audit.statistics import valid_ratios
from pipeline.report.figures import HIST_EDGES
from pipeline.report.names import GroupKey
from pipeline.run import maps
from pipeline.run.folder import RunFolder
from pipeline.schema import STATUS_OK

__all__ = ["EVIDENCE_COLUMNS", "LIGHT_COLUMNS", "Scan", "curation", "scan_run", "stored_columns"]

LIGHT_COLUMNS = ("image_id", "path", "mask", "status", "error", "image_h", "image_w",
                 "fg_bg_ratio", "fg_share", "metric_note")  # fmt: skip
#: Read when stored (runs from before the background swaps have none).
EVIDENCE_COLUMNS = ("score", "swap_delta", "swap_flip", "bg_reliance")


@dataclass
class Scan:
    """What one pass over the stored metrics gathers.

    Attributes:
        images: one row per stored image: the light columns, the group columns, ``group``
            (the index of its summary row; -1 for a group the summary lacks) and ``valid``
            (``ok`` with a finite ratio above 0).
        hists: (groups, len(HIST_EDGES) - 1) counts of each group's valid log10 ratios.
        swaps: whether the run stored background swaps (runs from before them did not).
    """

    images: pd.DataFrame
    hists: np.ndarray
    swaps: bool = True

    def rows(self, positions: Sequence[int] | np.ndarray) -> list[dict[str, object]]:
        """The light rows at these positions of ``images``, as dicts (through Arrow: a few
        rows from a large table in microseconds, where pandas takes milliseconds)."""
        if self._table is None:
            self._table = pa.Table.from_pandas(self.images, preserve_index=False)
        return self._table.take(pa.array(np.asarray(positions, dtype=np.int64))).to_pylist()

    _table: pa.Table | None = None


def stored_columns(run_dir: RunFolder | str | os.PathLike[str]) -> list[str]:
    """The columns of the run's stored maps (from its first shard's footer)."""
    return maps.stored_columns(RunFolder.of(run_dir))


def scan_run(
    run_dir: str | os.PathLike[str],
    group_by: Sequence[str],
    groups: Mapping[GroupKey, int],
) -> Scan:
    """Stream the run's light columns once.

    Args:
        run_dir: the run folder (local or in a bucket).
        group_by: the summary's group columns.
        groups: group key -> index of its summary row.
    """
    stored = set(stored_columns(run_dir))
    evidence = [c for c in EVIDENCE_COLUMNS if c in stored]
    columns = list(dict.fromkeys([*LIGHT_COLUMNS, *group_by, *evidence]))
    parts = []
    for batch in iter_batches(run_dir, columns):
        code = np.full(batch.num_rows, -1, dtype=np.int64)
        for key, idx in iter_groups(batch, group_by):
            code[idx] = groups.get(key, -1)
        table = pa.Table.from_batches([batch]).append_column("group", pa.array(code))
        parts.append(table)
    swaps = "swap_delta" in stored
    if not parts:
        return Scan(pd.DataFrame(columns=[*columns, "group", "valid"]), _hists([], [], 0), swaps)
    images = pa.concat_tables(parts).to_pandas()
    for c in EVIDENCE_COLUMNS:
        if c not in images.columns:
            images[c] = np.nan
    r = images["fg_bg_ratio"].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        images["valid"] = valid_ratios(r, (images["status"] == STATUS_OK).to_numpy())
    valid = images["valid"].to_numpy()
    return Scan(images, _hists(images["group"].to_numpy()[valid], r[valid], len(groups)), swaps)


def _hists(codes: Sequence[int] | np.ndarray, ratios: Sequence[float] | np.ndarray, n: int):
    """Per-group counts of log10 ratios in the ``HIST_EDGES`` bins (ends clipped)."""
    counts = np.zeros((n, len(HIST_EDGES) - 1), dtype=np.int64)
    codes, ratios = np.asarray(codes, dtype=np.int64), np.asarray(ratios, dtype=np.float64)
    keep = codes >= 0
    logs = np.clip(np.log10(ratios[keep]), HIST_EDGES[0], HIST_EDGES[-1])
    bins = np.clip(np.searchsorted(HIST_EDGES, logs, side="right") - 1, 0, counts.shape[1] - 1)
    np.add.at(counts, (codes[keep], bins), 1)
    return counts


def curation(
    scan: Scan,
    group_by: Sequence[str],
    statuses: Sequence[str],
    threshold: float,
    limit: int | None,
    fmt_threshold: str,
) -> tuple[pd.DataFrame, int]:
    """The rows of ``curation.csv`` and how many images lie below the threshold.

    Valid images below the threshold (lowest ratio first, then image id; at most ``limit``),
    then every ``ok`` image with an undefined ratio, then every ``error`` row, each with its
    reason.

    Args:
        scan: the pass over the run.
        group_by: the group columns.
        statuses: the status of each summary row (by the scan's ``group`` index).
        threshold: the audit's threshold.
        limit: the most low-ratio images listed (None: all).
        fmt_threshold: the threshold as the page writes it.
    """
    columns = ["image_id", "path", *group_by, "fg_bg_ratio", "fg_share", "status", "group_status"]
    df = scan.images
    codes = df["group"].to_numpy()
    status_of = np.array([*statuses, ""], dtype=object)  # index -1: a group the summary lacks
    r = df["fg_bg_ratio"].to_numpy(dtype=np.float64, na_value=np.nan)
    valid = df["valid"].to_numpy()
    low = valid & (r < threshold)
    n_low = int(low.sum())
    low_rows = df[low].sort_values(["fg_bg_ratio", "image_id"], kind="stable")
    if limit is not None:
        low_rows = low_rows.head(limit)
    picked = pd.concat([low_rows, df[~valid]]).copy()
    picked["group_status"] = status_of[codes[picked.index.to_numpy()]]
    r = picked["fg_bg_ratio"].to_numpy(dtype=np.float64, na_value=np.nan)
    is_ok = (picked["status"] == STATUS_OK).to_numpy()
    valid = picked["valid"].to_numpy()
    undefined = is_ok & ~valid
    reason = np.empty(len(picked), dtype=object)
    reason[valid] = [
        f"background-reliant: fg/bg ratio {x:.3g} < threshold {fmt_threshold}" for x in r[valid]
    ]
    reason[undefined] = [
        f"undefined ratio: {n}" if isinstance(n, str) and n else "undefined ratio"
        for n in picked.loc[undefined, "metric_note"]
    ]
    reason[~is_ok] = [
        f"error: {e}" if isinstance(e, str) else "error" for e in picked.loc[~is_ok, "error"]
    ]
    picked["reason"] = reason
    picked["_rank"] = np.select([valid, is_ok], [0, 1], 2)
    picked = picked.sort_values(
        ["_rank", "fg_bg_ratio", "image_id"], kind="stable", na_position="last"
    )
    return picked[[*columns, "reason"]].reset_index(drop=True), n_low
