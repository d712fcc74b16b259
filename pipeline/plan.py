"""From a validated config to what workers need, and the facts a run records in ``run.json``."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.config import AuditConfig
from pipeline.models import HubFile, ModelSpec, model_hash, resolve_model_file
from pipeline.shard import ShardSpec

__all__ = ["model_spec", "report_dir", "run_dir", "run_facts", "shard_spec"]

_PACKAGES = ("occlusion-audit", "torch", "ray", "pyarrow", "numpy", "pandas", "pillow")


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def run_dir(cfg: AuditConfig) -> Path:
    """The run directory: ``output.dir`` or ``runs/<name>``."""
    return Path(cfg.output.dir) if cfg.output.dir else Path("runs") / cfg.name


def report_dir(cfg: AuditConfig) -> Path:
    """The report folder: ``output.report_dir`` or ``reports/<name>``."""
    return Path(cfg.output.report_dir) if cfg.output.report_dir else Path("reports") / cfg.name


def shard_spec(cfg: AuditConfig) -> ShardSpec:
    """Per-run settings every worker gets (small, picklable)."""
    occ, model = cfg.occlusion, cfg.model
    return ShardSpec(
        root=cfg.dataset.root,
        image_size=tuple(cfg.dataset.image_size),  # type: ignore[arg-type]
        group_by=tuple(cfg.dataset.group_by),
        window=tuple(occ.window),
        stride=tuple(occ.stride),
        baseline=_value(occ.baseline),
        n_baselines=occ.n_baselines
        if occ.n_baselines is not None
        else (3 if _value(occ.baseline) in ("random-pixel", "random-channel", "noise") else 1),
        seed=int(occ.seed),
        value=occ.value,
        blur_sigma=float(occ.blur_sigma),
        precision=_value(occ.precision),
        max_batch=None if occ.max_batch is None else int(occ.max_batch),
        engine=_value(occ.engine),
        task=_value(model.task),
        score=_value(model.score),
        target=_value(model.target),
        boundary_px=int(cfg.audit.boundary_px),
    )


def model_spec(cfg: AuditConfig) -> ModelSpec:
    """The model source of the config, with the dataset's normalisation inside the model."""
    m, norm = cfg.model, cfg.dataset.normalize
    hub = None
    if m.hub is not None:
        hub = HubFile(
            repo_id=m.hub.repo_id,
            filename=m.hub.filename,
            revision=m.hub.revision,
            repo_type=_value(m.hub.repo_type),
        )
    return ModelSpec(
        torchscript=m.torchscript,
        export=m.export,
        factory=m.factory,
        kwargs=dict(m.kwargs),
        weights=m.weights,
        hub=hub,
        normalize=None if norm is None else (tuple(norm.mean), tuple(norm.std)),
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model_file_hash(cfg: AuditConfig) -> dict[str, str | None]:
    try:
        path = resolve_model_file(model_spec(cfg))
    except Exception as e:  # the hash is a record, not a reason to stop a finished run
        return {"file": None, "sha256": None, "error": str(e)}
    if path is None:
        return {"file": None, "sha256": None}
    return {"file": str(path), "sha256": model_hash(path)}


def _engines(actors: list[dict[str, Any]]) -> dict[str, Any]:
    """Which occlusion path the workers took, and why."""
    names = sorted({a.get("engine", "generic") for a in actors}) or ["none"]
    notes = sorted({a.get("engine_note", "") for a in actors} - {""})
    return {"path": "/".join(names), "notes": notes}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def run_facts(
    cfg: AuditConfig, cfg_dict: dict[str, Any], result: Any, outcome: dict[str, Any], t0: float
) -> dict[str, Any]:
    """The content of ``RUN_DIR/run.json``."""
    model = _model_file_hash(cfg)
    return {
        "name": cfg.name,
        "config": cfg_dict,
        "versions": _versions(),
        "model_hash": model.get("sha256"),
        "model_file": model.get("file"),
        "engine": _engines(outcome.get("actors", [])),
        "counts": {"images": result.images, "ok": result.ok, "error": result.errors},
        "timings": {
            "total_s": round(result.seconds, 3),
            "images_per_s": round(outcome.get("images_per_s") or 0.0, 3),
            "shard_seconds_median": outcome.get("shard_seconds_median"),
        },
        "shards": outcome.get("shards"),
        "resumed_shards": result.resumed_shards,
        "retried_shards": outcome.get("retried_shards", {}),
        "pool": outcome.get("pool"),
        "actors": outcome.get("actors", []),
        "actor_restarts": outcome.get("actor_restarts", []),
        "failures": result.failures,
        "shard_spec": asdict(shard_spec(cfg)),
        "started_at": _iso(t0),
        "finished_at": _iso(time.time()),
    }
