"""The audit on a cluster that starts from zero nodes, under Ray's real autoscaler.

The head has no CPU and no worker runs; the autoscaler (Ray's fake multi-node provider,
``tests/_autoscaler.py``) starts nodes of the declared types when actors ask for them. The
worker nodes start with the test setting under which a worker computes on the CPU in place of
its simulated GPU (``FAKE_GPUS_ENV``). Each run goes through the command line, as a job's does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from pipeline.run.worker import FAKE_GPUS_ENV
from tests._autoscaler import FakeCluster, autoscaling_cluster, kill_node, worker_node_ids
from tests._dataset import audit_config, image_set_with_model, stored_deltas
from tests._faults import shard_files, wait_until

pytestmark = pytest.mark.slow

# 128 images: the preempted run must outlast the lost node's replacement (the node declared
# dead after about 5 s, a new one started, the actor restarted there: 20-25 s on 2 cores); with
# 64, a quiet machine finished the run 24 s after the loss, before the actor came back
N_IMAGES, SHARD = 128, 1
N_SHARDS = N_IMAGES // SHARD
GPU_NODES = 4
OCCLUSION = {  # full forward passes over 13 x 13 windows: long enough for nodes to join, and
    # for a lost node to be replaced while the run goes on
    "window": [4, 4],
    "stride": [2, 2],
    "n_baselines": 3,
    "max_batch": 64,
    "engine": "generic",
}


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=N_IMAGES)


@pytest.fixture(scope="module")
def gpu_cluster():
    types = {"gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": GPU_NODES}}
    with autoscaling_cluster(types, env={FAKE_GPUS_ENV: "1"}) as cluster:
        yield cluster


def _write_config(root: Path, out: Path, tmp: Path, **cluster) -> Path:
    cfg = audit_config(
        root,
        out,
        occlusion=OCCLUSION,
        counterfactual={"enabled": False},
        cluster={"address": "auto", "actors": "auto", "shard_size": SHARD, **cluster},
    )
    cfg["dataset"]["image_size"] = [28, 28]
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(cluster: FakeCluster, cfg: Path, *args: str) -> subprocess.Popen:
    """``python -m pipeline run CFG --no-report`` as a driver of ``cluster`` (RAY_ADDRESS)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(cfg), "--no-report", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **cluster.env},
    )


def _gpu_nodes(cluster: FakeCluster) -> list[dict]:
    """The live nodes with a GPU, seen by a short-lived driver (this process stays out of Ray,
    so that the runs' drivers are the only ones)."""
    code = (
        "import json, ray; ray.init(address='auto', log_to_driver=False);"
        "print(json.dumps([n for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold_run(gpu_cluster, image_set, tmp_path_factory):
    """The audit on the cold cluster: no worker node exists when it starts."""
    assert not ray.is_initialized()
    assert _gpu_nodes(gpu_cluster) == [], "the cluster is not cold"
    tmp = tmp_path_factory.mktemp("cold")
    out = tmp / "run"
    proc = _run_cli(gpu_cluster, _write_config(image_set, out, tmp))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stdout, stderr


def test_a_cold_cluster_scales_to_every_gpu_and_computes_there(cold_run, gpu_cluster):
    out, stdout, stderr = cold_run
    assert f"{N_IMAGES} ok, 0 failed of {N_IMAGES}" in stdout
    # auto chose the GPU from the autoscaler's node types, said so, and asked for every GPU
    assert (
        "pool: cuda (the autoscaler can start GPU nodes: gpu (up to 4 x {CPU: 1, GPU: 1})); "
        "up to 4 actor(s) of {GPU: 1, CPU: 0.5}"
    ) in stderr, stderr[-3000:]
    facts = json.loads((out / "run.json").read_text())
    pool = facts["pool"]
    assert (pool["device"], pool["actors"], pool["num_gpus"]) == ("cuda", GPU_NODES, 1.0)
    assert "the autoscaler can start GPU nodes" in pool["why"]
    # the timeline: all four actors came up, each on its own node the autoscaler started
    timeline = facts["actors"]
    assert sorted({e["actor"] for e in timeline}) == list(range(GPU_NODES)), timeline
    assert len({e["node_id"] for e in timeline}) == GPU_NODES
    assert all(e["gpu_ids"] == ["0"] and e["fake_gpu"] for e in timeline), timeline
    assert min(e["up_s"] for e in timeline) > 0  # the first one waited for its node
    assert all(e["end"] == "released" and e["down_s"] >= e["up_s"] for e in timeline)
    # at least 75% of the shards were computed on GPU actors (here: all of them)
    on_gpu = sum(e["shards"] for e in timeline if e["gpu_ids"])
    assert sum(e["shards"] for e in timeline) == N_SHARDS
    assert on_gpu >= 0.75 * N_SHARDS, timeline
    # the progress line showed the pool growing
    assert "actors=4/4" in stderr, stderr[-3000:]
    assert len(_gpu_nodes(gpu_cluster)) == GPU_NODES


def test_a_preempted_node_costs_no_image_and_duplicates_none(
    cold_run, gpu_cluster, image_set, tmp_path
):
    out = tmp_path / "run"
    proc = _run_cli(gpu_cluster, _write_config(image_set, out, tmp_path, max_retries=2))
    started = wait_until(lambda: len(shard_files(out)) >= 1 or proc.poll() is not None, 300)
    assert started and proc.poll() is None, "the run ended before a node could be lost"
    # a node that hosts an actor of this run (all four do: the cold run started them)
    victim = worker_node_ids(gpu_cluster)[0]
    assert len(worker_node_ids(gpu_cluster)) == GPU_NODES
    assert kill_node(victim) >= 1
    assert len(shard_files(out)) < N_SHARDS, "the run finished before the node was lost"
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    # exactly once, and the maps of the uninterrupted run, bit for bit
    assert f"{N_IMAGES} ok, 0 failed of {N_IMAGES}" in stdout
    assert len(shard_files(out)) == N_SHARDS
    assert np.array_equal(stored_deltas(out, N_IMAGES), stored_deltas(cold_run[0], N_IMAGES))
    facts = json.loads((out / "run.json").read_text())
    timeline = facts["actors"]
    lost = [e for e in timeline if e["node_id"] == victim]
    assert len(lost) == 1 and lost[0]["end"] != "released", timeline
    assert lost[0]["down_s"] is not None
    # the pool carried on, and Ray restarted the lost actor on the node the autoscaler started
    # in place of the lost one
    back = [e for e in timeline if e["actor"] == lost[0]["actor"] and e is not lost[0]]
    assert back and back[0]["up_s"] > lost[0]["down_s"], timeline
    assert back[0]["node_id"] not in {e["node_id"] for e in cold_timeline(cold_run)}
    assert sum(e["shards"] for e in timeline) >= N_SHARDS  # the lost shard, computed again


def test_inspect_times_a_worker_of_the_pool_on_the_cluster(gpu_cluster, image_set, tmp_path):
    cfg = _write_config(image_set, tmp_path / "run", tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "inspect", str(cfg), "--sample", "4", "--calibrate",
         "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **gpu_cluster.env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # planned as a run would be, there, and timed on a node the autoscaler started for it
    assert "pool on the cluster at auto" in out and "gpu (up to 4 x {CPU: 1, GPU: 1})" in out, out
    # GPU nodes an earlier test started may still be up (the autoscaler removes them when idle)
    why = ("cuda (the autoscaler can start GPU nodes", "cuda (4 GPU(s) are up")
    assert any(w in out for w in why) and "up to 4 actor(s)" in out, out
    line = next(s for s in out.splitlines() if s.startswith("calibration:"))
    assert "s/image per actor on cpu on node ffff" in line, line  # the simulated GPU's CPU
    assert "ETA: unknown" not in out


def cold_timeline(cold_run) -> list[dict]:
    return json.loads((cold_run[0] / "run.json").read_text())["actors"]


def test_device_cuda_on_a_cluster_without_gpu_nodes_fails_fast(image_set, tmp_path):
    types = {"cpu": {"resources": {"CPU": 2}, "max_workers": 2}}
    with autoscaling_cluster(types) as cluster:
        cfg = _write_config(image_set, tmp_path / "run", tmp_path, device="cuda")
        t0 = time.monotonic()
        proc = _run_cli(cluster, cfg, "--set", "cluster.startup_timeout_s=600")
        _, stderr = proc.communicate(timeout=300)
        waited = time.monotonic() - t0
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    line = [s for s in stderr.splitlines() if "error:" in s]
    assert len(line) == 1, stderr
    assert "cluster.device is cuda, but this cluster can have no GPU" in line[0]
    # what the cluster offers: nothing up but the CPU-less head, and its one node type
    assert "1 node(s) up with 0 GPU(s) and 0 CPU(s)" in line[0]
    assert "cpu (up to 2 x {CPU: 2})" in line[0] and "autoscaling.json" in line[0]
    assert waited < 300
    assert not (tmp_path / "run" / "maps").exists() or not shard_files(tmp_path / "run")
