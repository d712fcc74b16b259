"""Read bytes from local paths and from ``s3://``, ``gs://``, ``hf://`` and ``http(s)://`` URIs.

One small helper shared by the manifest reader, the image loader and model loading, so that a
manifest, its images and its masks can live on local disk, an object store or the Hugging Face
Hub alike.

- ``s3://bucket/key``: pyarrow's ``S3FileSystem``. ``AWS_ENDPOINT_URL_S3`` (or
  ``AWS_ENDPOINT_URL``) is passed as ``endpoint_override`` explicitly, so a MinIO or loopback
  server works whatever the AWS SDK version; credentials come from the usual AWS chain.
- ``gs://bucket/key``: pyarrow's ``GcsFileSystem`` with default credentials; with
  ``STORAGE_EMULATOR_HOST`` set (as for Google's client libraries), anonymous requests to that
  emulator (fake-gcs-server, gcp-storage-emulator).
- ``hf://datasets/owner/name[@revision]/path`` (also ``hf://spaces/...`` and, for models,
  ``hf://owner/name[@revision]/path``, the layout of ``huggingface_hub.HfFileSystem``):
  ``hf_hub_download`` into the hub cache. ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are read at
  call time (huggingface_hub reads them once at import), so they apply in a worker whose
  environment is set after start-up; offline, files come from the cache only.
- ``http(s)://``: a plain GET.

A missing file raises ``FileNotFoundError`` whatever the store; other I/O problems (network,
permissions) raise ``OSError`` so that callers can tell bad data from a transient failure.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pyarrow.fs as pafs

__all__ = [
    "PathEscapeError",
    "UnreadableFileError",
    "base_name",
    "is_uri",
    "join_under",
    "parent",
    "read_bytes",
    "resolve_local",
    "s3_settings",
    "split_uri",
]

_URI_RE = re.compile(r"^(s3|gs|hf|https?)://", re.IGNORECASE)
_HTTP_TIMEOUT_S = 60.0  # generous: images are small, but object gateways can be slow


class PathEscapeError(ValueError):
    """A manifest path resolves outside the dataset root."""


def is_uri(path: str) -> bool:
    """Whether ``path`` is a URI of a supported store (``s3``, ``gs``, ``hf``, ``http(s)``)."""
    return bool(_URI_RE.match(path))


def split_uri(uri: str) -> tuple[str, str]:
    scheme, _, rest = uri.partition("://")
    return scheme.lower(), rest


def base_name(path: Any) -> str:
    """The last part of a path or URI, a trailing ``/`` ignored: ``s3://b/runs/val/`` -> ``val``."""
    return posixpath.basename(str(path).rstrip("/"))


def parent(path: str) -> str:
    """The folder holding ``path``: ``s3://b/val/m.csv`` -> ``s3://b/val``, ``a/m.csv`` -> ``a``.

    A bare file name gives ``"."``.
    """
    if is_uri(path):
        scheme, rest = split_uri(path)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(path) or "."


def resolve_local(path: str, base_dir: str | None) -> str:
    """An absolute, normalised local path (``~`` expanded), relative ones taken from ``base_dir``.

    URIs are returned unchanged; with ``base_dir=None`` relative paths resolve against the
    current directory.
    """
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(os.path.abspath(path))


def join_under(root: str | None, path: str) -> str:
    """Resolve a manifest ``path`` against ``root``, refusing results outside ``root``.

    The check is lexical (``..`` and absolute paths), not through symlinks, so that a dataset
    folder may link to shared storage while a manifest still cannot name ``/etc/passwd``.

    Args:
        root: dataset root (local folder or URI); ``None`` accepts ``path`` as given.
        path: relative path, or an absolute path / URI that lies under ``root``.

    Returns:
        The joined local path or URI.

    Raises:
        PathEscapeError: the path leaves ``root``.

    Example:
        >>> join_under("s3://bkt/val", "kitchen/1.png")
        's3://bkt/val/kitchen/1.png'
    """
    if root is None:
        return path
    escape = PathEscapeError(f"path {path!r} resolves outside the dataset root {root!r}")
    if is_uri(root):
        scheme, root_rest = split_uri(root)
        if is_uri(path):
            path_scheme, rest = split_uri(path)
            if path_scheme != scheme:
                raise escape
        elif path.startswith("/"):
            raise escape
        else:
            rest = f"{root_rest.rstrip('/')}/{path}"
        root_n, rest_n = posixpath.normpath(root_rest), posixpath.normpath(rest)
        if rest_n != root_n and not rest_n.startswith(root_n.rstrip("/") + "/"):
            raise escape
        return f"{scheme}://{rest_n}"
    if is_uri(path):
        raise escape
    root_n = os.path.normpath(os.path.abspath(os.path.expanduser(root)))
    target = os.path.normpath(os.path.join(root_n, path))  # an absolute path replaces root_n
    if os.path.commonpath([root_n, target]) != root_n:
        raise escape
    return target


def _endpoint(url: str, default_scheme: str) -> dict[str, str]:
    """``scheme`` and ``endpoint_override`` (host, port and path) of a pyarrow filesystem for
    ``url``, which may leave out its scheme."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"{default_scheme}://{url}")
    return {"scheme": parsed.scheme, "endpoint_override": parsed.netloc + parsed.path}


@functools.lru_cache(maxsize=8)
def _s3(
    endpoint: str | None, region: str | None, key_id: str | None, profile: str | None
) -> pafs.S3FileSystem:
    # The key id and profile only key the cache, so changed credentials get a new client.
    del key_id, profile
    kwargs: dict[str, str] = {}
    if endpoint:
        kwargs.update(_endpoint(endpoint, "https"))
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_settings() -> tuple[str | None, str | None, str | None, str | None]:
    """``(endpoint, region, access key id, profile)`` from the environment: what every S3
    client of the package (pyarrow's filesystem, the lock's boto3 client) is made from."""
    env = os.environ.get
    return (
        env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
        env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
        env("AWS_ACCESS_KEY_ID"),
        env("AWS_PROFILE"),
    )


def _s3_filesystem() -> pafs.S3FileSystem:
    return _s3(*s3_settings())


@functools.lru_cache(maxsize=4)
def _gcs(emulator: str | None) -> pafs.GcsFileSystem:
    if not emulator:
        return pafs.GcsFileSystem()
    return pafs.GcsFileSystem(anonymous=True, **_endpoint(emulator, "http"))


def _gcs_filesystem() -> pafs.GcsFileSystem:
    return _gcs(os.environ.get("STORAGE_EMULATOR_HOST"))


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
    if not is_uri(path):
        return _read_local(path, max_bytes)
    scheme, rest = split_uri(path)
    if scheme == "hf":
        from pipeline.storage.hub import hf_local_path

        return _read_local(hf_local_path(path), max_bytes)
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(path, timeout=_HTTP_TIMEOUT_S) as resp:
                return _bounded(resp, path, max_bytes)
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):
                raise FileNotFoundError(f"{path}: HTTP {e.code}") from e
            raise OSError(f"{path}: HTTP {e.code}") from e
    fs = _s3_filesystem() if scheme == "s3" else _gcs_filesystem()
    with fs.open_input_stream(rest, compression=None) as f:  # bytes as stored, no .gz magic
        return _bounded(f, path, max_bytes)
