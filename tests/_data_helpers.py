"""Data-test helpers: image files, loopback S3, GCS and MongoDB servers, a Hugging Face hub
cache."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits, like a git commit


def save_image(path: Path, img: Image.Image | np.ndarray, fmt: str | None = None) -> Path:
    """Write ``img`` (PIL image or uint8/uint16 array) to ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(path, format=fmt)
    return path


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """``(h, w, 3)`` uint8 noise (incompressible, so a cut file is really truncated)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its ``http://127.0.0.1:PORT`` URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def use_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point AWS clients (boto3 and pyarrow) at ``endpoint`` with dummy credentials."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe instance metadata


def s3_put(endpoint: str, bucket: str, objects: Mapping[str, bytes]) -> None:
    """Create ``bucket`` (if needed) and upload ``objects`` (key -> bytes) with boto3."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


@contextlib.contextmanager
def gcs_server(bucket: str) -> Iterator[str]:
    """A GCS emulator (gcp-storage-emulator, in memory) with ``bucket`` on a free loopback port;
    yields its ``http://127.0.0.1:PORT`` address, the value for ``STORAGE_EMULATOR_HOST``."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as sock:  # a free port: the emulator cannot report one it picked
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def mongod_server(dbpath: Path) -> Iterator[str]:
    """FiftyOne's bundled ``mongod`` on a free loopback port, its data in ``dbpath``; yields the
    ``mongodb://127.0.0.1:PORT`` URI for ``FIFTYONE_DATABASE_URI``.

    One server that every process connects to, as a shared database is deployed: FiftyOne's own
    service would start a ``mongod`` per database folder, and processes starting at the same
    moment race for it (or attach to another folder's server on the same machine).
    """
    import importlib.util
    import subprocess
    import time

    spec = importlib.util.find_spec("fiftyone")  # not imported: importing connects nothing yet
    assert spec is not None and spec.origin is not None, "FiftyOne is not installed"
    mongod = Path(spec.origin).parent / "db" / "bin" / "mongod"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dbpath.mkdir(parents=True, exist_ok=True)
    args = ["--dbpath", str(dbpath), "--port", str(port), "--bind_ip", "127.0.0.1"]
    log = ["--logpath", str(dbpath / "mongod.log"), "--nounixsocket"]
    server = subprocess.Popen([str(mongod), *args, *log], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert server.poll() is None and time.monotonic() < deadline, "mongod did not start"
            time.sleep(0.2)
        yield f"mongodb://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def gcs_put(endpoint: str, bucket: str, objects: Mapping[str, bytes]) -> None:
    """Upload ``objects`` (key -> bytes) to ``bucket`` of the emulator at ``endpoint``."""
    import pyarrow.fs as pafs

    fs = pafs.GcsFileSystem(
        anonymous=True, scheme="http", endpoint_override=endpoint.removeprefix("http://")
    )
    for key, body in objects.items():
        with fs.open_output_stream(f"{bucket}/{key}") as f:
            f.write(body)


def make_hf_cache(
    cache_dir: Path,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    repo_type: str = "dataset",
    commit: str = COMMIT,
    ref: str = "main",
) -> Path:
    """Lay out a hub cache as ``huggingface_hub.hf_hub_download`` leaves it.

    ``<cache>/<type>s--owner--name/blobs/<hash>`` holds the bytes,
    ``snapshots/<commit>/<path>`` links to the blob (relative symlink) and ``refs/<ref>`` holds
    the commit hash. Returns the repository's cache folder.
    """
    repo = cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        pointer = repo / "snapshots" / commit / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(repo / "blobs" / digest, pointer.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo


def use_hf_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Offline hub access from ``cache_dir`` only."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
