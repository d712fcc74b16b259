"""The batch audit driver: shards of the manifest through a pool of Ray actors, exactly once.

Shard ``k`` is manifest rows ``[k*S, (k+1)*S)``. Before any compute the driver loads the model
once (a broken model ends in one line, exit 2) and claims the output folder: it writes the run's
identity into ``run.json``, and a resume with other settings is refused. The pool
(:mod:`pipeline.run.pool`) gives shards to whichever actor is free; shard files are written
atomically, ``resume`` skips complete ones, and the run ends by checking that the stored image
ids equal the manifest's, exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import AuditConfig
from pipeline.data.manifest import read_manifest, records
from pipeline.run.folder import RunFolder, check_exactly_once
from pipeline.run.pool import connect, run_pool
from pipeline.run.preflight import check_model, claim_folder, iso_time, run_identity, versions
from pipeline.run.record import Counts, RunRecord

__all__ = ["RunResult", "run_audit"]


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
    """
    import ray

    t0 = time.time()
    folder = RunFolder(str(config.output.dir))
    recs = records(read_manifest(config.dataset), config.dataset)
    size = int(config.cluster.shard_size)
    shards = [recs[i : i + size] for i in range(0, len(recs), size)]
    model_file, model_sha = check_model(config)
    identity = run_identity(config, model_sha)

    with folder.lock():
        before = claim_folder(folder, identity, resume)
        folder.remove_temporary()  # leftovers of a killed writer; we hold the lock
        record = RunRecord(
            name=config.name,
            config=config,
            identity=identity,
            versions=versions(),
            model_hash=model_sha,
            model_file=model_file,
            shards=len(shards),
            started_at=before.started_at if before is not None else iso_time(t0),
        )
        folder.write_record(record)  # the identity is on disk before the first shard
        done = folder.complete_shards([len(s) for s in shards]) if resume else set()
        todo = [k for k in range(len(shards)) if k not in done]
        started_ray = connect(str(config.cluster.address))
        try:
            outcome = run_pool(config, folder, shards, todo, progress)
        finally:
            if started_ray:
                ray.shutdown()
        # one read of the stored ids and statuses serves the check and the counts
        stored = folder.read_maps(columns=["image_id", "status", "error"])
        check_exactly_once(stored["image_id"], (r.image_id for r in recs))
        result = _result(config, folder.path, stored, len(recs), time.time() - t0, len(done))
        folder.write_record(_finished(record, result, outcome))
    return result


def _result(
    cfg: AuditConfig, run_dir: Path, stored: Any, n: int, secs: float, resumed: int
) -> RunResult:
    bad = stored[stored["status"] != "ok"]
    failures = [
        {"image_id": i, "error": e} for i, e in zip(bad["image_id"], bad["error"], strict=True)
    ]
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


def _finished(record: RunRecord, result: RunResult, outcome: dict[str, Any]) -> RunRecord:
    actors = outcome.get("actors", [])
    return replace(
        record,
        status="finished",
        engine={
            "path": "/".join(sorted({a.get("engine", "generic") for a in actors})) or "none",
            "notes": sorted({a.get("engine_note", "") for a in actors} - {""}),
        },
        counts=Counts(images=result.images, ok=result.ok, error=result.errors),
        timings={
            "total_s": round(result.seconds, 3),
            "images_per_s": round(outcome.get("images_per_s") or 0.0, 3),
            "shard_seconds_median": outcome.get("shard_seconds_median"),
        },
        resumed_shards=result.resumed_shards,
        retried_shards=outcome.get("retried_shards", {}),
        pool=outcome.get("pool", {}),
        actors=actors,
        actor_restarts=outcome.get("actor_restarts", []),
        failures=result.failures,
        finished_at=iso_time(time.time()),
    )
