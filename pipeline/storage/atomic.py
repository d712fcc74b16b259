"""The one atomic write of the package: a reader sees the old file or the new one, never half.

Every file the package writes (shard Parquet files, ``run.json``, ``summary.parquet``, manifests,
report pages and CSVs) goes through :func:`atomic_write`, except a report's figures and group
pages (:mod:`pipeline.report.assets`): thousands of files, each derived from the run folder and
written before the ``index.html`` that links them, where a temporary file and a rename each would
cost more than drawing them. The bytes go to a temporary name in the
same folder, are flushed to disk with ``fsync``, and are renamed over the final name with
``os.replace``, which is atomic on POSIX filesystems. A failed write leaves no temporary file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "is_temporary", "write_bytes", "write_json", "write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file, then move it to ``path`` atomically.

    Args:
        path: the final file; its folder is created when missing.
        write: writes the whole file at the temporary path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> atomic_write("/tmp/x.txt", lambda p: p.write_text("hi"))  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (non-JSON values as their ``str``)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary names."""
    return name.startswith(".") and name.endswith(".tmp")
