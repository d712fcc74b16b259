"""The manifest table: reading one whole (``read_manifest``) and writing one from a folder tree.

Runs stream manifests through :class:`pipeline.data.table.TableSource`; this module serves the
Python API and ``occlusion-audit manifest``. One row per image (id, path, group columns, optional
label, mask or box).

``read_manifest`` returns a ``pyarrow.Table`` rather than a pandas frame: shards are zero-copy
slices of it (shard ``k`` = rows ``[k*S, (k+1)*S)`` in manifest order), and column types stay
exact (an id ``"007"`` stays a string). ``build_manifest`` writes one from a folder tree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config.dataset import DatasetConfig
from pipeline.data.records import ImageRecord
from pipeline.data.table import records_of
from pipeline.storage.atomic import atomic_write
from pipeline.storage.read import read_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "ManifestError",
    "build_manifest",
    "read_manifest",
    "records",
]

#: File endings ``build_manifest`` takes for images and masks (lower case).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_SHOW = 5  # offending values quoted in an error message


class ManifestError(ValueError):
    """The manifest cannot be read or breaks its contract (columns, unique non-null ids)."""


def _format(path: str) -> str:
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext not in _FORMATS:
        raise ManifestError(f"manifest {path!r}: unknown format {ext!r}; use .parquet or .csv")
    return _FORMATS[ext]


def _text_columns(cfg: DatasetConfig) -> list[str]:
    """Columns read as strings: ids like ``007`` and numeric group values keep their spelling."""
    cols = cfg.columns
    return list(dict.fromkeys([cols.id, cols.path, cols.label, cols.mask, *cfg.group_by]))


def _load_table(cfg: DatasetConfig) -> pa.Table:
    fmt = _format(cfg.manifest)
    try:
        data = pa.BufferReader(read_bytes(cfg.manifest))
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {cfg.manifest} ({e})") from e
    try:
        if fmt == "parquet":
            return pq.read_table(data)
        types = {c: pa.string() for c in _text_columns(cfg)}
        return pacsv.read_csv(data, convert_options=pacsv.ConvertOptions(column_types=types))
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"manifest {cfg.manifest}: cannot read it as {fmt}: {e}") from e


def _require(table: pa.Table, names: Sequence[str], key: str, where: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {where} lacks column(s) {missing} named by dataset.{key}; "
            f"present: {table.column_names}. Set dataset.{key} to the manifest's column names."
        )


def _as_string(table: pa.Table, name: str, where: str) -> pa.Table:
    col = table.column(name)
    if col.type == pa.string():
        return table
    try:
        return table.set_column(table.column_names.index(name), name, pc.cast(col, pa.string()))
    except pa.ArrowException as e:
        raise ManifestError(f"manifest {where}: column {name!r} ({col.type}) is not text") from e


def _check_ids(table: pa.Table, cfg: DatasetConfig, where: str) -> None:
    for name in (cfg.columns.id, cfg.columns.path):
        col = table.column(name)
        bad = pc.indices_nonzero(pc.or_kleene(pc.is_null(col), pc.equal(col, ""))).to_pylist()
        if bad:
            raise ManifestError(
                f"manifest {where}: column {name!r} is null or empty in {len(bad)} row(s), "
                f"first rows (0-based): {bad[:_SHOW]}"
            )
    counts = pc.value_counts(table.column(cfg.columns.id))
    dups = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    if dups:
        raise ManifestError(
            f"manifest {where}: {len(dups)} duplicate id(s) in column {cfg.columns.id!r}, "
            f"first: {dups[:_SHOW]}; ids must be unique"
        )


def read_manifest(cfg: DatasetConfig) -> pa.Table:
    """Read and validate the manifest named by ``cfg.manifest``, keeping its row order.

    Args:
        cfg: the dataset section. ``manifest`` is a ``.parquet``/``.csv`` local path,
            ``s3://bucket/key``, ``gs://bucket/key`` or ``hf://datasets/owner/name[@rev]/file``.

    Returns:
        The table with its columns as stored, except that the id, path, label, mask and group
        columns are strings and the box columns float64.

    Raises:
        ManifestError: unreadable, missing columns (the message lists those present), null or
            empty ids/paths, duplicate ids (the first few are listed), or no rows.

    Example:
        >>> cfg = load_config("val.yaml").dataset  # doctest: +SKIP
        >>> first_shard = records(read_manifest(cfg), cfg, 0, 64)  # doctest: +SKIP
    """
    where = cfg.manifest
    table = _load_table(cfg)
    cols = cfg.columns
    _require(table, [cols.id, cols.path], "columns.id/path", where)
    _require(table, cfg.group_by, "group_by", where)
    if cols.box is not None:
        _require(table, cols.box, "columns.box", where)
    # Without a mask column the maps, strategies and localisation-free evidence still stand;
    # the fg/bg metrics are NaN ("no mask or box") and the report says so up front.
    if table.num_rows == 0:
        raise ManifestError(f"manifest {where} has no rows")
    for name in _text_columns(cfg):
        if name in table.column_names:
            table = _as_string(table, name, where)
    for name in cols.box or ():
        i = table.column_names.index(name)
        try:
            table = table.set_column(i, name, pc.cast(table.column(name), pa.float64()))
        except pa.ArrowException as e:
            raise ManifestError(f"manifest {where}: box column {name!r} is not numeric") from e
    _check_ids(table, cfg, where)
    return table


def records(
    table: pa.Table, cfg: DatasetConfig, start: int = 0, stop: int | None = None
) -> list[ImageRecord]:
    """Rows ``[start, stop)`` of a manifest read by ``read_manifest``, as ``ImageRecord``s.

    Empty strings in the label and mask columns count as missing; a box with a null or NaN
    coordinate is no box.

    Example:
        >>> records(table, cfg, 64, 128)  # shard 1 with shard_size 64  # doctest: +SKIP
    """
    stop = table.num_rows if stop is None else min(stop, table.num_rows)
    return records_of(table.slice(start, max(0, stop - start)), cfg)


def _files(folder: Path, skip: Path | None) -> dict[str, Path]:
    """Image files under ``folder`` keyed by relative path without extension (``a/b``)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        hidden = any(part.startswith(".") for part in rel.parts)
        if hidden or not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if skip is not None and p.is_relative_to(skip):
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            raise ManifestError(f"{found[key]} and {p} would share the image id {key!r}")
        found[key] = p
    return found


def build_manifest(
    image_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str] | None = None,
    group_column: str = "group",
) -> pa.Table:
    """Write a manifest for a folder tree ``<group>/<image>`` (deeper folders are allowed).

    Paths are written relative to the manifest's folder when the images (and masks) lie under
    it, which is the default ``dataset.root``; otherwise relative to the deepest folder holding
    both ``image_dir`` and ``masks_dir`` (set ``dataset.root`` to it).

    Args:
        image_dir: folder of group folders of images; hidden files are skipped.
        out: ``.parquet`` or ``.csv`` file to write (written whole, then renamed into place).
        masks_dir: optional folder with the same relative layout; a mask matches an image by
            relative path without extension (``kitchen/1.jpg`` <- ``kitchen/1.png``).
        group_column: name of the group column.

    Returns:
        The table written: ``image_id`` (relative path without extension, ``/``-joined),
        ``path``, ``group_column`` and, with ``masks_dir``, ``mask_path`` (null where absent).

    Example:
        >>> build_manifest("data/val/images", "data/val/manifest.parquet",
        ...                masks_dir="data/val/masks", group_column="room")  # doctest: +SKIP
    """
    image_root, out_path = Path(image_dir).resolve(), Path(out).resolve()
    fmt = _format(str(out_path))
    if group_column in ("image_id", "path", "mask_path"):
        raise ManifestError(f"group_column {group_column!r} clashes with a manifest column")
    mask_root = None if masks_dir is None else Path(masks_dir).resolve()
    images = _files(image_root, skip=mask_root)
    if not images:
        raise ManifestError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {image_root}")
    masks = _files(mask_root, skip=None) if mask_root is not None else {}
    tops = [image_root] + ([mask_root] if mask_root is not None else [])
    base = out_path.parent
    if not all(t.is_relative_to(base) for t in tops):
        base = Path(os.path.commonpath(tops))
    rows: dict[str, list[str | None]] = {"image_id": [], "path": [], group_column: []}
    if mask_root is not None:
        rows["mask_path"] = []
    for key, path in images.items():
        parts = key.split("/")
        if len(parts) < 2:
            raise ManifestError(f"{path} is not in a group folder; expected <group>/<image>")
        rows["image_id"].append(key)
        rows["path"].append(path.relative_to(base).as_posix())
        rows[group_column].append(parts[0])
        if mask_root is not None:
            mask = masks.get(key)
            rows["mask_path"].append(None if mask is None else mask.relative_to(base).as_posix())
    table = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
    write = pq.write_table if fmt == "parquet" else pacsv.write_csv
    atomic_write(out_path, lambda tmp: write(table, tmp))
    return table
