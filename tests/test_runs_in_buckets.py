"""Run folders in object storage: a real S3-compatible server on loopback (moto's server mode)
and the GCS emulator; a 3-node local Ray cluster (``ray.cluster_utils.Cluster``) with no shared
folder; killed actors and drivers; the leased lock object."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from pipeline import load_config, read_maps, run_audit
from pipeline.audit.aggregate import aggregate
from pipeline.report.build import write_report
from pipeline.run.folder import RunFolder
from pipeline.run.lease import ObjectLock, RunLockedError
from pipeline.storage.store import Store
from tests._data_helpers import gcs_server, moto_server
from tests._dataset import audit_config, image_set_with_model
from tests._faults import Background, private_ray_tmpdir, run_cli, wait_until
from tests._shared_ray import job_env_vars

N = 12
SHARD = 2
AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
       "AWS_EC2_METADATA_DISABLED")  # fmt: skip


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with bucket ``audits``; the environment points pyarrow, boto3 and every
    Ray process started afterwards at it (and a CLI driver's workers on the session's Ray head,
    with :func:`job_env_vars`)."""
    old = {k: os.environ.get(k) for k in (*AWS, "AWS_PROFILE", "AWS_ENDPOINT_URL")}
    with moto_server() as endpoint:
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_ENDPOINT_URL", None)
        values = ("testing", "testing", "us-east-1", endpoint, "true")
        os.environ.update(dict(zip(AWS, values, strict=True)))
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="audits")
        try:
            yield client
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_set_with_model(tmp_path_factory.mktemp("bucket-data"), n=N)


def _keys(client: Any, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket="audits", Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _cfg(data: Path, out: str, **cluster: Any) -> Any:
    occlusion = {"window": [8, 8], "stride": [4, 4], "n_baselines": 2, "engine": "generic"}
    return load_config(
        audit_config(
            data,
            Path(out) if "://" not in out else out,  # type: ignore[arg-type]
            occlusion=occlusion,
            cluster={"shard_size": SHARD, **cluster},
            output={"lock_lease_s": 2},
        )
    )


def _exactly_once(run: str) -> Any:
    maps = read_maps(run, columns=["image_id", "status", "delta", "fg_bg_ratio"])
    assert sorted(maps["image_id"]) == [f"img{i:03d}" for i in range(N)]
    assert (maps["status"] == "ok").all()
    return maps.set_index("image_id").sort_index()


@pytest.mark.slow
def test_a_three_node_cluster_writes_its_run_to_a_bucket(s3, data, tmp_path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    with private_ray_tmpdir():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False)
        try:
            cwd = os.getcwd()
            os.chdir(tmp_path)  # a stray local run folder would appear here
            try:
                remote = run_audit(_cfg(data, "s3://audits/three/run", address="auto", actors=3))
                # the same audit into a local folder, as the reference
                local = run_audit(_cfg(data, str(tmp_path / "local"), address="auto", actors=3))
            finally:
                os.chdir(cwd)
            facts = RunFolder("s3://audits/three/run").read_record()
            nodes_used = {a["node_id"] for a in facts.actors}
            # an actor lost mid-run: its node goes away after two shards are stored
            slow = _cfg(data, "s3://audits/three/lost", address="auto", actors=3)
            slow = replace(slow, occlusion=replace(slow.occlusion, stride=(1, 1), max_batch=16))
            audit = Background(lambda: run_audit(slow, progress=False))
            stored = lambda: _keys(s3, "three/lost/maps/")  # noqa: E731
            assert wait_until(lambda: len(stored()) >= 2 or not audit.alive(), 240)
            assert audit.alive() and len(stored()) < N // SHARD, "the run ended too early"
            cluster.remove_node(nodes[1])
            lost = audit.join(timeout=300)
        finally:
            ray.shutdown()
            cluster.shutdown()
    assert (remote.ok, local.ok) == (N, N) and len(nodes_used) == 3
    got, want = _exactly_once("s3://audits/three/run"), _exactly_once(str(tmp_path / "local"))
    np.testing.assert_array_equal(np.stack(got["delta"]), np.stack(want["delta"]))
    np.testing.assert_array_equal(got["fg_bg_ratio"], want["fg_bg_ratio"])
    _exactly_once("s3://audits/three/lost")
    assert lost.exit_code == 0 and RunFolder("s3://audits/three/lost").read_record().retried_shards
    keys = _keys(s3, "three/run/")
    shards = [k for k in keys if k.startswith("three/run/maps/")]
    assert len(shards) == N // SHARD and "three/run/run.json" in keys
    assert [k for k in keys if not k.startswith("three/run/maps/")] == ["three/run/run.json"]
    # nothing local: no run folder, no temporary file, no Parquet outside the data
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s3:").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]
    # aggregate and report read the bucket; the report goes to a bucket too
    summary = aggregate("s3://audits/three/run")
    assert summary["n"].sum() == N
    index = write_report("s3://audits/three/run", "s3://audits/three/report")
    assert index == "s3://audits/three/report/index.html"
    page = s3.get_object(Bucket="audits", Key="three/report/index.html")["Body"].read().decode()
    assert "Occlusion audit" in page and "<img" in page


@pytest.mark.slow
def test_a_killed_driver_resumes_in_the_bucket_after_its_lease(shared_ray, s3, data, tmp_path):
    """The drivers join the session's Ray head, as jobs on a cluster do."""
    slow = {"window": [4, 4], "stride": [2, 2], "n_baselines": 3, "max_batch": 16,
            "engine": "generic"}  # fmt: skip
    paths = {}
    for name in ("ref", "killed"):
        cfg = audit_config(
            data,
            f"s3://audits/kill/{name}",  # type: ignore[arg-type]
            occlusion=slow,
            cluster={"shard_size": 3, "address": "auto"},
            output={"lock_lease_s": 20},
        )
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    # the drivers join the head (never this process); its workers get the store's variables
    drivers = shared_ray.environ(**job_env_vars(*AWS))
    ref = run_cli(paths["ref"], env=drivers)
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()

    proc = run_cli(paths["killed"], env=drivers)
    shards = lambda: [k for k in _keys(s3, "kill/killed/maps/")]  # noqa: E731
    assert wait_until(lambda: len(shards()) >= 2 or proc.poll() is not None, 240)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver: its actors on the head die with it
    proc.wait()
    partial = len(shards())
    assert 2 <= partial < N // 3
    assert "kill/killed/.lock" in _keys(s3, "kill/killed/")

    # the killed driver's lease still runs: a second run is refused with the holder's name
    refused = run_cli(paths["killed"], "--resume", env=drivers)
    out = refused.stdout.read().decode()
    assert refused.wait(timeout=120) == 2, out
    assert "locked by another run (pid" in out

    lock = json.loads(s3.get_object(Bucket="audits", Key="kill/killed/.lock")["Body"].read())
    time.sleep(max(0.0, lock["lease_until"] - time.time()) + 0.5)  # expired: it is taken over
    resumed = run_cli(paths["killed"], "--resume", env=drivers)
    out = resumed.stdout.read().decode()
    assert resumed.wait(timeout=300) == 0, out
    assert "took over the lock of pid" in out and "whose lease expired" in out
    facts = json.loads(s3.get_object(Bucket="audits", Key="kill/killed/run.json")["Body"].read())
    assert facts["resumed_shards"] >= 2
    _exactly_once("s3://audits/kill/killed")
    ref_keys = [k.split("/")[-1] for k in _keys(s3, "kill/ref/maps/")]
    got_keys = [k.split("/")[-1] for k in _keys(s3, "kill/killed/maps/")]
    assert ref_keys == got_keys
    for name in ref_keys:
        a = s3.get_object(Bucket="audits", Key=f"kill/ref/maps/{name}")["Body"].read()
        b = s3.get_object(Bucket="audits", Key=f"kill/killed/maps/{name}")["Body"].read()
        assert a == b, name
    assert "kill/killed/.lock" not in _keys(s3, "kill/killed/")  # released at the end


def test_the_lock_object_refuses_a_second_holder_renews_and_is_taken_over(s3) -> None:
    store = Store("s3://audits/locks/a")
    with ObjectLock(store, lease_s=1.0) as first:
        with pytest.raises(RunLockedError, match=r"locked by another run \(pid \d+ on "):
            ObjectLock(store, lease_s=1.0).__enter__()
        time.sleep(1.6)  # longer than the lease: only the renewals keep it
        with pytest.raises(RunLockedError):
            ObjectLock(store, lease_s=1.0).__enter__()
        assert not first.lost
    assert _keys(s3, "locks/a/") == []  # released
    # a stale lock left by a killed driver is taken over
    stale = {"holder": "pid 1 on gone", "token": "x", "lease_until": time.time() - 5}
    s3.put_object(Bucket="audits", Key="locks/b/.lock", Body=json.dumps(stale).encode())
    with ObjectLock(Store("s3://audits/locks/b"), lease_s=5.0) as lock:
        held = json.loads(s3.get_object(Bucket="audits", Key="locks/b/.lock")["Body"].read())
        assert held["token"] == lock.token
    # the old holder's renewal now fails instead of overwriting the new holder
    with ObjectLock(Store("s3://audits/locks/c"), lease_s=60.0) as mine:
        s3.put_object(Bucket="audits", Key="locks/c/.lock", Body=b'{"token": "other"}')
        mine._stop.set()
        assert not Store("s3://audits/locks/c").replace_if_match(".lock", b"x", mine.version)


def test_a_lock_read_during_its_renewals_is_one_whole_version(s3) -> None:
    """A renewal rewrites the lock object while a shard's fence check reads it: the read is the
    body and ETag of one version, never a part of one (pyarrow's stream asks for the size, then
    for that many bytes of what may by then be a longer object)."""
    import hashlib
    import threading

    folder = RunFolder("s3://audits/renewals/run")
    stop = threading.Event()

    def renew() -> None:  # bodies of changing length, the same holder and token
        i = 0
        while not stop.is_set():
            i += 1
            body = {"holder": "pid 1 on here", "token": "t", "lease_until": 1e9 + i, "pad": "x" * i}
            s3.put_object(Bucket="audits", Key="renewals/run/.lock", Body=json.dumps(body).encode())

    s3.put_object(Bucket="audits", Key="renewals/run/.lock", Body=b'{"token": "t"}')
    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        for _ in range(150):
            data, version = folder.store.read_versioned(".lock")
            assert json.loads(data)["token"] == "t"
            assert version.strip('"') == hashlib.md5(data).hexdigest()  # one PUT's ETag
            folder.check_fence("t")  # LeaseLostError if it read a mix
    finally:
        stop.set()
        renewer.join()
    assert folder.store.read_versioned("gone") is None


def test_shards_are_whole_objects_and_resume_reads_their_footers(s3, data) -> None:
    folder = RunFolder("s3://audits/footers/run")
    import pyarrow as pa

    folder.write_shard(0, pa.table({"image_id": ["a", "b"]}))
    folder.write_shard(1, pa.table({"image_id": ["c"]}))
    folder.write_shard(1, pa.table({"image_id": ["c", "d"]}))  # a retry overwrites
    s3.put_object(Bucket="audits", Key="footers/run/maps/part-00002.parquet", Body=b"PAR1junk")
    assert folder.complete_shards([2, 2, 2]) == {0, 1}
    assert _keys(s3, "footers/") == [f"footers/run/maps/part-0000{i}.parquet" for i in range(3)]


@pytest.mark.slow
def test_a_run_in_the_gcs_emulator_is_exactly_once(data, tmp_path, monkeypatch) -> None:
    with gcs_server("audits") as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            res = run_audit(_cfg(data, "gs://audits/gcs/run", actors=2), progress=False)
        finally:
            ray.shutdown()
        assert (res.ok, res.errors) == (N, 0)
        _exactly_once("gs://audits/gcs/run")
        assert aggregate("gs://audits/gcs/run")["n"].sum() == N
        names = Store("gs://audits/gcs/run").list("", recursive=True)
        assert names == ["maps/" + f"part-{k:05d}.parquet" for k in range(N // SHARD)] + [
            "run.json",
            "summary.parquet",
        ]


@pytest.mark.slow
def test_nightly_runs_in_a_bucket_compare_and_chart_themselves(s3, data) -> None:
    """``trend.runs_dir`` and ``output.report_dir`` in the bucket, as the jobs set them."""
    from pipeline.report.publish import publish_run

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        docs = []
        for day in ("2026-12-01", "2026-12-02"):
            raw = audit_config(
                data,
                f"s3://audits/nightly/runs/{day}",  # type: ignore[arg-type]
                cluster={"shard_size": 6},
                output={"report_dir": f"s3://audits/nightly/reports/{day}"},
                trend={"runs_dir": "s3://audits/nightly/runs"},
            )
            cfg = load_config(raw)
            run_audit(cfg, progress=False)
            aggregate(cfg.output.dir)
            docs.append(publish_run(cfg, cfg.output.dir))
    finally:
        ray.shutdown()
    assert "compare" not in docs[0] and docs[0]["history"]["runs"] == 1
    assert docs[1]["compare"]["previous"] == "s3://audits/nightly/runs/2026-12-01"
    assert docs[1]["history"]["runs"] == 2
    keys = _keys(s3, "nightly/reports/2026-12-02/")
    for name in ("compare/compare.html", "compare/compare.json", "history/history.html"):
        assert f"nightly/reports/2026-12-02/{name}" in keys, keys
