"""The ``table`` format: a Parquet or CSV manifest, one row per image, paths to image files.

The same reader serves any in-memory table of that shape (the ``imagefolder`` listing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.dataset import DatasetConfig
from pipeline.data.columns import box_lists, empty_to_null, text_column
from pipeline.data.records import Boxes, ImageRecord, MaskFile, fg_from_text
from pipeline.data.rows import CsvRows, ParquetRows, Rows
from pipeline.data.source import Source, SourceError, light_schema

__all__ = ["TableSource", "records_of", "table_rows"]

_SEP = "\x1f"  # joins the fingerprint fields of a row (a unit separator never found in paths)


def table_rows(cfg: DatasetConfig) -> Rows:
    """The manifest's rows (``.parquet``/``.pq`` or ``.csv``)."""
    ext = os.path.splitext(cfg.manifest.rstrip("/"))[1].lower()
    cols = cfg.columns
    try:
        if ext in (".parquet", ".pq"):
            return ParquetRows([cfg.manifest])
        if ext == ".csv":
            text = [cols.id, cols.path, cols.label, cols.mask, *cfg.group_by]
            return CsvRows(cfg.manifest, list(dict.fromkeys(text)))
    except FileNotFoundError as e:
        raise SourceError(f"manifest not found: {cfg.manifest} ({e})") from e
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"manifest {cfg.manifest}: cannot read it: {e}") from e
    raise SourceError(f"manifest {cfg.manifest!r}: unknown format {ext!r}; use .parquet or .csv")


def records_of(table: pa.Table, cfg: DatasetConfig) -> list[ImageRecord]:
    """Rows of a manifest-shaped table as records (an empty mask cell is no mask; a box with a
    null or NaN coordinate is no box; a box of the wrong length is the item's error)."""
    cols = cfg.columns
    ids, paths = text_column(table, cols.id).to_pylist(), text_column(table, cols.path).to_pylist()
    labels = empty_to_null(text_column(table, cols.label)).to_pylist()
    masks = empty_to_null(text_column(table, cols.mask)).to_pylist()
    groups = {g: text_column(table, g).to_pylist() for g in cfg.group_by}
    boxes = box_lists(table, cols)
    out = []
    for i, (image_id, path) in enumerate(zip(ids, paths, strict=True)):
        fg, error = None, None
        if masks[i] is not None:
            fg = MaskFile(masks[i])
        elif boxes[i] is not None:
            if any(len(b) != 4 for b in boxes[i]):
                error = f"image {image_id!r}: a box must be [x0, y0, x1, y1], got {boxes[i]}"
            else:
                fg = Boxes(boxes[i])
        rec = ImageRecord(
            image_id=image_id,
            path=path,
            groups={g: v[i] for g, v in groups.items()},
            label=labels[i],
            fg=fg,
            error=error,
        )
        out.append(rec)
    return out


class TableSource(Source):
    """A manifest of image paths (Parquet or CSV), or any table of that shape.

    Args:
        cfg: the dataset section.
        rows: the table's rows; default: read ``cfg.manifest``.
        found: what was opened, in words.
        table_cfg: ``cfg`` with the column names of ``rows``, when they differ from the
            configured ones.
    """

    def __init__(
        self,
        cfg: DatasetConfig,
        rows: Rows | None = None,
        found: str = "",
        table_cfg: DatasetConfig | None = None,
    ) -> None:
        super().__init__(cfg)
        # the table's own column names (an image folder's listing names its columns itself)
        self.table_cfg = cfg = table_cfg or cfg
        self.rows = rows if rows is not None else table_rows(cfg)
        names = self.rows.schema.names
        cols = cfg.columns
        need = {"columns.id": [cols.id], "columns.path": [cols.path], "group_by": cfg.group_by}
        if cols.box is not None:
            need["columns.box"] = list(cols.box)
        if cols.boxes is not None:
            need["columns.boxes"] = [cols.boxes]
        for key, wanted in need.items():
            missing = [n for n in wanted if n not in names]
            if missing:
                raise SourceError(
                    f"{cfg.manifest} lacks column(s) {missing} named by dataset.{key}; "
                    f"present: {names}. Set dataset.{key} to the source's column names."
                )
        if self.rows.num_rows == 0:
            raise SourceError(f"{cfg.manifest} has no rows")
        self.found = found or f"{self.rows.num_rows} rows, columns {names}"
        self._used = [
            c
            for c in dict.fromkeys(
                [cols.id, cols.path, cols.label, cols.mask, *cfg.group_by, *(cols.box or ())]
                + ([cols.boxes] if cols.boxes else [])
            )
            if c in names
        ]

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def light(self, rows: int = 65536) -> Iterator[pa.Table]:
        cfg = self.table_cfg
        cols = cfg.columns
        schema = light_schema(cfg.group_by)
        for part in self.rows.batches(self._used, rows):
            mask = empty_to_null(text_column(part, cols.mask))
            has = pc.is_valid(mask)
            what = [text_column(part, cols.path), pc.fill_null(mask, "")]
            for name in [*(cols.box or ()), *([cols.boxes] if cols.boxes else [])]:
                text = pc.cast(part.column(name), pa.string()) if cols.box else None
                if text is None:  # a list column: its length says whether there is any box
                    text = pc.cast(pc.list_value_length(part.column(name)), pa.string())
                    has = pc.or_(has, pc.is_valid(part.column(name)))
                what.append(pc.fill_null(text, ""))
            if cols.box:  # one box: present when all four coordinates are numbers
                coords = [pc.cast(part.column(c), pa.float64()) for c in cols.box]
                ok = [pc.and_(pc.is_valid(c), pc.invert(pc.is_nan(c))) for c in coords]
                box_ok = ok[0]
                for o in ok[1:]:
                    box_ok = pc.and_kleene(box_ok, o)
                has = pc.or_(has, pc.fill_null(box_ok, False))
            yield pa.table(
                {
                    "image_id": text_column(part, cols.id),
                    **{f"group:{g}": text_column(part, g) for g in cfg.group_by},
                    "label": empty_to_null(text_column(part, cols.label)),
                    "has_fg": pc.fill_null(has, False),
                    "what": pc.binary_join_element_wise(*what, _SEP),
                },
                schema=schema,
            )

    def read(self, ref) -> list[ImageRecord]:
        return records_of(self.rows.read(ref.start, ref.stop), self.table_cfg)

    def take(self, rows: Sequence[int]) -> list[ImageRecord]:
        return records_of(self.rows.take(rows), self.table_cfg)

    def fetch(self, image_id: str, locator: str, mask: str | None) -> ImageRecord:
        return ImageRecord(image_id=image_id, path=locator, fg=fg_from_text(mask))

    def fingerprint(self) -> str:
        return f"table rows={self.rows.num_rows}"
