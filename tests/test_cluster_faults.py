"""A worker node lost mid-run on a real multi-node Ray (``ray.cluster_utils.Cluster``).

The cluster is one head without CPUs (nothing runs there, as in ``cluster.yaml``) and two worker
nodes with one simulated GPU and one CPU each, so the runner's ``actors: auto`` pool puts exactly
one GPU actor on each worker node. Removing a node kills its raylet and workers for real.

What must hold: the run still ends with every image stored exactly once and ``ok``, and the shard
that was on the lost node is recorded as retried. The lost actor has ``max_restarts=-1``, but with
``num_gpus=1`` and the only GPU left held by the surviving actor, Ray cannot place it again: it
stays ``RESTARTING`` until a node with a free GPU joins, and every call to it fails within about a
second with ``ActorUnavailableError`` rather than waiting. Its shards must go to the actor that is
still alive, and a retry must not be spent on the actor that cannot run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline import load_config, read_maps, run_audit
from pipeline.run.worker import FAKE_GPUS_ENV
from tests._dataset import audit_config, image_set_with_model
from tests._faults import Background, private_ray_tmpdir, shard_files, wait_until

pytestmark = pytest.mark.slow

N_IMAGES, SHARD = 60, 4
N_SHARDS = N_IMAGES // SHARD
# 11 x 11 windows x 2 baselines per 24x24 image: a shard takes about a second on one thread,
# long enough for the node to be removed while a shard is on it.
OCCLUSION = {
    "window": [4, 4],
    "stride": [2, 2],
    "n_baselines": 2,
    "max_batch": 64,
    "engine": "generic",  # full forward passes keep each shard that long
}


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=N_IMAGES)


@pytest.fixture
def gpu_cluster(monkeypatch):
    """Head (no CPU) + two worker nodes with 1 CPU and 1 simulated GPU each; driver connected.
    The nodes start with the test setting under which a worker computes on the CPU in place of
    its simulated GPU."""
    if ray.is_initialized():  # a Ray left by another module: this test needs its own cluster
        ray.shutdown()
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")  # inherited by the raylets this process starts
    with private_ray_tmpdir():
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
        )
        try:
            workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, configure_logging=False)
            yield cluster, workers
        finally:
            ray.shutdown()
            cluster.shutdown()


def _config(root: Path, out: Path):
    cfg = audit_config(
        root,
        out,
        occlusion=OCCLUSION,
        # "auto": the runner finds Ray initialised (ray.is_initialized) and uses this cluster.
        cluster={
            "address": "auto",
            "actors": "auto",
            "gpus_per_actor": 1,
            "shard_size": SHARD,
            # One lost node costs each shard on it one retry, if retries go to actors that can
            # run them; a retry spent on the unreachable actor is a retry wasted.
            "max_retries": 1,
        },
    )
    return load_config(cfg)


def _lose_a_node_mid_run(cluster: Cluster, workers: list, run_dir: Path, cfg, replace: bool):
    """Run the audit; remove a worker node after 3 shards (and add a fresh one if ``replace``)."""
    audit = Background(lambda: run_audit(cfg, progress=False))
    started = wait_until(lambda: len(shard_files(run_dir)) >= 3 or not audit.alive(), 120)
    assert started and audit.alive(), "the audit ended or stalled before the node was removed"
    # Both GPUs are held by the pool, so the node removed is running one of the two actors.
    assert ray.available_resources().get("GPU", 0) == 0
    cluster.remove_node(workers[1])
    if replace:  # what an autoscaler does: a new node with a free GPU, where Ray restarts it
        cluster.add_node(num_cpus=1, num_gpus=1)
    assert len(shard_files(run_dir)) < N_SHARDS, "the run finished before the node was lost"
    return audit.join(timeout=180)


def _check_complete(run_dir: Path, res, workers: list) -> None:
    facts = json.loads((run_dir / "run.json").read_text())
    # the pool: one GPU actor on each worker node (node ids from inside the actors)
    assert facts["pool"]["actors"] == 2 and facts["pool"]["num_gpus"] == 1.0
    assert all(a.get("node_id") for a in facts["actors"]), "run.json actors lack the Ray node id"
    first = {a["actor"]: a for a in reversed(facts["actors"])}  # each actor's first time up
    placed = sorted(a["node_id"] for a in first.values())
    assert placed == sorted(w.node_id for w in workers), facts["actors"]
    # the timeline says which actor went away with the node, and that the other stayed
    assert [a["end"] for a in facts["actors"]].count("released") >= 1
    gone = [a for a in facts["actors"] if a["node_id"] == workers[1].node_id]
    assert gone and gone[0]["end"] != "released" and gone[0]["down_s"] is not None, gone
    # every image exactly once, all computed: the lost shard was redone on a live actor
    maps = read_maps(run_dir, columns=["image_id", "status", "error", "shard"])
    assert sorted(maps["image_id"]) == [f"img{i:03d}" for i in range(N_IMAGES)]
    assert len(shard_files(run_dir)) == N_SHARDS
    failed = maps[maps["status"] != "ok"]
    retried = facts["retried_shards"]
    assert failed.empty, f"retried {retried}\n" + failed[["image_id", "error"]].to_string()
    assert (res.ok, res.errors, res.exit_code) == (N_IMAGES, 0, 0)
    assert retried, "the shard on the lost node was not recorded as retried"


def test_a_lost_node_whose_actor_cannot_be_placed_again(gpu_cluster, image_set, tmp_path):
    cluster, workers = gpu_cluster
    run_dir = tmp_path / "run"
    res = _lose_a_node_mid_run(
        cluster, workers, run_dir, _config(image_set, run_dir), replace=False
    )
    _check_complete(run_dir, res, workers)


def test_a_lost_node_replaced_by_a_new_one(gpu_cluster, image_set, tmp_path):
    cluster, workers = gpu_cluster
    run_dir = tmp_path / "run"
    res = _lose_a_node_mid_run(cluster, workers, run_dir, _config(image_set, run_dir), replace=True)
    _check_complete(run_dir, res, workers)
