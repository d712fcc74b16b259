"""Reading a run's maps: the stored shards as record batches, for every reader of a run folder.

Aggregation, the report, comparisons, strategies and export all read the maps through
:meth:`pipeline.run.folder.RunFolder.iter_batches`, which comes here. The folder lists its
shards once (:meth:`~pipeline.run.folder.RunFolder.shard_names`), so a command that aggregates
and reports a bucket run asks the store for the listing once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

# ``folder`` below is a pipeline.run.folder.RunFolder, which reads its maps through this module
RunFolder = Any

__all__ = ["BATCH_ROWS", "iter_batches", "stored_columns"]

BATCH_ROWS = 65_536


def stored_columns(folder: RunFolder) -> list[str]:
    """The columns the run's first shard stores (older runs lack the newer ones)."""
    names = folder.require_shards()
    with folder.store.open(names[0]) as f:
        return list(pq.read_schema(f).names)


def iter_batches(
    folder: RunFolder,
    columns: Sequence[str] | None,
    filter: pc.Expression | None = None,
    batch_size: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (``None``: all) over the run's shards, in shard order.

    Raises:
        FileNotFoundError: the run has no shard files.
        ValueError: a requested column is not stored, naming it and the stored ones.
    """
    names = folder.require_shards()
    if not folder.remote:
        files = [str(folder.path / n) for n in names]
        dataset = ds.dataset(files, format="parquet")
        columns = dataset.schema.names if columns is None else list(columns)
        _check_columns(columns, dataset.schema.names)
        # modest read-ahead: the default (16 batches, 4 files) buffers hundreds of MB of grids
        yield from dataset.to_batches(
            columns=columns,
            filter=filter,
            batch_size=batch_size,
            batch_readahead=2,
            fragment_readahead=1,
        )
        return
    # a bucket: shard by shard, each one object read once (one shard's rows in memory)
    stored = stored_columns(folder)
    columns = stored if columns is None else list(columns)
    _check_columns(columns, stored)
    for name in names:
        table = folder.read_shard(name, columns)
        if filter is not None:
            table = table.filter(filter)
        yield from table.to_batches(max_chunksize=batch_size)


def _check_columns(columns: Sequence[str], stored: Sequence[str]) -> None:
    missing = [c for c in columns if c not in stored]
    if missing:
        raise ValueError(f"column(s) {missing} not in the stored maps; have {list(stored)}")
