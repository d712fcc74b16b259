"""Random access, listing and size of files in any supported store.

``read_bytes`` (:mod:`pipeline.storage.read`) reads a whole file. Sources of data need more: a
Parquet footer and a few row groups of a large file, the members of a tar shard without
unpacking it, and the files of a folder. These work on local paths, ``s3://``, ``gs://`` and
``hf://`` (a file in the hub cache, fetched unless offline) alike.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.storage.paths import is_uri
from pipeline.storage.read import locate, read_bytes, scheme_of

__all__ = ["file_size", "is_folder", "list_files", "open_file"]


def open_file(path: str) -> Any:
    """A seekable binary file (a ``pyarrow.NativeFile``) for ``path``; close it after use.

    On ``gs://`` the object is read whole into memory (the last one is kept per process):
    pyarrow's GCS random-access reader stalls on its size request against the GCS emulator, and
    whole reads work on every GCS endpoint. S3, the Hub cache and local files are read in place.

    Raises:
        FileNotFoundError: no such file.
        OSError: any other I/O failure.
    """
    fs, inner = locate(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"{path}: not a file")
    if scheme_of(path).whole_object:
        return pa.BufferReader(_whole(path, int(info.size), info.mtime_ns))
    return fs.open_input_file(inner)


@functools.lru_cache(maxsize=1)
def _whole(path: str, size: int, mtime_ns: int | None) -> bytes:
    """The bytes of a ``gs://`` object (size and mtime key the cache, so a new object is read
    again)."""
    del size, mtime_ns
    return read_bytes(path)


def file_size(path: str) -> int:
    """Size of ``path`` in bytes (``FileNotFoundError`` when absent)."""
    fs, inner = locate(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return int(info.size)


def is_folder(path: str) -> bool:
    """Whether ``path`` is a folder (an ``s3://``/``gs://`` prefix holding objects counts)."""
    if not scheme_of(path).folders:
        return False  # hf:// names files; a folder of the hub is listed by pattern
    fs, inner = locate(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def list_files(folder: str, pattern: str = "*", recursive: bool = True) -> list[str]:
    """Files under ``folder`` whose name matches ``pattern``, sorted, as full paths or URIs.

    Hidden files and folders (a name starting with ``.``) are skipped.
    """
    fs, inner = locate(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
    base = inner.rstrip("/")
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = (
            posixpath.relpath(info.path, base)
            if is_uri(folder)
            else os.path.relpath(info.path, base)
        )
        parts = rel.replace(os.sep, "/").split("/")
        if any(p.startswith(".") for p in parts) or not fnmatch.fnmatch(parts[-1], pattern):
            continue
        out.append(folder.rstrip("/") + "/" + "/".join(parts))
    return sorted(out)
