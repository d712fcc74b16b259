"""The kernel settings a worker computes with, built in one place from the config.

A worker, the bench and the tests all call :func:`worker_compute`, so a bench row or a test
that compares the Python API with a run computes with exactly the settings of a run.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import AuditConfig, OcclusionConfig
from pipeline.incremental.select import Compute, resolve_compute
from pipeline.kernel.compiled import warm_up
from pipeline.kernel.defaults import Engine
from pipeline.kernel.forward import PLAIN_BATCH
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.options import ComputeOptions
from pipeline.kernel.passes import pass_rows
from pipeline.models import load_model

__all__ = [
    "WorkerCompute",
    "kernel_keywords",
    "occlusion_keywords",
    "worker_compute",
    "worker_setup",
]

WorkerCompute = Compute  # how a worker computes: its resolved options and engine


def occlusion_keywords(occ: OcclusionConfig) -> dict[str, Any]:
    """The keywords of :func:`pipeline.attribute` that the ``occlusion`` section sets."""
    return {
        "mode": occ.mode,
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
    device: torch.device | str,
) -> WorkerCompute:
    """Resolve the engine once and build the options every shard of a worker uses.

    The engine, ``max_batch`` and ``channels_last`` are resolved as :func:`pipeline.attribute`
    resolves them (:func:`pipeline.incremental.select.resolve_compute`). On top, workers give
    every pass a fixed size (``fixed_batch``: occluded passes fit the copies per image,
    :func:`pipeline.kernel.passes.pass_rows`), so a map is bitwise the same whichever shard,
    batch or actor computed it, and keep going past a NaN score (the image gets an error row).

    Args:
        occ: the ``occlusion`` section.
        model: the pixel-space model.
        image_shape: ``(C, H, W)`` of the images, pixels.
        device: where the model runs.

    With ``occlusion.compile`` the model is compiled here, for the batch sizes of the
    worker's passes, so that compiling counts as start-up and a model or machine that cannot
    compile stops the worker at once.

    Raises:
        ValueError: ``occlusion.engine: incremental`` or ``approximate`` and the model does
            not allow incremental inference; ``occlusion.mode: token-drop`` and a model that is
            no known ViT (naming its class).
        pipeline.kernel.compiled.CompileError: ``occlusion.compile`` and torch cannot compile
            the model.
    """
    device = torch.device(device)
    asked = ComputeOptions(
        max_batch=occ.max_batch,
        precision=occ.precision,
        channels_last=occ.channels_last,
        engine=occ.engine,
        compile=bool(occ.compile),
        fixed_batch=True,
        on_nonfinite="nan",
        approx_threshold=occ.approx_threshold,
        approx_check_windows=occ.approx_check_windows,
    )
    resolved = resolve_compute(asked, model, image_shape, device, occ.mode)
    options = resolved.options
    if options.compile:
        # the unoccluded passes' size, and the occluded passes' when they are full passes
        max_batch = int(options.max_batch or 1)
        full = options.engine is Engine.GENERIC and resolved.engine_name != "token-drop"
        sizes = [min(max_batch, PLAIN_BATCH)]
        sizes += [_occluded_rows(occ, image_shape, max_batch)] if full else []
        channels_last = bool(options.channels_last)
        warm_up(resolved.model, image_shape, sizes, device, occ.precision, channels_last)
    return resolved


def _occluded_rows(occ: OcclusionConfig, image_shape: tuple[int, int, int], max_batch: int) -> int:
    """Rows of a worker's occluded passes: :func:`~pipeline.kernel.passes.pass_rows` of the
    ``K * P`` copies of every image (``(C, H, W)`` pixels ``image_shape``)."""
    grid = WindowGrid.create(image_shape, occ.window, occ.stride)
    return pass_rows(int(occ.n_baselines or 1) * grid.n_windows, max_batch)


def worker_setup(cfg: AuditConfig, device: torch.device) -> tuple[Any, WorkerCompute]:
    """What the kernel calls (the model loaded on ``device``, or under token-drop its token
    model) and the resolved compute settings: what a :class:`~pipeline.run.worker.ShardWorker`
    builds when it starts, and what ``inspect`` times."""
    model = load_model(cfg.model, cfg.dataset.normalize, device)
    compute = worker_compute(cfg.occlusion, model, (3, *cfg.dataset.image_size), device)
    return compute.model, compute
