"""Run directory layout and exactly-once storage of shard files.

``RUN_DIR/maps/part-NNNNN.parquet`` holds shard ``NNNNN`` (manifest rows ``[k*S, (k+1)*S)``).
A shard file is written under a temporary name in the same folder and renamed with
``os.replace``, which is atomic on POSIX filesystems: a reader (or a resumed run) sees either no
file or a complete one. A lock file stops two runs from writing one folder at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "RunLock",
    "RunLockedError",
    "check_exactly_once",
    "complete_shards",
    "maps_dir",
    "read_maps",
    "shard_path",
    "verify_exactly_once",
    "write_json",
    "write_shard",
]


def maps_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "maps"


def shard_path(run_dir: str | os.PathLike[str], shard: int) -> Path:
    """``RUN_DIR/maps/part-NNNNN.parquet`` for shard index ``shard``."""
    return maps_dir(run_dir) / f"part-{shard:05d}.parquet"


def write_shard(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write JSON atomically (same rename scheme as the shards)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def complete_shards(run_dir: str | os.PathLike[str], expected_rows: Sequence[int]) -> set[int]:
    """Shards whose files exist, parse, and hold the expected number of rows.

    Args:
        expected_rows: rows of each shard, indexed by shard number.
    """
    done = set()
    for k, rows in enumerate(expected_rows):
        p = shard_path(run_dir, k)
        if not p.exists():
            continue
        try:
            if pq.ParquetFile(p).metadata.num_rows == rows:
                done.add(k)
        except (OSError, pa.ArrowException):
            continue  # unreadable leftovers are recomputed and replaced
    return done


def read_maps(run_dir: str | os.PathLike[str], columns: Sequence[str] | None = None) -> Any:
    """All stored rows of a run as a pandas DataFrame (in shard order).

    Args:
        columns: columns to read (default all; leave out ``delta`` to save memory).
    """
    files = sorted(maps_dir(run_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no shard files under {maps_dir(run_dir)}")
    # File by file: a pyarrow dataset over thousands of shard files keeps per-file metadata
    # (~70 KiB each) alive in the driver for as long as the process runs.
    cols = None if columns is None else list(columns)
    tables = [pq.read_table(f, columns=cols) for f in files]
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def verify_exactly_once(run_dir: str | os.PathLike[str], manifest_ids: Iterable[str]) -> None:
    """Check that the stored image ids equal the manifest's, each exactly once.

    Raises:
        RuntimeError: naming missing, unexpected and duplicated ids.
    """
    check_exactly_once(read_maps(run_dir, columns=["image_id"])["image_id"], manifest_ids)


def check_exactly_once(stored: Any, manifest_ids: Iterable[str]) -> None:
    """:func:`verify_exactly_once` on ids already read (a pandas Series of stored image ids)."""
    expected = list(manifest_ids)
    dup = stored[stored.duplicated()].unique().tolist()
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if dup or missing or extra:
        raise RuntimeError(
            f"stored maps do not match the manifest: {len(missing)} missing {missing[:5]}, "
            f"{len(extra)} unexpected {extra[:5]}, {len(dup)} duplicated {dup[:5]}"
        )


class RunLockedError(RuntimeError):
    """Another process holds the output folder's lock."""


class RunLock:
    """An exclusive advisory lock on ``RUN_DIR/.lock`` (released when the process dies)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh: Any = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # held open for the lock's lifetime
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
