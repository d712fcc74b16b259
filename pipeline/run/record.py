"""The typed record of a run: what ``RUN_DIR/run.json`` holds, read and written in one place.

A run writes its record twice: when it starts (``status: running``, with the identity of what
it computes) and when it ends (counts, timings, failures). Readers (aggregate, report) use
:meth:`RunRecord.read`, never raw JSON; the config inside is rebuilt as a typed
:class:`~pipeline.config.AuditConfig`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import AuditConfig, config_to_dict, load_config
from pipeline.storage.atomic import write_json

__all__ = ["Counts", "RunRecord", "RunRecordError", "identity_digest"]

RECORD_VERSION = 1


def identity_digest(identity: Mapping[str, Any]) -> str:
    """The SHA-256 of a run's identity (``RunRecord.identity``) as canonical JSON: what each
    shard file records of the run that wrote it (``pipeline.run.folder.IDENTITY_KEY``)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RunRecordError(ValueError):
    """``run.json`` exists but is not a run record this version can read."""


@dataclass(frozen=True)
class Counts:
    """Images of the manifest and how they ended."""

    images: int = 0
    ok: int = 0
    error: int = 0


@dataclass(frozen=True)
class RunRecord:
    """The content of ``RUN_DIR/run.json``.

    Attributes:
        name: the run name (``config.name``).
        config: the validated config of the run.
        status: ``running`` while the run computes, ``finished`` or ``stopped`` after.
        identity: what the maps depend on (dataset, model with file hash, occlusion, shard
            layout); ``--resume`` refuses a config whose identity differs.
        versions: Python and package versions of the driver.
        model_hash, model_file: SHA-256 and path of the model file or ``transformers`` folder
            (None for a builder without weights).
        model_source: where the model comes from, ``kind:reference`` (``timm:resnet50``,
            ``export:/m/model.pt2``; :attr:`pipeline.config.ModelConfig.source`).
        engine: ``{"path": "incremental" | "generic" | ..., "notes": [...]}`` of the workers:
            the engine ``occlusion.engine`` resolved to, and why (for ``generic`` under
            ``auto``, the incremental engine's refusal).
        counts: images, ok, error over the whole manifest (after the run).
        timings: ``total_s``, ``images_per_s`` (from the moment every actor had started),
            ``shard_seconds_median``, ``startup_s`` (run start until every actor answered),
            ``phases_s`` (workers' seconds summed over shards: ``read_decode_s``,
            ``kernel_s``, ``evidence_s``, ``metrics_s``, ``table_s``, ``write_s``).
        shards, resumed_shards, retried_shards: shard counts; retried maps shard -> attempts.
        pool: the actor pool the run asked for (``pipeline.run.pool.PoolPlan``: device and
            why, most actors, resources per actor) and ``created_at``, the ISO time its
            actors were created.
        actors: the pool's timeline, one entry per time an actor was up: ``actor`` (index),
            ``up_s``/``down_s`` (seconds after ``pool.created_at``), ``shards``, ``images``,
            ``end`` (``released``, ``preempted``, ``lost: why``), and where it ran (node,
            host, pid, device, GPU ids, threads, engine).
        failures: ``{"image_id", "error"}`` of every image with status ``error``.
        started_at, finished_at: ISO 8601 UTC times.
        class_names: stored ``label`` text -> class name, where the source knows the names
            (:meth:`pipeline.data.source.Source.class_names`); empty otherwise.
    """

    name: str
    config: AuditConfig
    status: str = "running"
    identity: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    model_hash: str | None = None
    model_file: str | None = None
    model_source: str | None = None
    engine: Mapping[str, Any] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    timings: Mapping[str, Any] = field(default_factory=dict)
    shards: int = 0
    resumed_shards: int = 0
    retried_shards: Mapping[str, int] = field(default_factory=dict)
    pool: Mapping[str, Any] = field(default_factory=dict)
    actors: list[Mapping[str, Any]] = field(default_factory=list)
    failures: list[Mapping[str, str]] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    class_names: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the file's content)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["config"] = config_to_dict(self.config)
        out["counts"] = asdict(self.counts)
        return {"record_version": RECORD_VERSION, **out}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """Rebuild a record; keys this version does not know are ignored.

        Raises:
            RunRecordError: no ``name`` or ``config``, or a config that does not validate.
        """
        if not isinstance(data, Mapping) or "config" not in data:
            raise RunRecordError("run.json has no 'config': not a run record")
        try:
            config = load_config(data["config"])
        except ValueError as e:
            raise RunRecordError(f"run.json holds a config that does not validate: {e}") from e
        known = {f.name for f in fields(cls)} - {"config", "counts"}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        counts = Counts(**{k: int(v) for k, v in (data.get("counts") or {}).items()})
        return cls(
            name=str(data.get("name") or config.name),
            config=config,
            counts=counts,
            **{k: v for k, v in kwargs.items() if k != "name"},
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "run.json") -> RunRecord:
        """A record from the bytes of a ``run.json`` (``where`` names it in errors)."""
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunRecordError(f"{where} is not valid JSON: {e}") from e
        return cls.from_json(parsed)

    def to_bytes(self) -> bytes:
        """The record as ``run.json`` bytes (indented JSON)."""
        return (json.dumps(self.to_json(), indent=2, default=str) + "\n").encode("utf-8")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> RunRecord:
        """Read ``run.json`` at ``path``.

        Raises:
            FileNotFoundError: there is no such file.
            RunRecordError: it is not valid JSON or not a run record.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RunRecordError(f"{path} is not valid JSON: {e}") from e
        return cls.from_json(data)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the record to ``path`` atomically."""
        write_json(path, self.to_json())
