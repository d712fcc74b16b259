"""``occlusion-audit export``: a run's per-image results for the tools curators use.

One record per image: its file, group values, label, status, metrics, the map, and tags for its
group's verdict, its place in ``curation.csv`` and its strategy cluster. ``--to parquet`` and
``--to csv`` write these columns for any tool (the map as the stored window grid); ``--to
fiftyone`` creates or updates a FiftyOne dataset with the full-resolution map as an
``fo.Heatmap`` and saves the report's review queue as its view ``occlusion-review``, recorded in
``RUN_DIR/fiftyone.json`` (FiftyOne is an optional extra: ``pip install
occlusion-audit[fiftyone]``).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit.aggregate import read_summary
from pipeline.audit.strategies import strategy_group_columns
from pipeline.report.csv_safe import csv_text
from pipeline.report.group_pages import Limits
from pipeline.report.review import (
    FIFTYONE_RECORD,
    REVIEW_VIEW,
    off_object_members,
    review_queue,
)
from pipeline.report.strategies_section import read_strategies
from pipeline.run.folder import RunFolder
from pipeline.schema import FLOAT_METRICS
from pipeline.storage.atomic import atomic_write
from pipeline.storage.paths import base_name, is_uri, join_under
from pipeline.storage.store import Store

__all__ = ["export_records", "export_run", "review_ids"]

_KEEP = ["image_id", "path", "label", "status", "error", "target", "score", "delta", "image_c",
         "image_h", "image_w", "window", "stride", "grid_c", "grid_h", "grid_w"]  # fmt: skip


def _tags(row: pd.Series, group_by: list[str], verdicts: dict, clusters: dict) -> list[str]:
    key = tuple(None if pd.isna(row[g]) else str(row[g]) for g in group_by)
    tags = []
    status = verdicts.get(key)
    if status in ("flagged", "inconclusive", "unreliable"):
        tags.append(f"audit:{status}")
    if verdicts.get(("confirmed", *key)):
        tags.append("audit:confirmed")
    if clusters.get(row["image_id"]) is not None:
        tags.append(f"strategy:{clusters[row['image_id']]}")
    return tags


def export_records(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The export table: stored columns, ``filepath``, ``tags`` (list of strings)."""
    folder = RunFolder(run_dir)
    record = folder.read_record()
    maps = folder.read_maps()
    group_by = list(record.config.dataset.group_by) if record is not None else []
    root = record.config.dataset.root if record is not None else None
    # the folder's store, not summary_path: that is a Path locally but a URI text in a bucket
    summary = read_summary(run_dir) if folder.store.exists(folder.SUMMARY) else None
    verdicts: dict[Any, Any] = {}
    if summary is not None:
        for _, s in summary.iterrows():
            key = tuple(None if pd.isna(s[g]) else str(s[g]) for g in group_by)
            verdicts[key] = s["status"]
            verdicts[("confirmed", *key)] = bool(s.get("confirmed", False))
    clusters: dict[str, str] = {}
    stored = folder.read_file("strategies.parquet")
    if stored is not None:
        st = pd.read_parquet(io.BytesIO(stored))
        gcols = strategy_group_columns(st)
        for _, s in st.iterrows():
            name = "/".join(str(s[g]) for g in gcols) + f"#{s['cluster']}"
            for image_id in s["members"]:
                clusters[image_id] = name
    cols = [c for c in [*_KEEP[:2], *group_by, *_KEEP[2:], *FLOAT_METRICS] if c in maps.columns]
    out = maps[list(dict.fromkeys(cols))].copy()
    out.insert(1, "filepath", [_filepath(p, root) for p in out["path"]])
    out["tags"] = [_tags(r, group_by, verdicts, clusters) for _, r in out.iterrows()]
    return out


def _filepath(path: str, root: str | None) -> str:
    try:
        return join_under(root, path)
    except ValueError:
        return str(path)


def export_run(
    run_dir: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str] | None = None,
    *,
    dataset_name: str | None = None,
) -> str:
    """Export a run; returns the file written or the FiftyOne dataset's name.

    Args:
        run_dir: the run folder, local or in a bucket.
        to: ``parquet``, ``csv`` (text cells formula-escaped, :mod:`~.csv_safe`) or ``fiftyone``.
        out: the file for ``parquet``/``csv``, local or in a bucket (default
            ``RUN_DIR/export.<to>``).
        dataset_name: the FiftyOne dataset (default ``occlusion-audit-<run name>``); samples are
            upserted by ``image_id``: one sample per image however often, or however many
            exports at once, write into it.
    """
    table = export_records(run_dir)
    if to in ("parquet", "csv"):
        if to == "parquet":
            data = table.to_parquet(index=False)
        else:
            flat = table.drop(columns=["delta"]).assign(tags=table["tags"].map(";".join))
            data = csv_text(flat).encode("utf-8")
        if not out:
            return str(RunFolder(run_dir).write_file(f"export.{to}", data))
        return _write_file(str(out), data)
    if to == "fiftyone":
        folder = RunFolder(run_dir)
        record = folder.read_record()
        name = dataset_name or f"occlusion-audit-{record.name if record else base_name(run_dir)}"
        queue = review_ids(folder, table, record)
        _to_fiftyone(table, name, queue)
        # the report names the saved view (pipeline.report.review.fiftyone_view)
        note = {"dataset": name, "view": REVIEW_VIEW, "images": len(queue)}
        folder.write_file(FIFTYONE_RECORD, (json.dumps(note, indent=2) + "\n").encode("utf-8"))
        return name
    raise ValueError(f"--to must be parquet, csv or fiftyone, got {to!r}")


def _write_file(out: str, data: bytes) -> str:
    """Write ``data`` whole to ``out``: a local file atomically, or one object in a bucket."""
    if is_uri(out):
        folder, _, name = out.rpartition("/")
        Store(folder).write_bytes(name, data)
        return out
    return str(atomic_write(out, lambda p: p.write_bytes(data)))


def review_ids(folder: RunFolder, table: pd.DataFrame, record: Any) -> list[str]:
    """The review queue's image ids, first to look at first (:mod:`~.review`): the same queue
    as the report's ``review.csv``, from the export table and the run's summary and strategies.
    """
    group_by = list(record.config.dataset.group_by) if record is not None else []
    statuses: dict[tuple, str] = {}
    threshold = record.config.audit.threshold if record is not None else 1.0
    if folder.store.exists(folder.SUMMARY):
        summary = read_summary(folder.path)
        threshold = float((summary.attrs.get("audit") or {}).get("threshold", threshold))
        for s in summary.to_dict("records"):
            statuses[tuple(None if pd.isna(s[g]) else str(s[g]) for g in group_by)] = s["status"]
    keys = table[group_by].itertuples(index=False, name=None) if group_by else [()] * len(table)
    status = [statuses.get(tuple(None if pd.isna(v) else str(v) for v in k), "") for k in keys]
    off = off_object_members(read_strategies(folder))
    queue = review_queue(table, status, off, threshold, Limits().review_limit)
    return [str(i) for i in queue["image_id"]]


def _to_fiftyone(table: pd.DataFrame, name: str, queue: list[str]) -> str:
    try:
        import fiftyone as fo
    except ImportError as e:
        raise RuntimeError(
            "FiftyOne is not installed: pip install 'occlusion-audit[fiftyone]'"
        ) from e
    from pymongo.errors import OperationFailure

    dataset = _open_dataset(fo, name)
    samples = [_sample(fo, row) for row in table.to_dict("records")]
    for attempt in range(_UPSERT_TRIES):
        try:
            # An upsert: an existing image's fields are replaced (tags as a whole), new images
            # added. merge_samples first creates a unique index on image_id (its $merge matches
            # on it), so the database refuses a second sample for an image, whoever inserts it.
            dataset.merge_samples(samples, key_field="image_id", merge_lists=False, progress=False)
            break
        except ValueError as e:
            # a concurrent export filled the new dataset, and set its media type, after we
            # loaded it: reload and merge into what is there now
            if "media type" not in str(e) or attempt == _UPSERT_TRIES - 1:
                raise
            dataset.reload()
        except OperationFailure as e:
            # a concurrent export inserted one of these images after our $merge looked for it;
            # merging again finds it and updates it
            if e.code != _DUPLICATE_KEY:
                raise
            if attempt == _UPSERT_TRIES - 1:  # the dataset itself holds an image twice
                raise RuntimeError(
                    f"FiftyOne dataset {name!r} cannot take one sample per image_id "
                    f"({e.details.get('errmsg') if e.details else e}); an earlier export may "
                    "have added an image twice: delete that dataset or export with --dataset NEW"
                ) from None
    # the review queue as a saved view, in queue order (replaced by each export)
    view = dataset.select_by("image_id", queue, ordered=True)
    dataset.save_view(REVIEW_VIEW, view, description=_VIEW_TEXT, overwrite=True)
    return name


_VIEW_TEXT = (
    "occlusion-audit's review queue: low fg/bg ratio, prediction flips on swapped backgrounds, "
    "off-object strategy; first to look at first"
)


_UPSERT_TRIES = 5
_DUPLICATE_KEY = 11000  # MongoDB's error code for a unique index violation


def _open_dataset(fo: Any, name: str) -> Any:
    """The persistent dataset ``name``, created when missing (by this or a concurrent export)."""
    from pymongo.errors import OperationFailure

    if not fo.dataset_exists(name):
        try:
            created = fo.Dataset(name, persistent=True)
            created.media_type = "image"  # while it is empty: merges then never set it
            return created
        except ValueError:  # "not available": another export created it since the check
            pass
        except OperationFailure as e:  # it did so at the same moment: the name index refused ours
            if e.code != _DUPLICATE_KEY:
                raise
    return fo.load_dataset(name)


def _sample(fo: Any, row: dict[str, Any]) -> Any:
    """One image's sample: its fields, tags and, for an ``ok`` image, the map as a heatmap."""
    from pipeline.kernel.occlusion import expand_map

    sample = fo.Sample(filepath=row["filepath"])
    for key, value in row.items():
        if key in ("delta", "window", "stride", "tags", "filepath", "path"):
            continue
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue  # an undefined metric is an absent field, as FiftyOne expects
        sample[key] = value.item() if isinstance(value, np.generic) else value
    sample.tags = list(row["tags"])
    if row["status"] == "ok":
        sample["occlusion"] = fo.Heatmap(map=np.asarray(expand_map(row), dtype=np.float32))
    return sample
