"""Actor pool shape on a Ray that advertises GPUs: one actor per GPU, fractions share, no deadlock.

Ray schedules ``GPU`` as a plain resource, so ``ray.init(num_gpus=2)`` on a CPU machine gives
real GPU ids to actors (``ray.get_gpu_ids()``). A worker whose torch sees no CUDA refuses to
start; only under the test setting ``FAKE_GPUS_ENV``, set in the environment this module's Ray
starts with, does it compute on the CPU. That exercises the runner's GPU placement on any
machine; the maps must not change with it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from pipeline import load_config, run_audit
from pipeline.run.pool import PoolStartError
from pipeline.run.worker import FAKE_GPUS_ENV
from tests._dataset import audit_config, image_set_with_model, stored_deltas
from tests._faults import Background

N_IMAGES = 20


def _start(num_gpus: int, fake_gpus: bool) -> None:
    # The workers inherit the environment of the Ray this process starts.
    if fake_gpus:
        os.environ[FAKE_GPUS_ENV] = "1"
    else:
        os.environ.pop(FAKE_GPUS_ENV, None)
    # address="local": always a fresh embedded Ray, never one another process advertised.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=num_gpus,
        include_dashboard=False,
        configure_logging=False,
    )


@pytest.fixture(scope="module")
def ray_with_gpus():
    """``use(n)`` (re)starts this module's own Ray with ``n`` simulated GPUs when it differs;
    its workers compute on the CPU in place of them unless ``fake_gpus=False``."""
    if ray.is_initialized():  # a Ray left by another module has other resources: not ours
        ray.shutdown()
    current: list[tuple[int, bool]] = []

    def use(num_gpus: int, fake_gpus: bool = True) -> None:
        if current != [(num_gpus, fake_gpus)]:
            ray.shutdown()
            _start(num_gpus, fake_gpus)
            current[:] = [(num_gpus, fake_gpus)]
        assert ray.cluster_resources().get("GPU", 0) == num_gpus

    yield use
    ray.shutdown()
    os.environ.pop(FAKE_GPUS_ENV, None)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=N_IMAGES)


def _audit(root: Path, out: Path, **cluster):
    cfg = audit_config(root, out, cluster={"actors": "auto", **cluster})
    return run_audit(load_config(cfg), progress=False)


def _facts(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _deltas(run_dir: Path) -> np.ndarray:
    return stored_deltas(run_dir, N_IMAGES)


@pytest.fixture(scope="module")
def cpu_run(ray_with_gpus, image_set, tmp_path_factory):
    """The reference: the same audit on a Ray without GPUs."""
    ray_with_gpus(0)
    out = tmp_path_factory.mktemp("cpu") / "run"
    res = _audit(image_set, out, shard_size=7)
    assert (res.ok, res.errors) == (N_IMAGES, 0)
    return out


def test_cpu_only_ray_with_auto_actors_uses_cpu_actors(cpu_run):
    facts = _facts(cpu_run)
    # auto without GPUs: one actor per 2 CPUs
    assert facts["pool"]["actors"] == 1 and facts["pool"]["num_gpus"] == 0.0
    assert [a["gpu_ids"] for a in facts["actors"]] == [[]]
    assert [a["device"] for a in facts["actors"]] == ["cpu"]
    # a CPU actor holds one shard and computes it on its process's main thread
    assert facts["pool"]["per_actor"] == 1
    assert [a["main_thread"] for a in facts["actors"]] == [True]


def test_one_actor_per_gpu_with_distinct_ids_and_the_same_maps(
    cpu_run, ray_with_gpus, image_set, tmp_path
):
    ray_with_gpus(2)
    res = _audit(image_set, tmp_path / "run", gpus_per_actor=1, shard_size=7)
    assert (res.ok, res.errors, res.exit_code) == (N_IMAGES, 0, 0)
    facts = _facts(tmp_path / "run")
    assert facts["pool"]["actors"] == 2 and facts["pool"]["num_gpus"] == 1.0
    # a fraction of a CPU per GPU actor: two actors fit on 2 CPUs with room for the driver
    assert facts["pool"]["num_cpus"] < 1.0
    gpu_ids = [a["gpu_ids"] for a in facts["actors"]]
    assert sorted(gpu_ids) == [["0"], ["1"]], gpu_ids
    # torch here has no CUDA: a GPU actor computes on the CPU only under the test setting
    assert [a["device"] for a in facts["actors"]] == ["cpu", "cpu"]
    assert [a["fake_gpu"] for a in facts["actors"]] == [True, True]
    assert facts["pool"]["device"] == "cuda" and "2 GPU(s) are up" in facts["pool"]["why"]
    assert len({a["pid"] for a in facts["actors"]}) == 2
    # a GPU actor holds two shards: one decodes on a second thread while the other computes
    assert facts["pool"]["per_actor"] == 2
    assert [a["main_thread"] for a in facts["actors"]] == [False, False]
    # same maps, bit for bit, as the CPU-only pool
    assert np.array_equal(
        stored_deltas(tmp_path / "run", N_IMAGES), stored_deltas(cpu_run, N_IMAGES)
    )


def test_half_a_gpu_per_actor_puts_two_actors_on_each_gpu(
    cpu_run, ray_with_gpus, image_set, tmp_path
):
    ray_with_gpus(2)
    # one image per shard, so the pool is not cut down to the shard count and the run lasts
    # until the actors that start late are up
    res = _audit(image_set, tmp_path / "run", gpus_per_actor=0.5, shard_size=1)
    assert (res.ok, res.errors) == (N_IMAGES, 0)
    facts = _facts(tmp_path / "run")
    assert facts["shards"] == N_IMAGES
    assert facts["pool"]["actors"] == 4 and facts["pool"]["num_gpus"] == 0.5
    # four actors on 2 CPUs only start because each asks for a fraction of a CPU
    assert facts["pool"]["num_cpus"] * 4 <= 2
    # the pool is elastic: an actor that comes up after the last shard is handed out does not
    # appear, but those that did share the GPUs two to one
    per_gpu = Counter(g for a in facts["actors"] for g in a["gpu_ids"])
    assert len(facts["actors"]) >= 3 and max(per_gpu.values()) == 2, facts["actors"]
    assert set(per_gpu) <= {"0", "1"} and all(n <= 2 for n in per_gpu.values()), facts["actors"]
    assert all(len(a["gpu_ids"]) == 1 for a in facts["actors"])
    # one image per shard puts other copies side by side in a forward pass than the reference's
    # shards of 7, and a convolution's sums may round differently with the batch: equal to float32
    # rounding, not bit for bit
    got, want = stored_deltas(tmp_path / "run", N_IMAGES), stored_deltas(cpu_run, N_IMAGES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_gpu_actor_whose_torch_sees_no_cuda_stops_the_run_in_one_line(
    ray_with_gpus, image_set, tmp_path
):
    ray_with_gpus(1, fake_gpus=False)  # the test setting off: the simulated GPU is unusable
    with pytest.raises(PoolStartError) as e:
        _audit(image_set, tmp_path / "run", shard_size=7)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith("the workers could not start: "), msg
    # what is wrong, with the torch build and what Ray made visible, and what to do
    assert "sees no CUDA device" in msg and "CUDA_VISIBLE_DEVICES=0" in msg, msg
    assert f"torch {torch.__version__} (CPU-only build)" in msg, msg
    assert "cluster.device: cpu" in msg, msg
    # nothing was computed on the CPU in the GPU's place
    assert not list((tmp_path / "run" / "maps").glob("part-*.parquet"))


def test_device_cuda_on_a_cluster_without_gpus_fails_at_once(ray_with_gpus, image_set, tmp_path):
    ray_with_gpus(0)
    # a long start-up timeout: a pool that waited for a GPU would outlast the join below
    run = Background(
        lambda: _audit(image_set, tmp_path / "run", device="cuda", startup_timeout_s=600)
    )
    t0 = time.monotonic()
    with pytest.raises(PoolStartError) as e:
        run.join(timeout=120)
    assert time.monotonic() - t0 < 120
    msg = str(e.value)
    assert "cluster.device is cuda, but this cluster can have no GPU" in msg, msg
    assert "0 GPU(s) and 2 CPU(s)" in msg and "no autoscaler" in msg, msg
    assert not list((tmp_path / "run" / "maps").glob("part-*.parquet"))


def test_device_cpu_keeps_a_gpu_cluster_on_cpu_actors(ray_with_gpus, image_set, tmp_path, cpu_run):
    ray_with_gpus(2)
    res = _audit(image_set, tmp_path / "run", device="cpu", shard_size=7)
    assert (res.ok, res.errors) == (N_IMAGES, 0)
    facts = _facts(tmp_path / "run")
    assert facts["pool"]["device"] == "cpu" and facts["pool"]["num_gpus"] == 0.0
    assert facts["pool"]["why"] == "cluster.device is cpu"
    assert all(a["gpu_ids"] == [] for a in facts["actors"])
    assert np.array_equal(
        stored_deltas(tmp_path / "run", N_IMAGES), stored_deltas(cpu_run, N_IMAGES)
    )
