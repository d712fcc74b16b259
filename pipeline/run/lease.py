"""The run lock of a folder in object storage: a lock object with a lease the driver renews.

``RUN/.lock`` holds JSON ``{"holder", "token", "lease_until"}`` (``lease_until`` in Unix
seconds). Taking the lock creates the object with a conditional write (create only if absent).
While the run lasts, a thread rewrites it every third of the lease with a later
``lease_until``, conditional on the object being the one this driver last wrote (``If-Match``),
so a driver that lost the lock notices instead of overwriting the new holder's. A second run
finds the object and is refused with the holder's name; a lock whose lease has expired (its
driver was killed) is taken over, with a message, by replacing exactly the expired object. The
lock object is deleted on release.

A store without conditional writes (``Store.conditional`` is False: GCS through pyarrow) gets
the same protocol with a check-then-write in place of each conditional write: two runs that
start within the same moment can both take the lock there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.storage.store import Store

__all__ = ["LEASE_S", "ObjectLock", "RunLockedError"]

LEASE_S = 60.0  # a killed driver's lock is taken over this long after its last renewal
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

    def __init__(self, store: Store, lease_s: float = LEASE_S, name: str = ".lock") -> None:
        self.store, self.lease_s, self.name = store, float(lease_s), name
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.lost = False  # set when a renewal found the lock taken by another run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        lease = {
            "holder": self.holder,
            "token": self.token,
            "lease_until": time.time() + self.lease_s,
        }
        return json.dumps(lease).encode()

    def _current(self) -> tuple[dict[str, Any] | None, str | None]:
        version = self.store.version(self.name)
        if version is None:
            return None, None
        try:
            return json.loads(self.store.read_bytes(self.name)), version
        except (FileNotFoundError, ValueError):
            return {}, version  # unreadable: treated as expired

    def __enter__(self) -> ObjectLock:
        for _ in range(3):  # the holder may release between our write and our read
            self.version = self.store.put_if_absent(self.name, self._body())
            if self.version is not None:
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
            self.version = self.store.replace_if_match(self.name, self._body(), version)
            if self.version is not None:
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
                    self.lost = True
                    _log.error("%s: the run lock was taken by another run", self.store.location)
                    return
                self.version = renewed
            except Exception as e:
                # a transient store failure (an OSError locally or from pyarrow, botocore's
                # ClientError or connection errors on S3): try again at the next tick
                _log.warning("%s: renewing the run lock failed: %s", self.store.location, e)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held, _ = self._current()
        if held is not None and held.get("token") == self.token:
            self.store.delete(self.name)
