"""A driver that lost its lock, and store faults around the lock, on a real S3 server (moto on
loopback, with the fault switch of ``tests/_s3proxy.py`` in front of it where a fault is
injected) and on a local folder.

What must hold: a driver paused past its lease writes nothing after another run took the lock
over (no shard, no run.json), exits 4 naming why, and the other run's folder ends exactly as an
uninterrupted run of that run's settings leaves it; a store fault while the lock is released
never replaces the run's outcome, and no command ends in a traceback for a store fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import yaml

from pipeline import read_maps
from pipeline.audit.aggregate import aggregate
from tests._data_helpers import moto_server
from tests._dataset import audit_config, image_set_with_model
from tests._faults import cli, run_cli, wait_until
from tests._s3proxy import S3Proxy
from tests._shared_ray import job_env_vars

# The drivers join the session's Ray head (``cluster.address: auto``), as jobs on a cluster do:
# a paused driver's actors go on, as they would there.
pytestmark = pytest.mark.slow

N = 12
AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
       "AWS_EC2_METADATA_DISABLED")  # fmt: skip
SLOW = {"window": [4, 4], "stride": [2, 2], "n_baselines": 3, "max_batch": 16,
        "engine": "generic"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_set_with_model(tmp_path_factory.mktemp("lease-data"), n=N)


@pytest.fixture(scope="module")
def s3():
    """moto on loopback with bucket ``audits``, and a fault switch in front of it; the
    environment points this process and every process it starts at the switch (the workers of
    a driver on the session's Ray head through :func:`on_head`)."""
    old = {k: os.environ.get(k) for k in (*AWS, "AWS_PROFILE", "AWS_ENDPOINT_URL")}
    with moto_server() as endpoint:
        proxy = S3Proxy(endpoint)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.update(dict(zip(AWS, ("t", "t", "us-east-1", proxy.url, "true"), strict=True)))
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="audits")
        try:
            yield client, proxy
        finally:
            proxy.stop()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _objects(client: Any, prefix: str) -> dict[str, str]:
    """Key -> ETag of every object under ``prefix`` (straight from moto)."""
    listed = client.list_objects_v2(Bucket="audits", Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed}


def _config(
    tmp: Path,
    data: Path,
    out: str,
    name: str,
    lease: float,
    address: str = "auto",
    **occlusion: Any,
) -> Path:
    cfg = audit_config(
        data,
        out,  # type: ignore[arg-type]
        occlusion={**SLOW, **occlusion},
        counterfactual={"enabled": False},
        cluster={"shard_size": 1, "address": address},
        output={"lock_lease_s": lease},
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def on_head(shared_ray, s3) -> dict[str, str]:
    """The environment of a driver that joins the session's Ray head: the head's workers get the
    store's variables through the job's runtime env. Only the drivers get it, never this
    process: a runtime env or ``RAY_ADDRESS`` here would follow its own later Rays."""
    return shared_ray.environ(**job_env_vars(*AWS))


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=timeout), out


def test_a_paused_driver_whose_lock_was_taken_over_writes_nothing_more(s3, data, tmp_path, on_head):
    client, _ = s3
    # the reference: the second audit's settings, uninterrupted, in its own folder
    ref = run_cli(
        _config(tmp_path, data, "s3://audits/lease/ref", "ref", 30, stride=[4, 4]), env=on_head
    )
    code, out = _finish(ref)
    assert code == 0, out

    # the first audit (stride 2), paused past its 3 s lease after it stored a shard; on a Ray
    # of its own, whose CPUs its paused driver holds while the second audit runs on the head
    first = run_cli(_config(tmp_path, data, "s3://audits/lease/run", "first", 3, "local"))
    shards = lambda: [k for k in _objects(client, "lease/run/maps/")]  # noqa: E731
    assert wait_until(lambda: len(shards()) >= 1 or first.poll() is not None, 300)
    assert first.poll() is None, _finish(first)[1]
    os.kill(first.pid, signal.SIGSTOP)  # the driver only: its Ray workers go on
    try:
        time.sleep(4.5)
        # the operator clears the folder and starts the second audit (stride 4) there
        for key in _objects(client, "lease/run/"):
            client.delete_object(Bucket="audits", Key=key)
        second = run_cli(_config(tmp_path, data, "s3://audits/lease/run", "second", 30,
                                 stride=[4, 4]), env=on_head)  # fmt: skip
        code, out = _finish(second)
        assert code == 0, out
        after_second = _objects(client, "lease/run/")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code, out = _finish(first)
    # the first driver stops with exit 4, naming why, and writes nothing more
    assert code == 4, out
    line = [s for s in out.splitlines() if "occlusion-audit run: error:" in s]
    assert len(line) == 1 and "Traceback" not in out, out
    assert "run lock" in line[0] and ("taken over" in line[0] or "expired" in line[0]), line[0]
    time.sleep(1.0)  # any worker write still on its way would land by now
    assert _objects(client, "lease/run/") == after_second
    record = json.loads(client.get_object(Bucket="audits", Key="lease/run/run.json")["Body"].read())
    assert record["status"] == "finished" and record["config"]["occlusion"]["stride"] == [4, 4]
    # one audit in the folder: aggregate accepts it, and its maps are the uninterrupted run's
    aggregate("s3://audits/lease/run", write=False)
    got = read_maps("s3://audits/lease/run", ["image_id", "delta"]).set_index("image_id")
    want = read_maps("s3://audits/lease/ref", ["image_id", "delta"]).set_index("image_id")
    assert sorted(got.index) == sorted(want.index) == [f"img{i:03d}" for i in range(N)]
    np.testing.assert_array_equal(
        np.stack(got.sort_index()["delta"]), np.stack(want.sort_index()["delta"])
    )


def test_a_paused_driver_keeps_a_local_folder_locked(data, tmp_path, on_head):
    """Locally the lock is an flock, held while its process lives, paused or not: the second
    run is refused, and the first finishes its audit when it goes on."""
    out = tmp_path / "run"
    first = run_cli(_config(tmp_path, data, str(out), "first", 3), env=on_head)
    assert wait_until(lambda: len(list((out / "maps").glob("part-*"))) >= 1, 300)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        time.sleep(4.0)
        second = run_cli(
            _config(tmp_path, data, str(out), "second", 3, stride=[4, 4]), "--resume", env=on_head
        )
        code, text = _finish(second)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 2 and "locked by another run (pid" in text, text
    code, text = _finish(first)
    assert code == 0, text
    assert read_maps(out, ["image_id"])["image_id"].nunique() == N


def test_a_failed_release_of_the_lock_keeps_the_run_outcome(s3, data, tmp_path, on_head):
    client, proxy = s3
    cfg = _config(tmp_path, data, "s3://audits/release/run", "run", 30, stride=[4, 4])
    # every try of the release's first request, the GET of the lock (botocore retries a 500),
    # after the last run.json
    done = ("/release/run/run.json", b'"status": "finished"')
    proxy.fail("GET", "/release/run/.lock", 500, times=10, after=done)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(cfg)], capture_output=True, text=True,
        timeout=300, env=on_head,
    )  # fmt: skip
    assert ("GET", "/audits/release/run/.lock", 500) in proxy.seen
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "could not release the run lock" in proc.stderr
    assert "report: " in proc.stdout  # the report was built after the run
    assert "release/run/run.json" in _objects(client, "release/run/")


def test_an_unreachable_store_mid_run_is_exit_4_and_a_store_fault_is_one_line(
    s3, data, tmp_path, on_head
):
    client, proxy = s3
    cfg = _config(tmp_path, data, "s3://audits/down/run", "run", 3)
    proc = run_cli(cfg, env=on_head)
    assert wait_until(lambda: len(_objects(client, "down/run/maps/")) >= 1, 300)
    proxy.stop()
    try:
        code, out = _finish(proc)
        assert code == 4, out
        assert "Traceback" not in out, out
        lines = [s for s in out.splitlines() if "occlusion-audit run: error:" in s]
        assert len(lines) == 1 and "--resume" in lines[0], out
        # another command on the unreachable store: one line, exit 2
        agg = cli("aggregate", "s3://audits/down/run")
        assert agg.returncode == 2 and "Traceback" not in agg.stderr, agg.stderr
        assert "occlusion-audit aggregate: error:" in agg.stderr
    finally:
        proxy.start()
    # the store is back: once the lease has run out, --resume finishes the audit
    time.sleep(3.5)
    code, out = _finish(run_cli(cfg, "--resume", env=on_head))
    assert code == 0, out
    assert read_maps("s3://audits/down/run", ["image_id"])["image_id"].nunique() == N
