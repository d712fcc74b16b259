"""The kernel settings a worker computes with, built in one place from the config.

A worker, the bench and the tests all call :func:`worker_compute`, so a bench row or a test
that compares the Python API with a run computes with exactly the settings of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import AuditConfig, OcclusionConfig
from pipeline.kernel import defaults
from pipeline.kernel.compiled import warm_up
from pipeline.kernel.defaults import Engine
from pipeline.kernel.forward import PLAIN_BATCH, accepts_channels_last
from pipeline.kernel.options import (
    ComputeOptions,
    OccludedEngine,
    default_max_batch,
    resolve_engine,
)

__all__ = ["WorkerCompute", "kernel_keywords", "occlusion_keywords", "worker_compute"]


@dataclass(frozen=True)
class WorkerCompute:
    """How a worker computes: the engine it resolved and the options it passes the kernel."""

    options: ComputeOptions  # with the engine object (or GENERIC) resolved
    engine_name: str  # "incremental" | "approximate" | "generic"
    engine_note: str  # why that engine


def occlusion_keywords(occ: OcclusionConfig) -> dict[str, Any]:
    """The keywords of :func:`pipeline.attribute` that the ``occlusion`` section sets."""
    return {
        "window": occ.window,
        "stride": occ.stride,
        "baseline": occ.baseline,
        "n_baselines": occ.n_baselines,
        "seed": occ.seed,
        "value": occ.value,
        "blur_sigma": occ.blur_sigma,
    }


def kernel_keywords(cfg: AuditConfig) -> dict[str, Any]:
    """What to compute: the keywords of :func:`pipeline.attribute` a run's config sets.

    ``target`` is left out: a worker resolves ``label`` targets per image.
    """
    return {**occlusion_keywords(cfg.occlusion), "task": cfg.model.task, "score": cfg.model.score}


def worker_compute(
    occ: OcclusionConfig,
    model: Any,
    image_shape: tuple[int, int, int],
    device: torch.device,
    *,
    approx_threshold: float | None = None,
    approx_check_windows: int | None = None,
) -> WorkerCompute:
    """Resolve the engine once and build the options every shard of a worker uses.

    Workers pad every pass to a fixed batch (``fixed_batch``), so a map is bitwise the same
    whichever shard, batch or actor computed it, and keep going past a NaN score (the image gets
    an error row).

    Args:
        occ: the ``occlusion`` section.
        model: the pixel-space model.
        image_shape: ``(C, H, W)`` of the images, pixels.
        device: where the model runs.
        approx_threshold, approx_check_windows: ``occlusion.engine: approximate`` settings
            (see :class:`~pipeline.kernel.options.ComputeOptions`); None: the section's
            ``approx_threshold`` / ``approx_check_windows``, or the defaults where the section
            has no such key.

    With ``occlusion.compile`` the model is compiled here, for the batch sizes of the
    worker's passes, so that compiling counts as start-up and a model or machine that cannot
    compile stops the worker at once.

    Raises:
        ValueError: ``occlusion.engine: incremental`` or ``approximate`` and the model does
            not allow incremental inference, or an approximate setting out of range.
        pipeline.kernel.compiled.CompileError: ``occlusion.compile`` and torch cannot compile
            the model.
    """
    tau = _setting(approx_threshold, occ, "approx_threshold", defaults.APPROX_THRESHOLD)
    checks = _setting(
        approx_check_windows, occ, "approx_check_windows", defaults.APPROX_CHECK_WINDOWS
    )
    engine: OccludedEngine | None
    engine, note = resolve_engine(occ.engine, model, image_shape, device, tau)
    channels_last = occ.channels_last
    if channels_last is None:  # auto, decided once per worker, the same way attribute() does
        channels_last = engine is None and accepts_channels_last(model, image_shape, device)
    max_batch = occ.max_batch or default_max_batch(device, engine)
    compile_ = bool(occ.compile)
    if compile_:
        # the unoccluded passes' size, and the occluded passes' when they are full passes
        sizes = [min(max_batch, PLAIN_BATCH)] + ([max_batch] if engine is None else [])
        warm_up(model, image_shape, sizes, device, occ.precision, channels_last)
    options = ComputeOptions(
        max_batch=max_batch,
        precision=occ.precision,
        channels_last=channels_last,
        engine=engine if engine is not None else Engine.GENERIC,
        compile=compile_,
        fixed_batch=True,
        on_nonfinite="nan",
        approx_threshold=tau,
        approx_check_windows=checks,
    )
    name = "generic" if engine is None else str(getattr(engine, "name", "incremental"))
    return WorkerCompute(options, name, note)


def _setting(given: Any, occ: OcclusionConfig, key: str, default: Any) -> Any:
    """``given``, else the section's ``key``, else ``default``."""
    return given if given is not None else getattr(occ, key, default)
