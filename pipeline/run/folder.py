"""The run folder: its layout, its lock, and exactly-once storage of shard files.

Layout (docs/design.md, "Run folder")::

    RUN_DIR/
      run.json                 the run record (pipeline.run.record), written at start and end
      summary.parquet          one row per group (pipeline.audit)
      maps/part-NNNNN.parquet  shard NNNNN: manifest rows [k*S, (k+1)*S), one row per image
      .lock                    held by the run that writes the folder

Every module that reads or writes a run folder goes through :class:`RunFolder`; shard files are
written with :func:`pipeline.storage.atomic.atomic_write`, so a reader (or a resumed run) sees
either no file or a complete one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run.record import RunRecord
from pipeline.storage.atomic import atomic_write, is_temporary

__all__ = [
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "RunLockedError",
    "ShardWriteError",
    "read_maps",
]


class RunFolder:
    """One run's folder: where each file lives and how it is read and written.

    Example:
        >>> RunFolder("runs/val").shard_path(3).name
        'part-00003.parquet'
    """

    MAPS = "maps"
    RECORD = "run.json"
    SUMMARY = "summary.parquet"
    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def maps_dir(self) -> Path:
        return self.path / self.MAPS

    @property
    def record_path(self) -> Path:
        return self.path / self.RECORD

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    def shard_path(self, shard: int) -> Path:
        """``RUN_DIR/maps/part-NNNNN.parquet`` for shard index ``shard``."""
        return self.maps_dir / f"part-{shard:05d}.parquet"

    def shard_files(self) -> list[Path]:
        """The stored shard files, in shard order."""
        return sorted(self.maps_dir.glob("part-*.parquet"))

    def write_shard(self, shard: int, table: pa.Table) -> Path:
        """Write shard ``shard`` atomically (zstd Parquet).

        Raises:
            ShardWriteError: the file could not be written; nothing is left behind.
        """
        try:
            return atomic_write(
                self.shard_path(shard), lambda p: pq.write_table(table, p, compression="zstd")
            )
        except OSError as e:
            raise ShardWriteError(
                f"cannot write {self.shard_path(shard)}: {e.strerror or e}"
            ) from None

    def remove_temporary(self) -> None:
        """Delete temporary files left by a killed writer (call with the lock held)."""
        for folder in (self.path, self.maps_dir):
            for p in folder.glob(".*.tmp") if folder.is_dir() else ():
                if is_temporary(p.name):
                    p.unlink(missing_ok=True)

    def complete_shards(self, expected_rows: Sequence[int]) -> set[int]:
        """Shards whose files exist, parse, and hold the expected number of rows.

        Args:
            expected_rows: rows of each shard, indexed by shard number.
        """
        done = set()
        for k, rows in enumerate(expected_rows):
            p = self.shard_path(k)
            if not p.exists():
                continue
            try:
                if pq.ParquetFile(p).metadata.num_rows == rows:
                    done.add(k)
            except (OSError, pa.ArrowException):
                continue  # unreadable leftovers are recomputed and replaced
        return done

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
        files = self.shard_files()
        if not files:
            raise FileNotFoundError(
                f"no maps/part-*.parquet under {self.path}: not a run folder, or the run has "
                "not stored a shard yet (run `occlusion-audit run` first)"
            )
        # File by file: a pyarrow dataset over thousands of shard files keeps per-file metadata
        # (~70 KiB each) alive in the driver for as long as the process runs.
        cols = None if columns is None else list(columns)
        rows = None if image_ids is None else [("image_id", "in", sorted(image_ids))]
        tables = [pq.read_table(f, columns=cols, filters=rows) for f in files]
        return pa.concat_tables(tables, promote_options="default").to_pandas()

    def read_record(self) -> RunRecord | None:
        """The run record, or None when the run has written none."""
        return RunRecord.read(self.record_path) if self.record_path.exists() else None

    def write_record(self, record: RunRecord) -> None:
        record.write(self.record_path)

    def write_summary(self, table: pa.Table) -> Path:
        return atomic_write(self.summary_path, lambda p: pq.write_table(table, p))

    def read_summary(self) -> pa.Table:
        return pq.read_table(self.summary_path)

    def lock(self) -> RunLock:
        return RunLock(self.path)


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


class RunLockedError(RuntimeError):
    """Another process holds the output folder's lock."""


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
