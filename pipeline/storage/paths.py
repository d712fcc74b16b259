"""Paths and addresses as text: local paths and ``s3://``, ``gs://``, ``hf://``, ``http(s)://``
URIs, joined, split and checked without touching any store.

It imports nothing of the package and reads no file (``resolve_local`` only looks at the current
directory), so every layer may use it.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

__all__ = [
    "FOLDER_SCHEMES",
    "PathEscapeError",
    "base_name",
    "check_folder_uri",
    "is_uri",
    "join_under",
    "parent",
    "resolve_local",
    "split_uri",
]

_URI_RE = re.compile(r"^(s3|gs|hf|https?)://", re.IGNORECASE)
# the stores a run or report folder may live in: whole-object writes and listings
FOLDER_SCHEMES = ("s3", "gs")


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


def check_folder_uri(location: str) -> str:
    """``location`` if it may hold a run or report folder: a local path, or
    ``s3://bucket/prefix`` / ``gs://bucket/prefix`` with a bucket name.

    Raises:
        ValueError: another URI scheme, or no bucket.
    """
    if not is_uri(location):
        return location
    scheme, rest = split_uri(location)
    if scheme not in FOLDER_SCHEMES or rest.startswith("/") or not rest.strip("/").split("/")[0]:
        raise ValueError(
            f"must be a local folder, s3://bucket/prefix or gs://bucket/prefix, got {location!r}"
        )
    return location
