"""The object stores: pyarrow's S3 and GCS filesystems, made from the environment.

- ``s3://bucket/key``: pyarrow's ``S3FileSystem``. ``AWS_ENDPOINT_URL_S3`` (or
  ``AWS_ENDPOINT_URL``) is passed as ``endpoint_override`` explicitly, so a MinIO or loopback
  server works whatever the AWS SDK version; credentials come from the usual AWS chain.
- ``gs://bucket/key``: pyarrow's ``GcsFileSystem`` with default credentials; with
  ``STORAGE_EMULATOR_HOST`` set (as for Google's client libraries), anonymous requests to that
  emulator (fake-gcs-server, gcp-storage-emulator).

Clients are cached per process and settings: the lock's renewals and every shard ask for one.
"""

from __future__ import annotations

import functools
import os
import urllib.parse

import pyarrow.fs as pafs

__all__ = ["gcs_filesystem", "s3_filesystem", "s3_settings"]


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


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the current environment (cached per settings)."""
    return _s3(*s3_settings())


@functools.lru_cache(maxsize=4)
def _gcs(emulator: str | None) -> pafs.GcsFileSystem:
    if not emulator:
        return pafs.GcsFileSystem()
    return pafs.GcsFileSystem(anonymous=True, **_endpoint(emulator, "http"))


def gcs_filesystem() -> pafs.GcsFileSystem:
    """pyarrow's GCS filesystem for the current environment (cached per emulator)."""
    return _gcs(os.environ.get("STORAGE_EMULATOR_HOST"))
