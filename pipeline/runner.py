"""The batch audit driver: shards of the manifest dispatched to a pool of Ray actors.

Shard ``k`` is manifest rows ``[k*S, (k+1)*S)``. The driver keeps a queue of shards and gives the
next one to whichever actor is free (``ray.wait``), so a slow or restarted actor does not hold the
others back. An actor that dies is restarted by Ray (``max_restarts``) and its shard goes back to
the queue; a shard that fails ``max_retries`` times is stored as ``error`` rows. Shard files are
written atomically, ``resume`` skips complete ones, and the run ends by checking that the stored
image ids equal the manifest's, exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import AuditConfig
from pipeline.dispatch import dispatch
from pipeline.manifest import read_manifest, records
from pipeline.plan import model_spec, run_facts, shard_spec
from pipeline.plan import run_dir as plan_run_dir
from pipeline.progress import Progress
from pipeline.store import (
    RunLock,
    check_exactly_once,
    complete_shards,
    maps_dir,
    read_maps,
    write_json,
)

__all__ = ["RunResult", "run_audit"]

_PER_ACTOR = 2  # shards in flight per actor: one computing while the next one decodes


@dataclass(frozen=True)
class RunResult:
    """Outcome of :func:`run_audit`."""

    run_dir: Path
    images: int  # rows in the manifest
    ok: int  # images with status "ok"
    errors: int  # images with status "error"
    failures: list[dict[str, str]] = field(default_factory=list)  # image_id, error
    seconds: float = 0.0  # wall time of this invocation
    resumed_shards: int = 0  # shards found complete and skipped
    exit_code: int = 0  # 0 when errors <= cluster.max_failures


def _connect(address: str) -> bool:
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


def _pool_shape(cfg: AuditConfig, n_shards: int) -> tuple[int, float, float, int]:
    """``(actors, num_gpus, num_cpus, torch threads)`` per actor for the connected cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    per_gpu = float(cfg.cluster.gpus_per_actor)
    auto = str(cfg.cluster.actors) == "auto"
    if gpus >= per_gpu > 0:
        actors = int(gpus // per_gpu) if auto else int(cfg.cluster.actors)
        # A fraction of a CPU per GPU actor, or a 2-core machine deadlocks with 2 GPUs.
        num_cpus = min(1.0, cpus / max(actors, 1) / 2)
        threads = max(1, int(cpus // max(actors, 1)))
        return max(1, min(actors, n_shards)), per_gpu, num_cpus, threads
    actors = max(1, int(cpus // 2)) if auto else int(cfg.cluster.actors)
    actors = max(1, min(actors, n_shards))
    num_cpus = max(cpus / actors, 0.5) if cpus >= actors else 0.5
    return actors, 0.0, num_cpus, max(1, int(num_cpus))


def _check_resume(run_dir: Path, cfg_dict: dict[str, Any], resume: bool) -> None:
    import json

    existing = sorted(maps_dir(run_dir).glob("part-*.parquet"))
    if existing and not resume:
        raise FileExistsError(
            f"{run_dir} already holds {len(existing)} shard file(s); pass --resume to continue "
            "that run, or choose another output.dir"
        )
    facts = run_dir / "run.json"
    if resume and facts.exists():
        before = json.loads(facts.read_text()).get("config", {})
        for section in ("dataset", "model", "occlusion"):
            if before.get(section) != cfg_dict.get(section):
                raise ValueError(
                    f"cannot resume {run_dir}: its {section} settings differ from this config's; "
                    "the maps would mix two audits (use another output.dir)"
                )


def run_audit(config: AuditConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Run the batch audit of ``config``: every manifest image's maps and metrics to Parquet.

    Args:
        config: a validated config (:func:`pipeline.load_config`).
        resume: skip shards whose files are complete (from an interrupted run).
        progress: print a progress line (images done, images/s, ETA, failures) to stderr.

    Returns:
        A :class:`RunResult`; ``RUN_DIR/run.json`` records the same facts.
    """
    import ray

    from pipeline.config import config_to_dict

    t0 = time.time()
    run_dir = plan_run_dir(config)
    cfg_dict = config_to_dict(config)
    table = read_manifest(config.dataset)
    recs = records(table, config.dataset)
    size = int(config.cluster.shard_size)
    shards = [recs[i : i + size] for i in range(0, len(recs), size)]
    spec, mspec = shard_spec(config), model_spec(config)

    with RunLock(run_dir):
        _check_resume(run_dir, cfg_dict, resume)
        for stale in maps_dir(run_dir).glob(".part-*.tmp"):
            stale.unlink()  # leftovers of a killed writer; we hold the lock
        done = complete_shards(run_dir, [len(s) for s in shards]) if resume else set()
        started_ray = _connect(str(config.cluster.address))
        try:
            outcome = _dispatch(config, spec, mspec, shards, done, run_dir, progress)
        finally:
            if started_ray:
                ray.shutdown()
        # one read of the stored ids and statuses serves the check and the counts
        stored = read_maps(run_dir, columns=["image_id", "status", "error"])
        check_exactly_once(stored["image_id"], (r.image_id for r in recs))
        result = _summarise(
            config, run_dir, stored, len(recs), outcome, time.time() - t0, len(done)
        )
        write_json(run_facts(config, cfg_dict, result, outcome, t0), run_dir / "run.json")
    return result


def _summarise(
    cfg: AuditConfig,
    run_dir: Path,
    stored: Any,
    n: int,
    outcome: dict[str, Any],
    secs: float,
    resumed: int,
) -> RunResult:
    bad = stored[stored["status"] != "ok"]
    failures = [
        {"image_id": i, "error": e} for i, e in zip(bad["image_id"], bad["error"], strict=True)
    ]
    budget = int(getattr(cfg.cluster, "max_failures", 0) or 0)
    return RunResult(
        run_dir=run_dir,
        images=n,
        ok=n - len(failures),
        errors=len(failures),
        failures=failures,
        seconds=secs,
        resumed_shards=resumed,
        exit_code=0 if len(failures) <= budget else 1,
    )


def _dispatch(
    cfg: AuditConfig,
    spec: Any,
    mspec: Any,
    shards: Sequence[Sequence[Any]],
    done: set[int],
    run_dir: Path,
    show: bool,
) -> dict[str, Any]:
    """Start the actor pool, run every shard not in ``done``, stop the pool; return its facts."""
    import ray

    from pipeline.worker import ShardWorker

    todo = [k for k in range(len(shards)) if k not in done]
    n_actors, gpus, cpus, threads = _pool_shape(cfg, max(1, len(todo)))
    remote = ray.remote(ShardWorker).options(
        num_gpus=gpus,
        num_cpus=cpus,
        max_restarts=-1,  # the dispatcher decides when a shard has failed too often
        max_task_retries=0,
        max_concurrency=_PER_ACTOR,
    )
    actors = [remote.remote(spec, mspec, threads) for _ in range(n_actors)] if todo else []
    try:
        outcome = dispatch(
            actors,
            shards,
            todo,
            spec=spec,
            run_dir=run_dir,
            per_actor=_PER_ACTOR,
            max_retries=int(cfg.cluster.max_retries),
            progress=Progress(sum(len(shards[k]) for k in todo), enabled=show),
            info=ray.get([a.info.remote() for a in actors]),
        )
    finally:
        for a in actors:
            ray.kill(a)
    secs = sorted(outcome.shard_seconds)
    return {
        "actors": outcome.actors,
        "actor_restarts": outcome.restarts,
        "shards": len(shards),
        "retried_shards": {str(k): v for k, v in outcome.retried.items()},
        "shard_seconds_median": secs[len(secs) // 2] if secs else None,
        "images_per_s": outcome.images_per_s,
        "pool": {"actors": n_actors, "num_gpus": gpus, "num_cpus": cpus, "threads": threads},
    }
