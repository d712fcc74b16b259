"""Checks before any compute: the model loads, and the output folder may take this run.

Both run in the driver before Ray starts, so a missing model file, a refused pickle, a factory
that rejects its kwargs, a folder that is not a run, or a resume with other settings ends in one
line and exit 2 within seconds, not in a Ray traceback after the actors have started.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipeline.config import AuditConfig, config_to_dict
from pipeline.models import load_model, model_hash, resolve_model_file
from pipeline.run.folder import RunFolder, RunFolderError
from pipeline.run.record import RunRecord, RunRecordError

__all__ = [
    "ModelCheckError",
    "RunFolderError",
    "check_model",
    "claim_folder",
    "iso_time",
    "run_identity",
    "versions",
]

_PACKAGES = ("occlusion-audit", "torch", "ray", "pyarrow", "numpy", "pandas", "pillow")
# Loading the model once in the driver is the cheapest complete check (format, pickle safety,
# kwargs, state_dict keys and shapes); above this size only the file itself is checked.
_FULL_CHECK_BYTES = 1 << 30


class ModelCheckError(ValueError):
    """The configured model cannot be loaded; the message names the file or factory."""


def check_model(cfg: AuditConfig) -> tuple[str | None, str | None]:
    """Load the model once on the CPU, as a worker will, and hash its file.

    Returns:
        ``(model file, sha256)``; ``(None, None)`` for a bare factory.

    Raises:
        ModelCheckError: with one line naming what is wrong.
    """
    try:
        path = resolve_model_file(cfg.model)
        if path is None or path.stat().st_size <= _FULL_CHECK_BYTES:
            load_model(cfg.model, cfg.dataset.normalize, "cpu")
    except Exception as e:  # every loader failure becomes the same one-line refusal
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelCheckError(f"model cannot be loaded: {first}") from e
    return (None, None) if path is None else (str(path), model_hash(path))


def run_identity(
    cfg: AuditConfig, model_sha256: str | None, manifest_sha256: str | None = None
) -> dict[str, Any]:
    """What the stored maps depend on: two runs with equal identities compute equal maps."""
    plain = config_to_dict(cfg)
    return {
        "dataset": plain["dataset"],
        "manifest_sha256": manifest_sha256,
        "model": plain["model"],
        "model_sha256": model_sha256,
        "occlusion": plain["occlusion"],
        "audit.boundary_px": plain["audit"]["boundary_px"],
        "cluster.shard_size": plain["cluster"]["shard_size"],
        "counterfactual": plain["counterfactual"],
    }


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose values differ (dotted). A key the stored identity does not have (a setting
    added after that run) is the same when it is off now (false or null), as it was then."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if key not in before and b in (None, False):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key} ({a!r} -> {b!r})" if not isinstance(a, dict) else key)
    return out


def claim_folder(folder: RunFolder, identity: dict[str, Any], resume: bool) -> RunRecord | None:
    """Check that ``folder`` may take a run with ``identity``; call with the folder's lock held.

    A new run needs an empty or missing folder, or a run folder that holds no shard yet (a run
    stopped before its first shard: nothing can mix). A resumed run needs a folder whose record
    has the same identity; shards without a record, or a record with another identity, are
    refused, since the maps would mix two audits.

    Returns:
        The existing record when resuming one, else None.

    Raises:
        RunFolderError: naming the folder and what differs.
    """
    shards = folder.shard_names()
    try:
        before = folder.read_record()
    except RunRecordError as e:
        raise RunFolderError(f"{folder.path} holds a run.json that is not a run record: {e}") from e
    tops = {name.split("/", 1)[0] for name in folder.store.list("", recursive=True)}
    if not folder.remote and folder.path.is_dir():  # empty sub-folders count locally
        tops |= {p.name for p in folder.path.iterdir()}
    others = [
        name
        for name in tops
        if name not in (RunFolder.LOCK, RunFolder.MAPS, RunFolder.RECORD, RunFolder.SUMMARY)
        and not name.startswith(".")
    ]
    if before is None and others:
        raise RunFolderError(
            f"{folder.path} holds files but is not a run folder ({', '.join(sorted(others)[:5])}); "
            "choose another output.dir"
        )
    if not shards:  # nothing computed yet: nothing can mix
        return before if resume else None
    if not resume:
        raise RunFolderError(
            f"{folder.path} already holds a run ({len(shards)} shard file(s)); pass --resume "
            "to continue it, or choose another output.dir"
        )
    if before is None or not before.identity:
        raise RunFolderError(
            f"cannot resume {folder.path}: it holds {len(shards)} shard file(s) but no record "
            "of the settings that made them; choose another output.dir"
        )
    diff = _differences(dict(before.identity), identity)
    if diff:
        raise RunFolderError(
            f"cannot resume {folder.path}: the maps would mix two audits; these settings differ "
            f"from the stored run's: {'; '.join(diff[:6])} (use another output.dir)"
        )
    return before


def versions() -> dict[str, str]:
    """Python and package versions of this process."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def iso_time(t: float) -> str:
    """UTC ISO 8601 time of a ``time.time()`` value, to the second."""
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")
