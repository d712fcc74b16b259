"""The ``huggingface`` format: Parquet written by the ``datasets`` library, read with pyarrow.

``datasets`` stores an ``Image`` feature as a struct of ``bytes`` and ``path`` and records the
features in the schema metadata (key ``huggingface``). The dataset is never materialised: the
driver reads the footers and a few light columns, each worker the row groups of its shards.
A ``ClassLabel`` group column is shown by its class names; the label stays the class index.
"""

from __future__ import annotations

import bisect
import json
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.dataset import DatasetConfig
from pipeline.data.columns import box_lists, empty_to_null, text_column
from pipeline.data.records import Boxes, Foreground, ImageRecord, MaskBytes, MaskFile
from pipeline.data.rows import ParquetRows
from pipeline.data.source import ShardRef, Source, SourceError, light_schema
from pipeline.storage.files import is_folder, list_files

__all__ = ["HuggingFaceSource", "hf_features", "parquet_files"]


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features recorded in a Parquet schema (empty when there are none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    feats = info.get("info", {}).get("features", {})
    return feats if isinstance(feats, dict) else {}


def _is_image(feature: Any) -> bool:
    return isinstance(feature, dict) and feature.get("_type") == "Image"


def parquet_files(path: str) -> list[str]:
    """One Parquet file, or every ``*.parquet`` under a folder (sorted)."""
    if is_folder(path):
        files = list_files(path, "*.parquet")
        if not files:
            raise SourceError(f"{path}: a folder without .parquet files")
        return files
    return [path]


class HuggingFaceSource(Source):
    """Parquet files of a ``datasets`` dataset (local, ``s3://``, ``gs://``, ``hf://``)."""

    def __init__(self, cfg: DatasetConfig) -> None:
        super().__init__(cfg)
        try:
            self.rows = ParquetRows(parquet_files(cfg.manifest))
        except FileNotFoundError as e:
            raise SourceError(f"dataset not found: {cfg.manifest} ({e})") from e
        feats = hf_features(self.rows.schema)
        names = self.rows.schema.names
        images = [n for n in names if _is_image(feats.get(n))]
        cols = cfg.columns
        self.image = cols.image or (images[0] if images else None)
        if self.image is None or self.image not in names:
            raise SourceError(
                f"{cfg.manifest}: no Image column "
                + (f"{cols.image!r}" if cols.image else "in its `datasets` features")
                + f"; columns: {names}. Set dataset.columns.image."
            )
        missing = [g for g in cfg.group_by if g not in names]
        if missing:
            raise SourceError(
                f"{cfg.manifest} lacks group_by column(s) {missing}; columns: {names}"
            )
        self.id = cols.id if cols.id in names else None
        self.mask = cols.mask if cols.mask in names else None
        self.group_names = {
            g: feats[g]["names"]
            for g in cfg.group_by
            if isinstance(feats.get(g), dict) and feats[g].get("_type") == "ClassLabel"
        }
        label = feats.get(cols.label)
        self._label_names = (
            [str(n) for n in label["names"]]
            if isinstance(label, dict) and label.get("_type") == "ClassLabel"
            else []
        )
        self._base = cfg.manifest.rstrip("/") if len(self.rows.files) > 1 else None
        self.found = (
            f"{len(self.rows.files)} Parquet file(s) written by `datasets`, "
            f"{self.rows.num_rows} rows, Image column {self.image!r}"
            + (f", mask column {self.mask!r}" if self.mask else "")
            + (f", ids from {self.id!r}" if self.id else ", ids are row numbers")
        )
        self._used = [
            c
            for c in dict.fromkeys(
                [self.id, cols.label, *cfg.group_by, *(cols.box or ()), cols.boxes]
            )
            if c is not None and c in names
        ]

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def class_names(self) -> dict[str, str]:
        # the stored label is the ClassLabel's index as text
        return {str(i): name for i, name in enumerate(self._label_names)}

    def _locator(self, row: int) -> str:
        # the last file starting at or before the row (offsets: each file's first row, then
        # the total); an empty file shares its offset with the next one
        i = min(bisect.bisect_right(self.rows.offsets, row), len(self.rows.files)) - 1
        f = self.rows.files[i]
        name = posixpath.relpath(f, self._base) if self._base else posixpath.basename(f)
        return f"{name}#{row - self.rows.offsets[i]}"

    def _ids(self, part: pa.Table, first: int) -> pa.Array:
        if self.id is not None:
            return text_column(part, self.id)
        return pc.cast(pa.array(range(first, first + part.num_rows), pa.int64()), pa.string())

    def _groups(self, part: pa.Table, g: str) -> pa.Array:
        names = self.group_names.get(g)
        if names is None:
            return text_column(part, g)
        return pa.array(
            [
                None if v is None or not 0 <= v < len(names) else names[v]
                for v in part.column(g).to_pylist()
            ],
            pa.string(),
        )

    def _has_mask(self, part: pa.Table) -> pa.Array:
        if self.mask is None:
            return pa.array([False] * part.num_rows)
        col = part.column(self.mask).combine_chunks()
        if pa.types.is_struct(col.type):
            present = pc.or_kleene(
                pc.is_valid(pc.struct_field(col, "bytes")),
                pc.is_valid(pc.struct_field(col, "path")),
            )
            return pc.and_kleene(pc.is_valid(col), present).fill_null(False)
        return pc.fill_null(pc.not_equal(pc.cast(col, pa.string()), ""), False)

    def light(self, rows: int = 65536) -> Iterator[pa.Table]:
        first = 0
        cols = self._used + ([self.mask] if self.mask else [])
        for part in self.rows.batches(cols or [self.image], rows):
            boxes = box_lists(part, self.cfg.columns)
            has = self._has_mask(part).to_pylist()
            yield pa.table(
                {
                    "image_id": self._ids(part, first),
                    **{f"group:{g}": self._groups(part, g) for g in self.cfg.group_by},
                    "label": empty_to_null(text_column(part, self.cfg.columns.label)),
                    "has_fg": pa.array(
                        [h or b is not None for h, b in zip(has, boxes, strict=True)]
                    ),
                    "what": pa.array([str(b) if b else "" for b in boxes], pa.string()),
                },
                schema=light_schema(self.cfg.group_by),
            )
            first += part.num_rows

    def _mask_of(self, value: Any, where: str) -> Foreground | None:
        if value is None:
            return None
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return MaskBytes(value["bytes"], f"{where}:{self.mask}")
            return MaskFile(value["path"]) if value.get("path") else None
        return MaskFile(str(value)) if str(value) else None

    def _records(self, part: pa.Table, first: int) -> list[ImageRecord]:
        ids = self._ids(part, first).to_pylist()
        labels = empty_to_null(text_column(part, self.cfg.columns.label)).to_pylist()
        groups = {g: self._groups(part, g).to_pylist() for g in self.cfg.group_by}
        images = part.column(self.image).to_pylist()
        masks = part.column(self.mask).to_pylist() if self.mask else [None] * part.num_rows
        boxes = box_lists(part, self.cfg.columns)
        out = []
        for i, image_id in enumerate(ids):
            where = self._locator(first + i)
            img = images[i] if isinstance(images[i], dict) else {"bytes": images[i], "path": None}
            data, path, error = img.get("bytes"), img.get("path"), None
            if data is None and not path:
                error = f"image {image_id!r} ({where}): no image bytes and no path"
            fg = self._mask_of(masks[i], where)
            if fg is None and boxes[i] is not None:
                fg = Boxes(boxes[i])
            out.append(
                ImageRecord(
                    image_id=image_id,
                    path=where if data is not None or not path else path,
                    groups={g: v[i] for g, v in groups.items()},
                    label=labels[i],
                    data=data,
                    fg=fg,
                    error=error,
                )
            )
        return out

    def read(self, ref: ShardRef) -> list[ImageRecord]:
        return self._records(self.rows.read(ref.start, ref.stop), ref.start)

    def take(self, rows: Sequence[int]) -> list[ImageRecord]:
        return [self._records(self.rows.read(r, r + 1), r)[0] for r in rows]

    def fetch(self, image_id: str, locator: str, mask: str | None) -> ImageRecord:
        name, _, row = locator.rpartition("#")
        if not row.isdigit():  # the image was read from its path
            return self.take([self._find(image_id)])[0]
        for i, f in enumerate(self.rows.files):
            rel = posixpath.relpath(f, self._base) if self._base else posixpath.basename(f)
            if rel == name:
                return self.take([self.rows.offsets[i] + int(row)])[0]
        raise SourceError(f"{locator}: no such file in {self.cfg.manifest}")

    def _find(self, image_id: str) -> int:
        first = 0
        for part in self.light():
            hit = pc.index(part.column("image_id"), image_id).as_py()
            if hit >= 0:
                return first + hit
            first += part.num_rows
        raise SourceError(f"image {image_id!r} is not in {self.cfg.manifest}")

    def fingerprint(self) -> str:
        return f"huggingface files={len(self.rows.files)} rows={self.rows.file_rows}"
