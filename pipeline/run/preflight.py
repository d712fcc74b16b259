"""Checks before any compute: the model loads and answers, and the output folder may take this
run.

Both run in the driver before Ray starts, so a missing model file, a refused pickle, a factory
that rejects its kwargs, an archive exported for one image or another size, an output that holds
no score tensor (a Hugging Face ``ModelOutput`` and a wrong ``model.output``), a folder that is
not a run, or a resume with other settings ends in one line and exit 2 within seconds, not in an
``error`` row per image after the actors have started.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from pipeline.config import AuditConfig, Device, config_to_dict
from pipeline.incremental.tokens import token_model
from pipeline.kernel.defaults import Mode
from pipeline.kernel.forward import PLAIN_BATCH
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.targets import output_scores, resolve_targets
from pipeline.kernel.tokens import check_token_grid, kept_tokens
from pipeline.models import (
    check_signature,
    input_signature,
    load_model,
    model_hash,
    resolve_model_file,
)
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


# The images of the pre-run call: two, so that an archive fixed to a batch of one fails here.
_PROBE_IMAGES = 2


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_model(cfg: AuditConfig) -> tuple[str | None, str | None]:
    """Load the model once on the CPU, as a worker will, call it, and hash its file.

    The call feeds 2 seeded images at ``dataset.image_size`` and turns the output into scores
    as a worker does; an archive that declares its input (``torch.export``, ONNX) is checked
    against the batch sizes of the workers' passes too (:func:`probe_model`).

    Returns:
        ``(model file, sha256)``; ``(None, None)`` for a builder without weights.

    Raises:
        ModelCheckError: with one line naming what is wrong (and the fix, where there is one).
    """
    try:
        path = resolve_model_file(cfg.model)
        full = path is None or path.is_dir() or path.stat().st_size <= _FULL_CHECK_BYTES
        model = load_model(cfg.model, cfg.dataset.normalize, "cpu") if full else None
    except Exception as e:  # every loader failure becomes the same one-line refusal
        raise ModelCheckError(f"model cannot be loaded: {_first_line(e)}") from e
    if model is not None:
        probe_model(model, cfg)
    return (None, None) if path is None else (str(path), model_hash(path))


def probe_model(model: torch.nn.Module, cfg: AuditConfig) -> None:
    """Call ``model`` as the workers will, before any of them starts.

    Checks, in order: the declared input of an archive against the workers' batch sizes (2,
    the unoccluded passes' ``min(max_batch, 16)``, the occluded passes' ``max_batch``; 32 on
    a ``cpu`` cluster, else 256 when unset) and ``(3, H, W)``; one forward pass of 2 images;
    the output's score tensor (``model.output``), its batch dimension and shape; the target
    index against the outputs; under ``occlusion.mode: token-drop``, that the model is a ViT
    of a known family, that the windows lie on its patch grid, and one pass with a window's
    tokens removed.

    Raises:
        ModelCheckError: one line naming the source, what failed and the fix.
    """
    shape = (3, *cfg.dataset.image_size)
    source = f"model {cfg.model.source}"
    occ = cfg.occlusion
    most = occ.max_batch or (32 if cfg.cluster.device is Device.CPU else 256)
    sig = input_signature(model)
    if sig is not None:
        batches = (_PROBE_IMAGES, min(most, PLAIN_BATCH), most)
        why = check_signature(sig, batches, shape, "occlusion.max_batch")
        if why is not None:
            raise ModelCheckError(why)
    x = torch.rand((_PROBE_IMAGES, *shape), generator=torch.Generator().manual_seed(0))
    size = "x".join(map(str, shape))
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as e:  # the model's own failure, whatever its type
        # torch.export's shape guards: the archive fixed a shape that the config does not have
        fix = (
            "; re-export with dynamic_shapes for the batch (and height and width) dimensions"
            if "Guard failed" in str(e)
            else ""
        )
        raise ModelCheckError(
            f"{source} failed on {_PROBE_IMAGES} images of {size} (dataset.image_size): "
            f"{_first_line(e)}{fix}"
        ) from e
    try:
        scores = output_scores(out, _PROBE_IMAGES, cfg.model.task, cfg.model.score)
        target = cfg.model.target
        resolve_targets(target if isinstance(target, int) else "predicted", scores, cfg.model.task)
    except (TypeError, ValueError) as e:
        raise ModelCheckError(f"{source} on {_PROBE_IMAGES} images of {size}: {e}") from e
    if occ.mode is Mode.TOKEN_DROP:
        _probe_tokens(model, x, cfg, source)


def _probe_tokens(model: torch.nn.Module, x: torch.Tensor, cfg: AuditConfig, source: str) -> None:
    """The token-drop checks of :func:`probe_model` on the probe images ``x``."""
    try:
        tokens = token_model(model)
        grid = WindowGrid.create(x.shape[1:], cfg.occlusion.window, cfg.occlusion.stride)
        check_token_grid(grid, tokens)
    except ValueError as e:  # one line naming the model's class or the setting to change
        raise ModelCheckError(f"{source}: {e}") from e
    keep = kept_tokens(grid, tokens.patch_size)[0].expand(x.shape[0], -1)  # (2, L)
    try:
        with torch.inference_mode():
            tokens.forward_kept(x, keep)
    except Exception as e:  # the model's own failure on a shorter sequence, whatever its type
        raise ModelCheckError(
            f"{source} failed with the tokens of a window removed (occlusion.mode token-drop): "
            f"{_first_line(e)}"
        ) from e


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


# Settings added since runs were first recorded whose "off" value is neither false nor null:
# what every run computed before the setting existed.
_ADDED_OFF = {"occlusion.mode": Mode.FILL.value}


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ (dotted). A key the stored identity does not have (a setting
    added after that run) is the same when it is off now (false, null, or its value in
    ``_ADDED_OFF``), as it was then."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if key not in before and (b in (None, False) or _ADDED_OFF.get(prefix + key) == b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b, f"{prefix}{key}.")]
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
