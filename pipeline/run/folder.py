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

import json
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run.lease import ObjectLock, RunLock, RunLockedError
from pipeline.run.maps import BATCH_ROWS, iter_batches
from pipeline.run.record import RunRecord
from pipeline.storage.atomic import is_temporary
from pipeline.storage.store import Store

__all__ = [
    "IDENTITY_KEY",
    "LeaseLostError",
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "RunLockedError",
    "ShardWriteError",
    "read_maps",
]

# Parquet schema metadata of every shard: the digest of the identity of the run that wrote it
# (pipeline.run.preflight.identity_digest), so that shards of two audits in one folder are
# told apart by the end check and by aggregate.
IDENTITY_KEY = b"occlusion_audit.identity"


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
        self._names: list[str] | None = None  # the shard listing, made once (shard_names)
        # a local folder is a Path (callers join names onto it); a bucket folder its URI
        self.path: Any = self.store.location if self.store.remote else Path(self.store.root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def remote(self) -> bool:
        return self.store.remote

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

    @classmethod
    def of(cls, run: RunFolder | str | os.PathLike[str]) -> RunFolder:
        """``run`` itself when it is a :class:`RunFolder` (its listing is reused), else one."""
        return run if isinstance(run, RunFolder) else cls(run)

    def shard_names(self, fresh: bool = False) -> list[str]:
        """The stored shards' names, in shard order: ``maps/`` is listed once per folder object
        (on a bucket, one LIST request), again only with ``fresh`` (after other processes
        wrote shards)."""
        if fresh or self._names is None:
            self._names = self.store.list(self.MAPS, "part-*.parquet")
        return list(self._names)

    def require_shards(self) -> list[str]:
        """:meth:`shard_names`, refusing a folder without any.

        Raises:
            FileNotFoundError: no shard files: not a run folder, or no shard stored yet.
        """
        names = self.shard_names()
        if not names:
            raise FileNotFoundError(
                f"no maps/part-*.parquet under {self.path}: not a run folder, or the run has "
                "not stored a shard yet (run `occlusion-audit run` first)"
            )
        return names

    def iter_batches(
        self, columns: Sequence[str] | None, filter: Any = None, batch_size: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` over the shards, in order (:mod:`pipeline.run.maps`)."""
        return iter_batches(self, columns, filter, batch_size or BATCH_ROWS)

    def shard_files(self) -> list[Any]:
        """The stored shard files (Paths, or URIs in object storage), in shard order."""
        return [self._at(n) for n in self.shard_names()]

    def write_shard(
        self, shard: int, table: pa.Table, identity: str | None = None, fence: str | None = None
    ) -> Any:
        """Write shard ``shard`` whole (zstd Parquet): a local file renamed into place, or one
        object under its final name. A retried shard overwrites; nothing partial is left.

        Args:
            identity: the digest of the writing run's identity, stored in the file's metadata.
            fence: the writing run's lock token: the shard is written only while the lock
                still holds it (:meth:`check_fence`).

        Raises:
            LeaseLostError: the run no longer holds the lock; nothing was written.
            ShardWriteError: the file could not be written; nothing is left behind.
        """
        if identity is not None:
            meta = {**(table.schema.metadata or {}), IDENTITY_KEY: identity.encode()}
            table = table.replace_schema_metadata(meta)
        try:
            if fence is not None:
                self.check_fence(fence)
            self._write_table(self.shard_name(shard), table, compression="zstd")
            if self._names is not None and self.shard_name(shard) not in self._names:
                self._names = sorted([*self._names, self.shard_name(shard)])
        except OSError as e:
            raise ShardWriteError(
                f"cannot write {self.shard_path(shard)}: {e.strerror or e}"
            ) from None
        return self.shard_path(shard)

    def check_fence(self, token: str) -> None:
        """Refuse to go on unless the run lock still holds ``token``.

        Locally the lock is an ``flock``, which no other run can take while its holder lives:
        nothing to check. In a bucket the lock object is read (one small GET).

        Raises:
            LeaseLostError: another run holds the lock, or none does.
        """
        if not self.remote:
            return
        got = self.store.read_versioned(self.LOCK)  # never a mix of two renewals
        try:
            held = json.loads(got[0]) if got is not None else {}
        except ValueError:
            held = {"holder": "an unreadable lock object"}
        if not isinstance(held, dict) or held.get("token") != token:
            holder = held.get("holder", "no run") if isinstance(held, dict) else "no run"
            raise LeaseLostError(
                f"{self.path}: the run lock is held by {holder}, not by this run: it lost its "
                "lease, and writes nothing more"
            )

    def remove_temporary(self) -> None:
        """Delete temporary files left by a killed writer (call with the lock held); object
        stores never hold any."""
        if self.remote:
            return
        for folder in (self.path, self.path / self.MAPS):
            for p in folder.glob(".*.tmp") if folder.is_dir() else ():
                if is_temporary(p.name):
                    p.unlink(missing_ok=True)

    def complete_shards(
        self, expected_rows: Sequence[int], identity: str | None = None
    ) -> set[int]:
        """Shards whose files exist, parse, and hold the expected number of rows (read from
        each Parquet footer; one listing of the folder), written by a run of ``identity`` (or
        before shards recorded one).

        Args:
            expected_rows: rows of each shard, indexed by shard number.
            identity: the resuming run's identity digest; a shard another identity wrote is
                recomputed.
        """
        stored = set(self.shard_names())
        done = set()
        for k, rows in enumerate(expected_rows):
            name = self.shard_name(k)
            if name not in stored:
                continue
            try:
                with self.store.open(name) as f:
                    footer = pq.ParquetFile(f)
                    written = (footer.schema_arrow.metadata or {}).get(IDENTITY_KEY)
                    ours = identity is None or written in (None, identity.encode())
                    if footer.metadata.num_rows == rows and ours:
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
        names = self.require_shards()
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

    def lock(self, lease_s: float) -> Any:
        """The folder's run lock: an ``flock`` locally, a leased lock object in a bucket whose
        lease lasts ``lease_s`` seconds (``output.lock_lease_s``)."""
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


class LeaseLostError(ShardWriteError):
    """The run lost its lock to another run: none of its shards may be written any more."""


class RunFolderError(ValueError):
    """``output.dir`` cannot take this run: not writable, not a run folder, another run's
    settings."""
