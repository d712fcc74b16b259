"""A folder on local disk or in an object store (``s3://``, ``gs://``), with whole-object writes.

Run and report folders live here. A write is all or nothing in every store: locally a temporary
file renamed into place (:func:`pipeline.storage.atomic.atomic_write`); in S3 and GCS one upload
under the final name, which the store shows only once it is complete (a single PUT, a completed
multipart upload, a finalised resumable upload). No temporary object is ever created, so none
is left behind.

Create-if-absent (:meth:`Store.put_if_absent`) and replace-if-unchanged
(:meth:`Store.replace_if_match`) are conditional writes: ``O_EXCL`` locally, ``If-None-Match: *``
and ``If-Match: <etag>`` on S3 (boto3, the ``[s3]`` extra). A store without conditional writes
(GCS through pyarrow, which sends no preconditions) gets a check-then-write, which two writers
starting within the same instant can both pass (docs/design.md, "Run folder").
Both return the version they wrote, so a caller that writes again conditionally needs no second
request to learn it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.storage.atomic import atomic_write
from pipeline.storage.cloud import s3_settings
from pipeline.storage.paths import check_folder_uri, is_uri, split_uri
from pipeline.storage.read import locate, scheme_of

__all__ = ["Store", "StoreError", "StoreVersion"]

StoreVersion = str  # an etag (S3), a generation (GCS) or an mtime (local): what changes on write
_STABLE_READS = 5  # reads of an object rewritten meanwhile before giving up (read_versioned)


class StoreError(OSError):
    """A store request failed (an unreachable endpoint, a 5xx, a refused credential): botocore's
    and pyarrow's own errors, as the ``OSError`` every caller already handles."""


def _translated(method: Any) -> Any:
    """Raise a store client's errors as :class:`StoreError` naming the operation and the file;
    ``OSError`` (``FileNotFoundError`` included) passes as it is."""

    @functools.wraps(method)
    def call(self: Store, name: str = "", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, name, *args, **kwargs)
        except OSError:
            raise
        except Exception as e:
            if not _is_client_error(e):
                raise
            raise StoreError(
                f"{self.uri(name)}: {method.__name__.strip('_')} failed: {type(e).__name__}: {e}"
            ) from e

    return call


def _is_client_error(e: Exception) -> bool:
    if isinstance(e, pa.ArrowException):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - without the [s3] extra there is no botocore
        return False
    return isinstance(e, BotoCoreError | ClientError)


class Store:
    """A folder; every name is relative to it, with ``/`` separators.

    Args:
        location: a local folder, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

    Example:
        >>> Store("s3://audits/nightly/2026-12-01").uri("maps/part-00000.parquet")
        's3://audits/nightly/2026-12-01/maps/part-00000.parquet'
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = str(location)
        self.remote = is_uri(text)
        if self.remote:
            try:
                check_folder_uri(text)
            except ValueError as e:
                raise ValueError(f"a run or report folder {e}") from None
            scheme, rest = split_uri(text)
            self.scheme, self.root = scheme, rest.rstrip("/")
            self.location = f"{scheme}://{self.root}"
            self.fs = locate(self.location)[0]
        else:
            self.scheme, self.root = "file", os.path.abspath(text)
            self.location = self.root
            self.fs = pafs.LocalFileSystem()

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name) if name else self.root

    def uri(self, name: str = "") -> str:
        """The full path or URI of ``name``."""
        return f"{self.scheme}://{self._path(name)}" if self.remote else self._path(name)

    def local(self, name: str = "") -> Path:
        """The local path of ``name`` (a local store only)."""
        if self.remote:
            raise ValueError(f"{self.location} is not a local folder")
        return Path(self._path(name))

    # -- reading ---------------------------------------------------------------------------
    @_translated
    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    @_translated
    def read_bytes(self, name: str) -> bytes:
        """The whole file (``FileNotFoundError`` when absent)."""
        try:
            with self.fs.open_input_stream(self._path(name), compression=None) as f:
                return bytes(f.read())
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.exists(name):
                raise FileNotFoundError(f"{self.uri(name)}: no such file") from e
            raise

    @_translated
    def read_versioned(self, name: str) -> tuple[bytes, StoreVersion] | None:
        """The whole of ``name`` and the version it was read at, from one state of the object;
        None when it does not exist. For objects that another process rewrites (the run lock).

        :meth:`read_bytes` on S3 asks for the size, then for that many bytes: a rewrite in
        between yields part of one version or a mix. On S3 this is one GET (body and ETag);
        elsewhere the version is read before and after, and the read repeated until they agree.
        """
        if self.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                got = _s3_client().get_object(**_s3_key(self._path(name)))
                return bytes(got["Body"].read()), str(got["ETag"])
            except ClientError as e:
                if _missing(e):
                    return None
                raise
        for _ in range(_STABLE_READS):
            before = self.version(name)
            if before is None:
                return None
            try:
                data = self.read_bytes(name)
            except FileNotFoundError:
                continue  # deleted between the two requests: ask again
            if self.version(name) == before:
                return data, before
        raise StoreError(f"{self.uri(name)} changed during each of {_STABLE_READS} reads")

    @_translated
    def open(self, name: str) -> Any:
        """A seekable file for a Parquet reader, which then fetches only the footer and the
        columns it reads (ranged GETs on S3). A ``gs://`` object is read whole: pyarrow's GCS
        random-access reader stalls on its size request against the GCS emulator."""
        if self.remote and scheme_of(self.location).whole_object:
            return pa.BufferReader(self.read_bytes(name))
        return self.fs.open_input_file(self._path(name))

    @_translated
    def list(self, folder: str = "", pattern: str = "*", recursive: bool = False) -> list[str]:
        """Names (relative to the store) of the files in ``folder`` matching ``pattern``, sorted."""
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True, recursive=recursive)
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            name = posixpath.relpath(info.path, self.root)
            if fnmatch.fnmatch(posixpath.basename(name), pattern):
                out.append(name)
        return sorted(out)

    @_translated
    def version(self, name: str) -> StoreVersion | None:
        """What changes whenever ``name`` is written, or None when it does not exist."""
        if self.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                return str(_s3_client().head_object(**_s3_key(self._path(name)))["ETag"])
            except ClientError as e:
                if _missing(e):
                    return None
                raise
        info = self.fs.get_file_info(self._path(name))
        if info.type != pafs.FileType.File:
            return None
        return f"{info.mtime_ns}-{info.size}"

    # -- writing ---------------------------------------------------------------------------
    @_translated
    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``name`` whole; a reader sees the old content or the new, never a part."""
        if not self.remote:
            return str(atomic_write(self._path(name), lambda p: p.write_bytes(data)))
        with self.fs.open_output_stream(self._path(name)) as f:
            f.write(data)
        return self.uri(name)

    @_translated
    def delete(self, name: str) -> None:
        """Remove ``name`` (nothing when absent)."""
        if self.scheme == "s3":
            # boto3, not pyarrow: pyarrow writes an empty "folder/" marker object after deleting
            # the last file of a prefix
            _s3_client().delete_object(**_s3_key(self._path(name)))
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._path(name))

    @_translated
    def put_if_absent(self, name: str, data: bytes) -> StoreVersion | None:
        """Create ``name`` holding ``data`` unless it exists.

        Returns:
            The version this call wrote (as :meth:`version` would read it), or None when
            ``name`` already existed.
        """
        if self.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                put = _s3_client().put_object(
                    **_s3_key(self._path(name)), Body=data, IfNoneMatch="*"
                )
                return str(put["ETag"])  # what head_object will report for this object
            except ClientError as e:
                if _precondition_failed(e):
                    return None
                raise
        if not self.remote:
            path = self._path(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.new"
            Path(tmp).write_bytes(data)
            try:
                os.link(tmp, path)  # fails when the name exists: create-if-absent, whole content
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
            return self.version(name)
        if self.exists(name):  # no preconditions through pyarrow's GCS client
            return None
        self.write_bytes(name, data)
        return self.version(name)

    @_translated
    def replace_if_match(
        self, name: str, data: bytes, version: StoreVersion
    ) -> StoreVersion | None:
        """Overwrite ``name`` only if it still is at ``version``.

        Returns:
            The version this call wrote, or None when ``name`` was at another version (or gone).
        """
        if self.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                put = _s3_client().put_object(
                    **_s3_key(self._path(name)), Body=data, IfMatch=version
                )
                return str(put["ETag"])
            except ClientError as e:
                if _precondition_failed(e) or _missing(e):
                    return None
                raise
        if self.version(name) != version:  # local and GCS: check, then write
            return None
        self.write_bytes(name, data)
        return self.version(name)


def _s3_key(path: str) -> dict[str, str]:
    bucket, _, key = path.partition("/")
    return {"Bucket": bucket, "Key": key}


def _s3_client() -> Any:
    """A boto3 S3 client with the endpoint and credentials pyarrow's filesystem uses."""
    return _client(*s3_settings())


@functools.lru_cache(maxsize=4)
def _client(endpoint: str | None, region: str | None, key_id: str | None, profile: str | None):
    # One client per process and settings: making one loads botocore's service model (tens of
    # MB), and the lease renewals call it every few seconds. Clients are thread-safe once made.
    # The key id and profile only key the cache, so changed credentials get a new client.
    del key_id, profile
    try:
        import boto3
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "run folders on s3:// need boto3 for their lock: pip install 'occlusion-audit[s3]'"
        ) from e
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None)


def _status(e: Any) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _precondition_failed(e: Any) -> bool:
    code = str(e.response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (409, 412)


def _missing(e: Any) -> bool:
    code = str(e.response.get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404") or _status(e) == 404
