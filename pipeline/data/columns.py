"""Columns of a light table as the sources read them: text, empty-as-null and box lists.

The table manifest and the Hugging Face source read ids, labels, groups and boxes alike.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.dataset import ColumnsConfig

__all__ = ["box_lists", "empty_to_null", "text_column"]


def text_column(table: pa.Table, name: str | None) -> pa.Array:
    """Column ``name`` as strings (nulls kept), or all null when absent."""
    if name is None or name not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col if col.type == pa.string() else pc.cast(col, pa.string())


def empty_to_null(arr: pa.Array) -> pa.Array:
    """``arr`` with empty strings as nulls."""
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def box_lists(table: pa.Table, cols: ColumnsConfig) -> list[tuple | None]:
    """Per row: a tuple of boxes, or None (no box source)."""
    if cols.box is not None:
        coords = [pc.cast(table.column(c), pa.float64()).to_pylist() for c in cols.box]
        out: list[tuple | None] = []
        for box in zip(*coords, strict=True):
            bad = any(v is None or v != v for v in box)  # v != v: NaN
            out.append(None if bad else (tuple(float(v) for v in box),))
        return out
    if cols.boxes is not None and cols.boxes in table.column_names:
        out = []
        for value in table.column(cols.boxes).to_pylist():
            if value is None:
                out.append(None)
                continue
            boxes = []
            for b in value:
                b = list(b.values()) if isinstance(b, dict) else list(b or [])
                boxes.append(tuple(float(v) if v is not None else float("nan") for v in b))
            out.append(tuple(boxes))
        return out
    return [None] * table.num_rows
