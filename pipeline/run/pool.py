"""The Ray side of a run: connecting, sizing the actor pool, and running the shard queue.

Ray is imported inside the functions: importing :mod:`pipeline.run` starts nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import AuditConfig, ClusterConfig
from pipeline.data.source import ShardRef
from pipeline.run.bank import Banks
from pipeline.run.dispatch import DispatchOutcome, dispatch
from pipeline.run.preflight import ModelCheckError
from pipeline.run.progress import Progress

__all__ = ["PoolShape", "connect", "machine_resources", "pool_shape", "run_pool"]

# Shards in flight per GPU actor: one computing while the next one decodes on the CPU. A CPU
# actor takes one at a time, as a plain (single-threaded) Ray actor: decoding the next shard would
# only compete with the compute for the same cores, and a threaded actor runs its calls off the
# process's main thread, where the same CPU forward passes measured 10-15% slower. On the 24-image
# end-to-end bench a CPU actor reached 0.58x the in-process kernel with two shards in flight, 0.8x
# with one on a threaded actor, and 0.95x with one on the main thread.
PER_ACTOR = 2


@dataclass(frozen=True)
class PoolShape:
    """Actors and the resources each one asks Ray for."""

    actors: int
    num_gpus: float
    num_cpus: float
    threads: int  # torch intra-op threads per actor
    per_actor: int = 1  # shards in flight per actor (Ray max_concurrency); see PER_ACTOR


def connect(address: str) -> bool:
    """Initialise Ray unless it already is; return True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address == "local":
        # address="local" always starts a new Ray; without it ray.init joins whatever
        # RAY_ADDRESS or a stale /tmp/ray/ray_current_cluster points to.
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def machine_resources(gpus: bool = True) -> dict[str, float]:
    """This machine's CPUs (those this process may run on) and CUDA devices (unless ``gpus`` is
    False), to size a worker here without starting Ray. Ray's own count can be lower in a
    container with a CPU quota."""
    import torch

    usable = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU
    out = {"CPU": float(len(usable(0)) if usable else os.cpu_count() or 1)}
    if gpus and torch.cuda.is_available():
        out["GPU"] = float(torch.cuda.device_count())
    return out


def pool_shape(cluster: ClusterConfig, n_shards: int, resources: dict[str, float]) -> PoolShape:
    """The actor pool for a cluster with ``resources`` (``ray.cluster_resources()``)."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    per_gpu = float(cluster.gpus_per_actor)
    auto = str(cluster.actors) == "auto"
    if gpus >= per_gpu > 0:
        actors = int(gpus // per_gpu) if auto else int(cluster.actors)
        # A fraction of a CPU per GPU actor, or a 2-core machine deadlocks with 2 GPUs.
        num_cpus = min(1.0, cpus / max(actors, 1) / 2)
        threads = max(1, int(cpus // max(actors, 1)))
        return PoolShape(max(1, min(actors, n_shards)), per_gpu, num_cpus, threads, PER_ACTOR)
    actors = max(1, int(cpus // 2)) if auto else int(cluster.actors)
    actors = max(1, min(actors, n_shards))
    num_cpus = max(cpus / actors, 0.5) if cpus >= actors else 0.5
    return PoolShape(actors, 0.0, num_cpus, max(1, int(num_cpus)))


def _actor_info(actors: Sequence[Any]) -> list[dict[str, Any]]:
    """Each actor's ``info()``; an actor that cannot start (its model fails to load there)
    ends the run with one line naming the reason, not a Ray traceback."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return list(ray.get([a.info.remote() for a in actors]))
    except (RayActorError, RayTaskError) as e:
        cause = getattr(e, "cause", None) or e
        lines = [s for s in str(cause).strip().splitlines() if s.strip()]
        raise ModelCheckError(
            f"the workers could not start: {type(cause).__name__}: {lines[-1] if lines else ''}"
        ) from None


def run_pool(
    cfg: AuditConfig,
    shards: Sequence[ShardRef],
    todo: Sequence[int],
    show: bool,
    banks: Banks | None = None,
) -> tuple[DispatchOutcome, PoolShape]:
    """Start the actor pool, run shards ``todo``, stop the pool; return what happened."""
    import ray

    from pipeline.run.worker import ShardWorker

    shape = pool_shape(cfg.cluster, max(1, len(todo)), ray.cluster_resources())
    remote = ray.remote(ShardWorker).options(
        num_gpus=shape.num_gpus,
        num_cpus=shape.num_cpus,
        max_restarts=-1,  # the dispatcher decides when a shard has failed too often
        max_task_retries=0,
        # with one call at a time, Ray runs it on the worker's main thread (see PER_ACTOR)
        max_concurrency=shape.per_actor,
    )
    actors = [remote.remote(cfg, shape.threads) for _ in range(shape.actors)] if todo else []
    banks_ref = None if banks is None else ray.put(banks)  # sent once, shared by all shards
    try:
        # actors start (and load their models) before the clock of the rate starts: start-up
        # is reported on its own (run.json timings.startup_s)
        info = _actor_info(actors)
        ready = time.time()
        outcome = dispatch(
            actors,
            shards,
            todo,
            per_actor=shape.per_actor,
            max_retries=int(cfg.cluster.max_retries),
            progress=Progress(sum(len(shards[k]) for k in todo), enabled=show),
            info=info,
            extra=None if banks_ref is None else (lambda k: banks_ref),
        )
        outcome.ready_at = ready
    finally:
        for a in actors:
            ray.kill(a)
    return outcome, shape
