"""The run lock of a run folder: an ``flock`` locally (:class:`RunLock`), and in object
storage a lock object with a lease the driver renews (:class:`ObjectLock`).

``RUN/.lock`` holds JSON ``{"holder", "token", "lease_until"}`` (``lease_until`` in Unix
seconds). Taking the lock creates the object with a conditional write (create only if absent).
While the run lasts, a thread rewrites it every third of the lease with a later
``lease_until``, conditional on the object being the one this driver last wrote (``If-Match``),
so a driver that lost the lock notices instead of overwriting the new holder's. A second run
finds the object and is refused with the holder's name; a lock whose lease has expired (its
driver was killed) is taken over, with a message, by replacing exactly the expired object. The
lock object is deleted on release.

A store without conditional writes (GCS through pyarrow, which sends no preconditions) gets
the same protocol with a check-then-write in place of each conditional write: two runs that
start within the same moment can both take the lock there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.storage.store import Store

__all__ = ["LOCK_NAME", "ObjectLock", "RunLock", "RunLockedError"]

LOCK_NAME = ".lock"  # in the run folder, locally and in a bucket
_log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another process holds the output folder's lock."""


class ObjectLock:
    """An exclusive lock on a folder in object storage, held through a renewed lease.

    Args:
        store: the run folder.
        lease_s: seconds a lease lasts without renewal.
        name: the lock object's name in the folder.
    """

    def __init__(self, store: Store, lease_s: float, name: str = LOCK_NAME) -> None:
        self.store, self.lease_s, self.name = store, float(lease_s), name
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.lost = False  # set when a renewal found the lock taken by another run
        self.lost_to = ""  # who holds it then, as far as the lock object says
        # until when this driver may act: the lease_until of its last successful write, a
        # second early so that it stops before another run may take the lock over
        self.valid_until = 0.0
        self._writing_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._writing_until = time.time() + self.lease_s
        lease = {"holder": self.holder, "token": self.token, "lease_until": self._writing_until}
        return json.dumps(lease).encode()

    def _wrote(self, version: str) -> None:
        self.version = version
        self.valid_until = self._writing_until - min(1.0, self.lease_s / 10)

    def check(self) -> str | None:
        """Why this driver may no longer act on the lock (None: it holds an unexpired lease)."""
        if self.lost:
            return f"the run lock of {self.store.location} was taken over by {self.lost_to}"
        late = time.time() - self.valid_until
        if late > 0:
            return (
                f"the run lock of {self.store.location} expired {late:.0f}s ago (this process "
                "was paused or cut off from the store past output.lock_lease_s), so another run "
                "may have taken it over"
            )
        return None

    def _current(self) -> tuple[dict[str, Any] | None, str | None]:
        got = self.store.read_versioned(self.name)  # the content of the version it names
        if got is None:
            return None, None
        data, version = got
        try:
            return json.loads(data), version
        except ValueError:
            return {}, version  # unreadable: treated as expired

    def __enter__(self) -> ObjectLock:
        for _ in range(3):  # the holder may release between our write and our read
            created = self.store.put_if_absent(self.name, self._body())
            if created is not None:
                self._wrote(created)
                break
            held, version = self._current()
            if held is None:
                continue
            until = float(held.get("lease_until", 0) or 0)
            if until > time.time():
                raise RunLockedError(
                    f"{self.store.location} is locked by another run ({held.get('holder')}, "
                    f"lease until {time.strftime('%H:%M:%S', time.localtime(until))}); wait for "
                    "it to finish or choose another output.dir"
                )
            taken = self.store.replace_if_match(self.name, self._body(), version)
            if taken is not None:
                self._wrote(taken)
                _log.warning(
                    "%s: took over the lock of %s, whose lease expired %.0f s ago",
                    self.store.location,
                    held.get("holder", "an unknown run"),
                    time.time() - until,
                )
                break
        else:
            raise RunLockedError(f"{self.store.location}: could not take the lock; try again")
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                # the version the write returns: no second request, and no window in which
                # another writer's version could be read as ours
                renewed = self.store.replace_if_match(self.name, self._body(), self.version or "")
                if renewed is None:
                    held, _ = self._current()
                    self.lost_to = str((held or {}).get("holder") or "another run")
                    self.lost = True
                    _log.error(
                        "%s: the run lock was taken over by %s", self.store.location, self.lost_to
                    )
                    return
                self._wrote(renewed)
            except Exception as e:
                # a transient store failure (an OSError locally or from pyarrow, botocore's
                # ClientError or connection errors on S3): try again at the next tick
                _log.warning("%s: renewing the run lock failed: %s", self.store.location, e)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held, _ = self._current()
            if held is not None and held.get("token") == self.token:
                self.store.delete(self.name)
        except Exception as e:
            # best effort: the lease expires by itself, and an error already on its way out
            # (or the run's result) must not be replaced by this one
            _log.warning(
                "%s: could not release the run lock (%s); it expires by itself within %.0fs",
                self.store.location,
                e,
                self.lease_s,
            )


class RunLock:
    """An exclusive advisory lock on ``RUN_DIR/.lock`` (released when the process dies)."""

    token = None  # nothing to fence: no other run can take an flock while its holder lives

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fh: Any = None

    def check(self) -> str | None:
        """Why this run may no longer act on the lock: never, while the process lives."""
        return None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")  # held open for the lock's lifetime
        except OSError as e:
            raise PermissionError(
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
