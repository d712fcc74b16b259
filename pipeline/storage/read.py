"""One resolver from a path or URI to where its bytes are: each scheme's handler, in one table.

``file`` (local paths), ``s3``, ``gs``, ``hf`` (a file of the Hugging Face Hub, through its cache)
and ``http(s)`` each give a whole-file reader, and all but ``http(s)`` a pyarrow filesystem for
random access and listings (:func:`locate`). Every reader of the package comes here
(:func:`read_bytes`, :mod:`pipeline.storage.files`, :class:`pipeline.storage.store.Store`).

A missing file raises ``FileNotFoundError`` whatever the store; other I/O problems (network,
permissions) raise ``OSError`` so that callers can tell bad data from a transient failure.
"""

from __future__ import annotations

import os
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.storage.cloud import gcs_filesystem, s3_filesystem
from pipeline.storage.hub import hf_local_path
from pipeline.storage.paths import is_uri, split_uri

__all__ = ["Scheme", "UnreadableFileError", "locate", "read_bytes", "scheme_of"]

_HTTP_TIMEOUT_S = 60.0  # generous: images are small, but object gateways can be slow


class UnreadableFileError(ValueError):
    """A path that must not be read as data: not a regular file, or larger than allowed."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _read_local(path: str, max_bytes: int | None) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. The
    # type is checked on the open descriptor, so a symlink swapped in between cannot slip by.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise UnreadableFileError(f"{path} is {kind}; only regular files are read")
        return _bounded(f, path, max_bytes)


def _bounded(f: Any, path: str, max_bytes: int | None) -> bytes:
    data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise UnreadableFileError(
            f"{path} is larger than {max_bytes} bytes (dataset.max_file_bytes)"
        )
    return bytes(data)


def _local(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _hub(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.LocalFileSystem(), hf_local_path(path)


def _in(fs: Callable[[], pafs.FileSystem]) -> Callable[[str], tuple[pafs.FileSystem, str]]:
    return lambda path: (fs(), split_uri(path)[1])


def _read_store(path: str, max_bytes: int | None) -> bytes:
    fs, inner = locate(path)
    with fs.open_input_stream(inner, compression=None) as f:  # bytes as stored, no .gz magic
        return _bounded(f, path, max_bytes)


def _read_http(path: str, max_bytes: int | None) -> bytes:
    try:
        with urllib.request.urlopen(path, timeout=_HTTP_TIMEOUT_S) as resp:
            return _bounded(resp, path, max_bytes)
    except urllib.error.HTTPError as e:
        if e.code in (403, 404, 410):
            raise FileNotFoundError(f"{path}: HTTP {e.code}") from e
        raise OSError(f"{path}: HTTP {e.code}") from e


@dataclass(frozen=True)
class Scheme:
    """How one kind of address is read.

    Attributes:
        read: ``(path, max_bytes) -> bytes``, the whole file.
        locate: ``path -> (pyarrow filesystem, path in it)`` for random access and listings;
            None where there is none (``http(s)``).
        whole_object: random access reads the object whole (``gs``: pyarrow's GCS
            random-access reader stalls on its size request against the GCS emulator).
        folders: the scheme has folders to list (``hf://`` names files only).
    """

    read: Callable[[str, int | None], bytes]
    locate: Callable[[str], tuple[pafs.FileSystem, str]] | None
    whole_object: bool = False
    folders: bool = True


# The one table: every scheme the package reads, and its handler.
_SCHEMES: dict[str, Scheme] = {
    "file": Scheme(lambda p, n: _read_local(p, n), _local),
    "s3": Scheme(_read_store, _in(s3_filesystem)),
    "gs": Scheme(_read_store, _in(gcs_filesystem), whole_object=True),
    "hf": Scheme(lambda p, n: _read_local(hf_local_path(p), n), _hub, folders=False),
    "http": Scheme(_read_http, None),
    "https": Scheme(_read_http, None),
}


def scheme_of(path: str) -> Scheme:
    """The handler of ``path``'s scheme (``file`` for a local path)."""
    return _SCHEMES[split_uri(path)[0] if is_uri(path) else "file"]


def locate(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``path`` and the path within it.

    Raises:
        ValueError: a scheme without random access (``http(s)``).
    """
    found = scheme_of(path).locate
    if found is None:
        raise ValueError(f"{path}: random access needs a local path, s3://, gs:// or hf://")
    return found(path)


def read_bytes(path: str, max_bytes: int | None = None) -> bytes:
    """The whole content of a local file or supported URI.

    Args:
        path: local path, ``s3://``, ``gs://``, ``hf://`` or ``http(s)://`` URI.
        max_bytes: refuse a file larger than this (None: no bound).

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: a local path that is no regular file (a FIFO, a device, a socket),
            or a file larger than ``max_bytes``.
        OSError: any other I/O failure (network, permissions).

    Example:
        >>> read_bytes("s3://bkt/val/manifest.parquet")[:4]  # doctest: +SKIP
        b'PAR1'
    """
    return scheme_of(path).read(path, max_bytes)
