"""Random access, listing and size of files in any supported store.

``read_bytes`` (:mod:`pipeline.storage.uri`) reads a whole file. Sources of data need more: a
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

from pipeline.storage.uri import _gcs_filesystem, _s3_filesystem, is_uri, read_bytes, split_uri

__all__ = ["file_size", "is_folder", "list_files", "open_file"]


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``path`` and the path within it."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, rest = split_uri(path)
    if scheme == "hf":
        from pipeline.storage.hub import hf_local_path

        return pafs.LocalFileSystem(), hf_local_path(path)
    if scheme == "s3":
        return _s3_filesystem(), rest
    if scheme == "gs":
        return _gcs_filesystem(), rest
    raise ValueError(f"{path}: random access needs a local path, s3://, gs:// or hf://")


def open_file(path: str) -> Any:
    """A seekable binary file (a ``pyarrow.NativeFile``) for ``path``; close it after use.

    On ``gs://`` the object is read whole into memory (the last one is kept per process):
    pyarrow's GCS random-access reader stalls on its size request against the GCS emulator, and
    whole reads work on every GCS endpoint. S3, the Hub cache and local files are read in place.

    Raises:
        FileNotFoundError: no such file.
        OSError: any other I/O failure.
    """
    fs, inner = _resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"{path}: not a file")
    if is_uri(path) and split_uri(path)[0] == "gs":
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
    fs, inner = _resolve(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return int(info.size)


def is_folder(path: str) -> bool:
    """Whether ``path`` is a folder (an ``s3://``/``gs://`` prefix holding objects counts)."""
    if is_uri(path) and split_uri(path)[0] == "hf":
        return False  # hf:// names files; a folder of the hub is listed by pattern
    fs, inner = _resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def list_files(folder: str, pattern: str = "*", recursive: bool = True) -> list[str]:
    """Files under ``folder`` whose name matches ``pattern``, sorted, as full paths or URIs.

    Hidden files and folders (a name starting with ``.``) are skipped.
    """
    fs, inner = _resolve(folder)
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
