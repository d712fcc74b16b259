"""The batch audit driver: shards of the source through a pool of Ray actors, exactly once.

Shard ``k`` is source rows ``[k*S, (k+1)*S)`` (a tar shard's samples are split likewise); the
driver streams the source once (:func:`pipeline.data.plan.plan_source`) and each worker reads its
own shards' rows. Before any compute the driver loads the model once (a broken model ends in
one line, exit 2) and claims the output folder: it writes the run's identity into ``run.json``,
and a resume with other settings is refused. The pool
(:mod:`pipeline.run.pool`) gives shards to whichever actor is free; shard files are written
atomically, ``resume`` skips complete ones, and the run ends by checking that the stored image
ids equal the manifest's, exactly once.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.config import AuditConfig
from pipeline.data.detect import open_source
from pipeline.data.plan import check_stored_ids, hash_ids, plan_source
from pipeline.run.bank import BankPlanner
from pipeline.run.dispatch import DispatchOutcome
from pipeline.run.folder import IDENTITY_KEY, RunFolder, RunFolderError
from pipeline.run.pool import PoolPlan, connect, run_pool
from pipeline.run.preflight import (
    check_model,
    claim_folder,
    iso_time,
    run_identity,
    versions,
)
from pipeline.run.record import Counts, RunRecord, identity_digest
from pipeline.schema import STATUS_OK

__all__ = ["RunIncompleteError", "RunResult", "run_audit"]


class RunIncompleteError(RuntimeError):
    """Infrastructure (actors, the disk) failed: some shards are not stored. What is stored is
    complete and correct; ``--resume`` computes the rest. The CLI exits 4."""


@dataclass(frozen=True)
class RunResult:
    """Outcome of :func:`run_audit`."""

    run_dir: Any  # a Path, or the URI of a folder in object storage
    images: int  # rows in the manifest
    ok: int  # images with status "ok"
    errors: int  # images with status "error"
    failures: list[dict[str, str]] = field(default_factory=list)  # image_id, error
    seconds: float = 0.0  # wall time of this invocation
    resumed_shards: int = 0  # shards found complete and skipped
    exit_code: int = 0  # 0 when errors <= cluster.max_failures, else 1


def run_audit(config: AuditConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Run the batch audit of ``config``: every manifest image's maps and metrics to Parquet.

    Args:
        config: a validated config (:func:`pipeline.load_config`).
        resume: continue the run in ``output.dir``: skip shards whose files are complete.
        progress: show a progress bar (images, images/s, ETA, failures) on stderr.

    Returns:
        A :class:`RunResult`; ``RUN_DIR/run.json`` records the same facts.

    Raises:
        ModelCheckError, RunFolderError: before any compute (the CLI exits 2).
        RunIncompleteError: shards could not be computed or stored (the CLI exits 4).
    """
    import ray

    t0 = time.time()
    folder = RunFolder(str(config.output.dir))
    source = open_source(config.dataset)
    config = replace(config, dataset=source.cfg)  # workers open the format found here
    model_file, model_sha = check_model(config)
    planner = BankPlanner(config) if config.counterfactual.enabled else None
    plan = plan_source(
        source, int(config.cluster.shard_size), planner.add if planner is not None else None
    )
    banks = planner.finish(source) if planner is not None else None
    shards = plan.shards
    identity = run_identity(config, model_sha, plan.digest)

    digest = identity_digest(identity)
    with folder.lock(float(config.output.lock_lease_s)) as lock:
        before = claim_folder(folder, identity, resume)
        folder.remove_temporary()  # leftovers of a killed writer; we hold the lock
        record = RunRecord(
            name=config.name,
            config=config,
            identity=identity,
            versions=versions(),
            model_hash=model_sha,
            model_file=model_file,
            model_source=config.model.source,
            shards=len(shards),
            started_at=before.started_at if before is not None else iso_time(t0),
            class_names=source.class_names(),
        )
        try:
            folder.write_record(record)  # the identity is on disk before the first shard
        except OSError as e:
            raise RunFolderError(f"cannot write {folder.record_path}: {e.strerror or e}") from None
        sizes = [len(ref) for ref in shards]
        done = folder.complete_shards(sizes, digest) if resume else set()
        todo = [k for k in range(len(shards)) if k not in done]
        started_ray = connect(str(config.cluster.address))
        try:
            outcome, pool_plan = run_pool(
                config, shards, todo, progress, banks, identity=digest, lock=lock
            )
        finally:
            if started_ray:
                ray.shutdown()
        _check_lease(lock, folder)
        if outcome.lost:
            _stop(folder, record, outcome, pool_plan)
        # one streaming read of the stored ids and statuses serves the checks and the counts
        hashes, failures = _stored(folder, digest)
        check_stored_ids(hashes, plan, lambda: _all_ids(folder))
        result = _result(config, folder.path, failures, plan.images, time.time() - t0, len(done))
        _check_lease(lock, folder)  # the final record is the lock holder's to write
        try:
            folder.write_record(_finished(record, result, outcome, pool_plan, t0))
        except OSError as e:
            raise RunIncompleteError(
                f"every shard is stored, but {folder.record_path} could not be written "
                f"({e.strerror or e}); free space and run again with --resume"
            ) from None
    return result


def _check_lease(lock: Any, folder: RunFolder) -> None:
    """Stop, writing nothing more, when another run may hold the folder's lock now."""
    why = lock.check()
    if why is not None:
        raise RunIncompleteError(
            f"{why}; this run handed out no shard since, its workers wrote none, and it leaves "
            f"run.json to the lock's holder. Once no other run holds {folder.path}, run again "
            "with --resume to finish it"
        )


def _stop(folder: RunFolder, record: RunRecord, outcome: DispatchOutcome, plan: PoolPlan) -> None:
    """Record the stopped run (when the disk allows) and raise :class:`RunIncompleteError`."""
    with contextlib.suppress(OSError):  # the disk may be what failed
        folder.write_record(
            replace(
                _with_pool(record, outcome, plan),
                status="stopped",
                finished_at=iso_time(time.time()),
            )
        )
    why = outcome.stopped or next(iter(outcome.lost.values()))
    raise RunIncompleteError(
        f"{len(outcome.lost)} of {record.shards} shard(s) were not stored ({why}); the shards "
        f"that are stored are complete. Fix the cause and run again with --resume to finish "
        f"{folder.path}"
    )


def _all_ids(folder: RunFolder) -> list[str]:
    """Every stored id (only read to name the ids when the exactly-once check fails)."""
    return [i for column in folder.iter_ids() for i in column.to_pylist()]


def _stored(folder: RunFolder, digest: str) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Hashes of every stored id (8 bytes per image) and the error rows, shard by shard.

    Raises:
        RuntimeError: shards written by a run with another identity (a run that lost the lock
            to this one, or this one's to another) are in the folder.
    """
    hashes, failures, foreign = [], [], []
    for name in folder.shard_names(fresh=True):  # the workers wrote them: list again
        t = folder.read_shard(name, ["image_id", "status", "error"])
        stored = (t.schema.metadata or {}).get(IDENTITY_KEY)
        if stored is not None and stored.decode() != digest:
            foreign.append(name)
        hashes.append(hash_ids(t.column("image_id")))
        bad = t.filter(pc.not_equal(t.column("status"), STATUS_OK))
        failures += [
            {"image_id": i, "error": e}
            for i, e in zip(
                bad.column("image_id").to_pylist(), bad.column("error").to_pylist(), strict=True
            )
        ]
    if foreign:
        raise RuntimeError(
            f"{len(foreign)} shard(s) of {folder.path} were written by a run with other "
            f"settings ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): the "
            "folder mixes two audits. Run again with --resume to recompute them with this run's "
            "settings, or into an empty output.dir"
        )
    return (np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)), failures


def _result(
    cfg: AuditConfig,
    run_dir: Any,
    failures: list[dict[str, str]],
    n: int,
    secs: float,
    resumed: int,
) -> RunResult:
    return RunResult(
        run_dir=run_dir,
        images=n,
        ok=n - len(failures),
        errors=len(failures),
        failures=failures,
        seconds=secs,
        resumed_shards=resumed,
        exit_code=0 if len(failures) <= cfg.cluster.max_failures else 1,
    )


def _with_pool(record: RunRecord, outcome: DispatchOutcome, plan: PoolPlan) -> RunRecord:
    actors = outcome.timeline
    return replace(
        record,
        engine={
            "path": "/".join(sorted({a.get("engine", "generic") for a in actors})) or "none",
            "notes": sorted({a.get("engine_note", "") for a in actors} - {""}),
        },
        retried_shards={str(k): v for k, v in outcome.retried.items()},
        # the plan, and when its actors were created (the timeline's time zero)
        pool={**asdict(plan), "created_at": iso_time(outcome.started_at)},
        actors=actors,
    )


def _finished(
    record: RunRecord,
    result: RunResult,
    outcome: DispatchOutcome,
    plan: PoolPlan,
    started: float,
) -> RunRecord:
    secs = sorted(outcome.shard_seconds)
    return replace(
        _with_pool(record, outcome, plan),
        status="finished",
        counts=Counts(images=result.images, ok=result.ok, error=result.errors),
        timings={
            "total_s": round(result.seconds, 3),
            "images_per_s": round(outcome.images_per_s, 3),
            "shard_seconds_median": secs[len(secs) // 2] if secs else None,
            # where the workers' time went, summed over shards (docs/design.md, "Run folder")
            "phases_s": {k: round(v, 3) for k, v in sorted(outcome.phase_seconds.items())},
            # from the start of the run until the first actor was up (plan, model check, Ray,
            # the nodes the autoscaler started)
            "startup_s": round(outcome.ready_at - started, 3) if outcome.ready_at else None,
        },
        resumed_shards=result.resumed_shards,
        failures=result.failures,
        finished_at=iso_time(time.time()),
    )
