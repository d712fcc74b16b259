"""The run folder: its layout, its lock, and exactly-once storage of shard files.

A run folder is a local folder or a prefix in object storage (``s3://``, ``gs://``); the layout
is the same (docs/design.md, "Run folder")::

    RUN_DIR/
      run.json                 the run record (pipeline.run.record), written at start and end
      summary.parquet          one row per group (pipeline.audit)
      maps/part-NNNNN.parquet  shard NNNNN: manifest rows [k*S, (k+1)*S), one row per image
      .lock                    held by the run that writes the folder

Every module that reads or writes a run folder goes through :class:`RunFolder`; every file is
written whole (:class:`pipeline.storage.store.Store`), so a reader (or a resumed run) sees
either no file or a complete one. The lock is an ``flock`` locally and a leased lock object in a
bucket (:class:`pipeline.run.lease.ObjectLock`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run.lease import LEASE_S, ObjectLock, RunLockedError
from pipeline.run.record import RunRecord
from pipeline.storage.atomic import is_temporary
from pipeline.storage.store import Store

__all__ = [
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "RunLockedError",
    "ShardWriteError",
    "read_maps",
]


class RunFolder:
    """One run's folder, local or in object storage: where each file lives and how it is read
    and written.

    Example:
        >>> RunFolder("runs/val").shard_name(3)
        'maps/part-00003.parquet'
    """

    MAPS = "maps"
    RECORD = "run.json"
    SUMMARY = "summary.parquet"
    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.store = Store(path)
        # a local folder is a Path (callers join names onto it); a bucket folder its URI
        self.path: Any = self.store.location if self.store.remote else Path(self.store.root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def remote(self) -> bool:
        return self.store.remote

    @property
    def maps_dir(self) -> Any:
        return self._at(self.MAPS)

    @property
    def record_path(self) -> Any:
        return self._at(self.RECORD)

    @property
    def summary_path(self) -> Any:
        return self._at(self.SUMMARY)

    def _at(self, name: str) -> Any:
        return self.store.uri(name) if self.remote else self.store.local(name)

    def shard_name(self, shard: int) -> str:
        """``maps/part-NNNNN.parquet`` for shard index ``shard``."""
        return f"{self.MAPS}/part-{shard:05d}.parquet"

    def shard_path(self, shard: int) -> Any:
        """Where shard ``shard`` is stored (a Path, or a URI in object storage)."""
        return self._at(self.shard_name(shard))

    def shard_names(self) -> list[str]:
        """The stored shards' names, in shard order (one listing of ``maps/``)."""
        return self.store.list(self.MAPS, "part-*.parquet")

    def shard_files(self) -> list[Any]:
        """The stored shard files (Paths, or URIs in object storage), in shard order."""
        return [self._at(n) for n in self.shard_names()]

    def write_shard(self, shard: int, table: pa.Table) -> Any:
        """Write shard ``shard`` whole (zstd Parquet): a local file renamed into place, or one
        object under its final name. A retried shard overwrites; nothing partial is left.

        Raises:
            ShardWriteError: the file could not be written; nothing is left behind.
        """
        try:
            self._write_table(self.shard_name(shard), table, compression="zstd")
        except OSError as e:
            raise ShardWriteError(
                f"cannot write {self.shard_path(shard)}: {e.strerror or e}"
            ) from None
        return self.shard_path(shard)

    def remove_temporary(self) -> None:
        """Delete temporary files left by a killed writer (call with the lock held); object
        stores never hold any."""
        if self.remote:
            return
        for folder in (self.path, self.path / self.MAPS):
            for p in folder.glob(".*.tmp") if folder.is_dir() else ():
                if is_temporary(p.name):
                    p.unlink(missing_ok=True)

    def complete_shards(self, expected_rows: Sequence[int]) -> set[int]:
        """Shards whose files exist, parse, and hold the expected number of rows (read from
        each Parquet footer; one listing of the folder).

        Args:
            expected_rows: rows of each shard, indexed by shard number.
        """
        stored = set(self.shard_names())
        done = set()
        for k, rows in enumerate(expected_rows):
            name = self.shard_name(k)
            if name not in stored:
                continue
            try:
                with self.store.open(name) as f:
                    if pq.ParquetFile(f).metadata.num_rows == rows:
                        done.add(k)
            except (OSError, pa.ArrowException):
                continue  # unreadable leftovers are recomputed and replaced
        return done

    def read_shard(self, name: str, columns: Sequence[str] | None = None, filters: Any = None):
        """One stored shard (by its name) as a pyarrow Table."""
        with self.store.open(name) as f:
            return pq.read_table(f, columns=columns, filters=filters)

    def read_maps(
        self, columns: Sequence[str] | None = None, image_ids: Collection[str] | None = None
    ) -> Any:
        """All stored rows as a pandas DataFrame, in shard order.

        Args:
            columns: columns to read (default all; leave out ``delta`` to save memory).
            image_ids: read only the rows of these images (filtered in the Parquet reader).

        Raises:
            FileNotFoundError: the folder holds no shard files.
        """
        names = self.shard_names()
        if not names:
            raise FileNotFoundError(
                f"no maps/part-*.parquet under {self.path}: not a run folder, or the run has "
                "not stored a shard yet (run `occlusion-audit run` first)"
            )
        # File by file: a pyarrow dataset over thousands of shard files keeps per-file metadata
        # (~70 KiB each) alive in the driver for as long as the process runs.
        cols = None if columns is None else list(columns)
        rows = None if image_ids is None else [("image_id", "in", sorted(image_ids))]
        tables = [self.read_shard(n, cols, rows) for n in names]
        return pa.concat_tables(tables, promote_options="default").to_pandas()

    def iter_ids(self) -> Iterator[pa.ChunkedArray]:
        """Each stored shard's ``image_id`` column, one shard at a time."""
        for name in self.shard_names():
            yield self.read_shard(name, ["image_id"]).column("image_id")

    def has_record(self) -> bool:
        return self.store.exists(self.RECORD)

    def read_record(self) -> RunRecord | None:
        """The run record, or None when the run has written none."""
        try:
            data = self.store.read_bytes(self.RECORD)
        except FileNotFoundError:
            return None
        return RunRecord.from_bytes(data, str(self.record_path))

    def write_record(self, record: RunRecord) -> None:
        self.store.write_bytes(self.RECORD, record.to_bytes())

    def write_summary(self, table: pa.Table) -> Any:
        self._write_table(self.SUMMARY, table)
        return self.summary_path

    def _write_table(self, name: str, table: pa.Table, **parquet: Any) -> None:
        """``table`` as Parquet, serialised in memory and written whole under ``name``."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **parquet)
        self.store.write_bytes(name, sink.getvalue().to_pybytes())

    def read_summary(self) -> pa.Table:
        with self.store.open(self.SUMMARY) as f:
            return pq.read_table(f)

    def write_file(self, name: str, data: bytes) -> Any:
        """Write another file of the run (``strategies.parquet``) whole."""
        self.store.write_bytes(name, data)
        return self._at(name)

    def read_file(self, name: str) -> bytes | None:
        """Another file of the run, or None when absent."""
        try:
            return self.store.read_bytes(name)
        except FileNotFoundError:
            return None

    def lock(self, lease_s: float = LEASE_S) -> Any:
        """The folder's run lock: an ``flock`` locally, a leased lock object in a bucket."""
        return ObjectLock(self.store, lease_s) if self.remote else RunLock(self.path)


def read_maps(run_dir: str | os.PathLike[str], columns: Sequence[str] | None = None) -> Any:
    """All stored rows of a run as a pandas DataFrame (in shard order).

    Args:
        run_dir: the run folder.
        columns: columns to read (default all; leave out ``delta`` to save memory).

    Example:
        >>> row = read_maps("runs/val").iloc[0]  # doctest: +SKIP
    """
    return RunFolder(run_dir).read_maps(columns)


class ShardWriteError(OSError):
    """A shard's file could not be written (a full disk, a read-only or vanished folder)."""


class RunFolderError(ValueError):
    """``output.dir`` cannot take this run: not writable, not a run folder, another run's
    settings."""


class RunLock:
    """An exclusive advisory lock on ``RUN_DIR/.lock`` (released when the process dies)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / RunFolder.LOCK
        self._fh: Any = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")  # held open for the lock's lifetime
        except OSError as e:
            raise RunFolderError(
                f"cannot write the output folder {self.path.parent}: {e.strerror or e}; choose "
                "a writable output.dir"
            ) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"{self.path.parent} is locked by another run ({holder}); wait for it to "
                    "finish or choose another output.dir"
                ) from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
