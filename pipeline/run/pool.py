"""The Ray side of a run: connecting, planning the actor pool, and running the shard queue.

The pool asks Ray for what the config wants, not for what is up (docs/design.md,
"Distribution"): :func:`plan_pool` chooses the device and the most actors from the cluster's
offer (:mod:`pipeline.run.offer`: the live nodes and the node types the autoscaler can start),
:func:`run_pool` creates every actor at once, and the pending ones are the autoscaler's demand.
Shards go to each actor as soon as it is up (:mod:`pipeline.run.dispatch`).

Ray is imported inside the functions: importing :mod:`pipeline.run` starts nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import AuditConfig, ClusterConfig, Device
from pipeline.data.source import ShardRef
from pipeline.run.bank import Banks
from pipeline.run.dispatch import DispatchOutcome, NoActorError, WorkerStartError, dispatch
from pipeline.run.offer import ClusterOffer, actor_threads, read_offer
from pipeline.run.progress import Progress

__all__ = [
    "PoolPlan",
    "PoolStartError",
    "connect",
    "local_offer",
    "machine_resources",
    "plan_pool",
    "run_pool",
    "worker_threads_here",
]

# Shards in flight per GPU actor: one computing while the next one decodes on the CPU. A CPU
# actor takes one at a time, as a plain (single-threaded) Ray actor: decoding the next shard would
# only compete with the compute for the same cores, and a threaded actor runs its calls off the
# process's main thread, where the same CPU forward passes measured 10-15% slower. On the 24-image
# end-to-end bench a CPU actor reached 0.58x the in-process kernel with two shards in flight, 0.8x
# with one on a threaded actor, and 0.95x with one on the main thread.
PER_ACTOR = 2

# The most actors asked for where the autoscaler's node types are unknown (KubeRay's autoscaler
# on Ray 2.60 does not report them): pending actors are the demand the autoscaler scales to,
# and an unbounded number of them would only crowd Ray's scheduler. cluster.actors asks for more.
UNKNOWN_CAPACITY_ACTORS = 64


class PoolStartError(RuntimeError):
    """The pool cannot start: the cluster offers nothing the config asks for, or no actor came
    up within ``cluster.startup_timeout_s`` (the CLI exits 2)."""


@dataclass(frozen=True)
class PoolPlan:
    """The actors a run asks Ray for, and why on that device.

    Attributes:
        device: ``"cuda"`` or ``"cpu"``.
        why: the reason for the device, in words (``run.json`` pool.why).
        actors: the most actors asked for (all are created; pending ones wait for nodes).
        num_gpus, num_cpus: what each actor asks Ray for.
        threads: torch intra-op threads per actor; None: each GPU actor takes its share of
            its node's CPUs (:func:`actor_threads`).
        per_actor: shards in flight per actor (Ray ``max_concurrency``); see PER_ACTOR.
    """

    device: str
    why: str
    actors: int
    num_gpus: float
    num_cpus: float
    threads: int | None
    per_actor: int = 1


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


def local_offer(gpus: bool = True) -> ClusterOffer:
    """This machine as a one-node cluster without an autoscaler (what ``address: local``
    starts), for planning a pool without starting Ray."""
    return ClusterOffer((machine_resources(gpus),), (), "this machine, no autoscaler")


def plan_pool(cluster: ClusterConfig, n_shards: int, offer: ClusterOffer) -> PoolPlan:
    """The pool that ``cluster`` asks ``offer`` for, for ``n_shards`` shards.

    ``device: auto`` takes GPUs when a GPU is up or a node type of the autoscaler has one;
    ``cuda`` asks for GPU actors whatever is up now, ``cpu`` for CPU actors. ``actors: auto``
    asks for as many actors as the cluster can hold at most (counting the nodes the
    autoscaler can start; :data:`UNKNOWN_CAPACITY_ACTORS` where that is unknown), never more
    than shards.

    Raises:
        PoolStartError: ``cuda`` on a cluster that can have no GPU, or no node that can hold
            one actor's ``gpus_per_actor``.
    """
    device, why = _device(cluster.device, offer)
    n = max(1, n_shards)
    fixed = None if str(cluster.actors) == "auto" else int(cluster.actors)
    if device == "cuda":
        per_gpu = float(cluster.gpus_per_actor)
        slots = offer.slots("GPU", per_gpu)
        if slots == 0:
            raise PoolStartError(
                f"no node can hold an actor with cluster.gpus_per_actor {per_gpu:g} GPU(s): "
                f"{offer.describe()}"
            )
        actors = min(fixed or slots or UNKNOWN_CAPACITY_ACTORS, n)
        # A GPU actor asks for half its node's CPUs per GPU share, at most one: the rest stays
        # for decoding threads, and a 2-core machine with 2 GPUs does not deadlock.
        per_slot = [c * per_gpu for c in offer.per_node("CPU", "GPU")]
        num_cpus = min([1.0, *(c / 2 for c in per_slot)])
        return PoolPlan(device, why, actors, per_gpu, num_cpus, None, PER_ACTOR)
    cpus = offer.total("CPU")
    if cpus == 0 and offer.node_types:  # a cold CPU cluster: size actors by its node types
        node_cpus = [float(t.resources.get("CPU", 0) or 0) for t in offer.node_types]
        num_cpus = min([2.0, *(c for c in node_cpus if c > 0)])
        slots = offer.slots("CPU", num_cpus)
        actors = min(fixed or slots or UNKNOWN_CAPACITY_ACTORS, n)
        return PoolPlan(device, why, max(1, actors), 0.0, num_cpus, max(1, int(num_cpus)))
    actors = max(1, min(fixed or max(1, int(cpus // 2)), n))
    num_cpus = max(cpus / actors, 0.5) if cpus >= actors else 0.5
    return PoolPlan(device, why, actors, 0.0, num_cpus, max(1, int(num_cpus)))


def _device(asked: Device, offer: ClusterOffer) -> tuple[str, str]:
    if asked is Device.CPU:
        return "cpu", "cluster.device is cpu"
    gpus = offer.can_offer("GPU")
    if asked is Device.CUDA:
        if gpus is False:
            raise PoolStartError(
                f"cluster.device is cuda, but this cluster can have no GPU: {offer.describe()}"
            )
        return "cuda", "cluster.device is cuda"
    if offer.total("GPU") > 0:
        return "cuda", f"{offer.total('GPU'):g} GPU(s) are up"
    if gpus:
        kinds = [t.describe() for t in offer.node_types or () if t.resources.get("GPU")]
        return "cuda", f"the autoscaler can start GPU nodes: {'; '.join(kinds)}"
    if gpus is None:
        return "cpu", (
            f"no GPU is up, and {offer.source}: set cluster.device: cuda to wait for GPU nodes"
        )
    return "cpu", f"no GPU is up or can be started ({offer.describe()})"


def worker_threads_here(gpus: bool = True) -> int:
    """Torch threads of one worker of a default pool on this machine (the bench times with
    them): its GPU share of the CPUs when ``gpus`` and CUDA is here, else 2 CPUs' worth."""
    here = local_offer(gpus)
    plan = plan_pool(ClusterConfig(), 1 << 20, here)
    return plan.threads or actor_threads(plan.num_gpus, plan.num_cpus, here.nodes[0])


def run_pool(
    cfg: AuditConfig,
    shards: Sequence[ShardRef],
    todo: Sequence[int],
    show: bool,
    banks: Banks | None = None,
    *,
    identity: str | None = None,
    lock: Any = None,
) -> tuple[DispatchOutcome, PoolPlan]:
    """Plan the pool, create its actors, run shards ``todo`` on them as they come up, stop the
    pool; return what happened and the plan.

    ``identity`` (the run's identity digest) goes into every shard; ``lock`` (the run lock)
    fences the workers' writes with its token and stops the queue once :meth:`check` finds it
    lost or expired.

    Raises:
        PoolStartError: nothing to plan on, or no actor up within ``startup_timeout_s``.
        WorkerStartError: an actor failed in its constructor (the model, CUDA).
    """
    import ray

    from pipeline.run.worker import ShardWorker

    if not todo:  # every shard was stored already: no actor, no device to choose
        return DispatchOutcome(started_at=time.time()), PoolPlan(
            "none", "nothing to compute", 0, 0, 0, 0
        )
    offer = read_offer()
    plan = plan_pool(cfg.cluster, len(todo), offer)
    print(
        f"pool: {plan.device} ({plan.why}); up to {plan.actors} actor(s) of "
        f"{{GPU: {plan.num_gpus:g}, CPU: {plan.num_cpus:g}}}",
        file=sys.stderr,
    )
    remote = ray.remote(ShardWorker).options(
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
        max_restarts=-1,  # the dispatcher decides when a shard has failed too often
        max_task_retries=0,
        # with one call at a time, Ray runs it on the worker's main thread (see PER_ACTOR)
        max_concurrency=plan.per_actor,
    )
    fence = getattr(lock, "token", None)
    actors = [remote.remote(cfg, plan.threads, identity, fence) for _ in range(plan.actors)]
    banks_ref = None if banks is None else ray.put(banks)  # sent once, shared by all shards
    started = time.time()
    try:
        outcome = dispatch(
            actors,
            shards,
            todo,
            per_actor=plan.per_actor,
            max_retries=int(cfg.cluster.max_retries),
            startup_timeout_s=float(cfg.cluster.startup_timeout_s),
            progress=Progress(sum(len(shards[k]) for k in todo), enabled=show),
            extra=None if banks_ref is None else (lambda k: banks_ref),
            should_stop=None if lock is None else lock.check,
        )
    except NoActorError as e:
        raise PoolStartError(
            f"no {plan.device} actor came up within {e.waited_s:.0f}s "
            f"(cluster.startup_timeout_s): asked Ray for {plan.actors} actor(s) of "
            f"{{GPU: {plan.num_gpus:g}, CPU: {plan.num_cpus:g}}} ({plan.why}); the cluster "
            f"offers {read_offer().describe()}"
        ) from None
    except WorkerStartError as e:
        raise PoolStartError(f"the workers could not start: {e}") from None
    finally:
        for a in actors:
            ray.kill(a)
    outcome.started_at = started
    return outcome, plan
