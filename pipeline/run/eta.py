"""How long an audit takes on the pool its config asks for, before it runs.

The pool is planned as a run plans it (:func:`pipeline.run.pool.plan_pool`) on the target: this
machine for ``cluster.address: local``; the node types of a deployment file (``cluster.yaml``, a
KubeRay manifest) as a cold cluster, for ``inspect --cluster FILE``; or the Ray cluster the
address names, which it joins. Sample images are timed through the worker's per-shard code on
one worker of the pool's shape: here, or on the cluster in a Ray task with the resources of one
actor (on a cold cluster that waits for a node). A pool on a device this machine lacks, planned
from a file, gets no ETA rather than a wrong one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import AuditConfig
from pipeline.run.offer import ClusterOffer, actor_threads, node_types_from_file
from pipeline.run.pool import PoolPlan, local_offer, machine_resources, plan_pool

__all__ = ["Estimate", "estimate"]


@dataclass(frozen=True)
class Estimate:
    """Where the pool would run, and how fast one of its workers computes.

    Attributes:
        where: the target, in words.
        pool: the pool a run would ask for there.
        seconds_per_image: one worker, calibrated (NaN: not calibrated, see ``note``).
        setup_s: seconds the worker's settings took to build (the compile, with
            ``occlusion.compile``).
        calibrated_on: the device (and node) the calibration ran on.
        note: why there is no ETA, if there is none.
    """

    where: str
    pool: PoolPlan
    seconds_per_image: float = math.nan
    setup_s: float = 0.0
    calibrated_on: str = ""
    note: str = ""


def estimate(
    config: AuditConfig, records: list[Any], n_shards: int, cluster_file: str | None = None
) -> Estimate:
    """Plan the pool of ``config`` on its target and time ``records`` (the first a warm-up)
    on one of its workers.

    Raises:
        PoolStartError: the target cannot host the pool (``device: cuda`` without GPUs).
        ValueError: ``cluster_file`` is no deployment file.
    """
    if cluster_file is not None:
        types = node_types_from_file(cluster_file)
        # a cold cluster: nothing is up but a head that runs no work
        offer = ClusterOffer((), types, cluster_file)
        pool = plan_pool(config.cluster, n_shards, offer)
        where = f"{cluster_file}, cold"
        here = "cuda" if "GPU" in machine_resources() else "cpu"
        if pool.device != here:
            note = f"this machine has no {pool.device}; run inspect on the cluster for an ETA"
            return Estimate(where, pool, note=note)
        return _here(config, records, pool, where)
    if str(config.cluster.address) == "local":
        pool = plan_pool(config.cluster, n_shards, local_offer())
        return _here(config, records, pool, "this machine")
    return _on_cluster(config, records, n_shards)


def _here(config: AuditConfig, records: list[Any], pool: PoolPlan, where: str) -> Estimate:
    import torch

    threads = pool.threads or actor_threads(pool.num_gpus, pool.num_cpus, machine_resources())
    device = torch.device(pool.device)
    per_image, setup = time_worker(config, records, threads, device)
    return Estimate(where, pool, per_image, setup, f"{device} here")


def _on_cluster(config: AuditConfig, records: list[Any], n_shards: int) -> Estimate:
    """Join the cluster ``config`` names, plan there, and time one worker of the pool's shape
    in a Ray task (it waits for a node as a pool's actor would)."""
    import ray

    from pipeline.run.offer import read_offer
    from pipeline.run.pool import connect

    started = connect(str(config.cluster.address))
    try:
        offer = read_offer()
        pool = plan_pool(config.cluster, n_shards, offer)
        where = f"the cluster at {config.cluster.address} ({offer.describe()})"
        if len(records) < 2:
            return Estimate(where, pool, note="fewer than 2 readable sample images")
        task = ray.remote(_time_on_node).options(num_gpus=pool.num_gpus, num_cpus=pool.num_cpus)
        ref = task.remote(config, records, pool.threads)
        try:
            per_image, setup, on = ray.get(ref, timeout=float(config.cluster.startup_timeout_s))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            note = f"no worker started within cluster.startup_timeout_s ({offer.describe()})"
            return Estimate(where, pool, note=note)
        return Estimate(where, pool, per_image, setup, on)
    finally:
        if started:
            ray.shutdown()


def _time_on_node(
    config: AuditConfig, records: list[Any], threads: int | None
) -> tuple[float, float, str]:
    """:func:`time_worker` inside a Ray task that has one actor's resources."""
    from pipeline.run.worker import _device, _ray_placement

    gpu_ids, node_id, assigned, node = _ray_placement()
    device, _ = _device(gpu_ids)
    if threads is None:
        threads = actor_threads(assigned.get("GPU", 0.0), assigned.get("CPU", 0.0), node)
    per_image, setup = time_worker(config, records, threads, device)
    return per_image, setup, f"{device} on node {node_id}"


def time_worker(
    config: AuditConfig, records: list[Any], threads: int, device: Any
) -> tuple[float, float]:
    """Seconds per image of one worker on ``records`` (the first is a warm-up), and the seconds
    the worker's settings took to build (with ``occlusion.compile``, the compile)."""
    import torch

    from pipeline.run.bank import Banks
    from pipeline.run.settings import worker_setup
    from pipeline.run.shard import process_shard

    if len(records) < 2:
        return math.nan, 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        t0 = time.perf_counter()
        model, compute = worker_setup(config, device)  # as a worker starts, compile included
        setup = time.perf_counter() - t0
        banks = None
        if config.counterfactual.enabled:
            with_fg = [r for r in records if r.fg is not None or config.dataset.static]
            by_group: dict = {}
            for r in with_fg:
                key = tuple(r.groups.get(g) for g in config.dataset.group_by)
                by_group.setdefault(key, []).append(r)
            banks = Banks(by_group, config)

        def once(part: list[Any]) -> float:
            t0 = time.perf_counter()
            evidence = banks.for_shard(part) if banks is not None else None
            process_shard(model, part, config, 0, compute.options, None, evidence)
            return time.perf_counter() - t0

        once(records[:1])  # warm-up: first-call allocations, the engine's plan
        return once(records[1:]) / len(records[1:]), setup
    finally:
        torch.set_num_threads(before)
