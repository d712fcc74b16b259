"""Row ranges of tables too large to hold: one or more Parquet files read by row group, or a CSV.

A run's shard ``k`` is rows ``[k*S, (k+1)*S)`` of the source, counted across its files in
order. The driver needs only the row counts (from the Parquet footers) and one pass over a few
columns; each worker reads just the row groups its shards touch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.storage.files import open_file
from pipeline.storage.read import read_bytes

__all__ = ["CsvRows", "MemoryRows", "ParquetRows", "Rows"]


class Rows:
    """Rows of a table spread over files; ``read`` and ``batches`` are all a source needs."""

    schema: pa.Schema
    num_rows: int

    def read(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows ``[start, stop)`` (clipped to the table), in order."""
        raise NotImplementedError

    def batches(self, columns: Sequence[str], rows: int = 65536) -> Iterator[pa.Table]:
        """All rows of ``columns``, in order, ``rows`` at a time (the last batch shorter)."""
        for start in range(0, self.num_rows, rows):
            yield self.read(start, start + rows, columns)

    def take(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """The given rows (any order), as a table in that order."""
        parts = [self.read(r, r + 1, columns) for r in rows]
        if not parts:
            return self.read(0, 0, columns)
        return pa.concat_tables(parts)


class ParquetRows(Rows):
    """Parquet files in order; opening reads only their footers.

    Args:
        files: local paths or URIs (``s3://``, ``gs://``, ``hf://``).
    """

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self._meta = []
        for f in self.files:
            with open_file(f) as fh:
                self._meta.append(pq.ParquetFile(fh).metadata)
        self.schema = pq.ParquetFile(open_file(self.files[0])).schema_arrow
        self.file_rows = [m.num_rows for m in self._meta]
        self.offsets = [0]
        for n in self.file_rows:
            self.offsets.append(self.offsets[-1] + n)
        self.num_rows = self.offsets[-1]
        self._last: tuple[tuple, pa.Table] | None = None  # the last row groups read

    def _groups(self, i: int) -> list[int]:
        """First row (within file ``i``) of each row group, plus the file's row count."""
        meta = self._meta[i]
        out = [0]
        for g in range(meta.num_row_groups):
            out.append(out[-1] + meta.row_group(g).num_rows)
        return out

    def read(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        start, stop = max(0, start), min(stop, self.num_rows)
        cols = None if columns is None else list(columns)
        parts: list[pa.Table] = []
        i = max(0, bisect.bisect_right(self.offsets, start) - 1)
        while start < stop and i < len(self.files):
            lo, hi = start - self.offsets[i], min(stop, self.offsets[i + 1]) - self.offsets[i]
            bounds = self._groups(i)
            g0 = bisect.bisect_right(bounds, lo) - 1
            g1 = bisect.bisect_left(bounds, hi)
            part = self._row_groups(i, g0, g1, cols)
            parts.append(part.slice(lo - bounds[g0], hi - lo))
            start = self.offsets[i + 1]
            i += 1
        if not parts:
            return self.schema.empty_table().select(cols) if cols else self.schema.empty_table()
        return pa.concat_tables(parts)

    def _row_groups(self, i: int, g0: int, g1: int, cols: list[str] | None) -> pa.Table:
        """Row groups ``[g0, g1)`` of file ``i``. The last read is kept: consecutive shards
        usually lie in the same row group (a row group often holds many shards' rows)."""
        key = (i, g0, g1, None if cols is None else tuple(cols))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        with open_file(self.files[i]) as fh:
            part = pq.ParquetFile(fh).read_row_groups(list(range(g0, g1)), columns=cols)
        self._last = (key, part)
        return part

    def take(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """The given rows, reading each row group that holds any of them once."""
        cols = None if columns is None else list(columns)
        wanted: dict[tuple[int, int], list[int]] = {}
        for r in sorted(set(rows)):
            i = bisect.bisect_right(self.offsets, r) - 1
            bounds = self._groups(i)
            g = bisect.bisect_right(bounds, r - self.offsets[i]) - 1
            wanted.setdefault((i, g), []).append(r)
        found: dict[int, pa.Table] = {}
        for (i, g), members in wanted.items():
            with open_file(self.files[i]) as fh:
                group = pq.ParquetFile(fh).read_row_group(g, columns=cols)
            first = self.offsets[i] + self._groups(i)[g]
            picked = group.take(pa.array([r - first for r in members], pa.int64()))
            for j, r in enumerate(members):
                found[r] = picked.slice(j, 1)
        if not rows:
            return self.read(0, 0, cols)
        return pa.concat_tables([found[r] for r in rows])

    def batches(self, columns: Sequence[str], rows: int = 65536) -> Iterator[pa.Table]:
        for f in self.files:
            with open_file(f) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(
                    batch_size=rows, columns=list(columns)
                ):
                    yield pa.Table.from_batches([batch])


class MemoryRows(Rows):
    """A table held in memory (a CSV read whole, a folder listing)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.schema = table.schema
        self.num_rows = table.num_rows

    def read(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        start, stop = max(0, start), min(stop, self.num_rows)
        part = self.table.slice(start, max(0, stop - start))
        return part if columns is None else part.select(list(columns))

    def take(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        part = self.table.take(pa.array(list(rows), pa.int64()))
        return part if columns is None else part.select(list(columns))


class CsvRows(MemoryRows):
    """A CSV file, read whole (use Parquet for manifests of millions of rows).

    Args:
        path: local path or URI.
        text_columns: columns read as strings, so that ids like ``007`` keep their spelling.
    """

    def __init__(self, path: str, text_columns: Sequence[str] = ()) -> None:
        types = {c: pa.string() for c in text_columns}
        options = pacsv.ConvertOptions(column_types=types)
        super().__init__(pacsv.read_csv(pa.BufferReader(read_bytes(path)), convert_options=options))
