"""The ``approximate`` rows of ``occlusion-audit bench``: the approximate engine as a worker with
``occlusion.engine: approximate`` runs it, at ``--approx-threshold``, with and without its check
windows.

Its maps differ from the exact ones by design, so they are not held to the bench's tolerance;
instead every run reports the error it measured itself on its check windows
(``--approx-check-windows``, the run's default), and, once and untimed, the image's largest error
over every window, so the two can be compared. ``approx-unchecked`` is the same engine with
``approx_check_windows: 0``: the same maps, and its time against the ``approximate`` row's is
what the check windows cost. The row also counts the work the engine saves (recomputed elements
and conv multiply-accumulates per occluded copy, from the plan, so the saving is known without
timing).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from pipeline.bench.engines import Row, Setup, worker_setting
from pipeline.incremental import ApproximateEngine
from pipeline.incremental.select import attribute
from pipeline.kernel import defaults
from pipeline.kernel.occlusion import OcclusionResult
from pipeline.kernel.options import ComputeOptions
from pipeline.run.settings import occlusion_keywords

__all__ = ["add_approx_argument", "approximate_rows"]


def add_approx_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--approx-threshold`` and ``--approx-check-windows`` to the ``bench`` parser."""
    parser.add_argument(
        "--approx-threshold",
        type=float,
        default=defaults.APPROX_THRESHOLD,
        metavar="TAU",
        help="tau in (0, 1] of the approximate row: each layer's recomputed region is at most "
        f"TAU of that layer's side (default {defaults.APPROX_THRESHOLD})",
    )
    parser.add_argument(
        "--approx-check-windows",
        type=int,
        default=defaults.APPROX_CHECK_WINDOWS,
        metavar="N",
        help="check windows per image of the approximate row, scored exactly to measure its "
        f"error (default {defaults.APPROX_CHECK_WINDOWS}, a run's); the approx-unchecked row "
        "runs without them",
    )


def _attribute(s: Setup, options: ComputeOptions) -> OcclusionResult:
    """All images with the approximate worker's keywords and ``options``."""
    occ, _ = s.worker("approximate")
    n = s.x.shape[0]
    return attribute(s.model, s.x, image_ids=s.ids[:n], options=options, **occlusion_keywords(occ))


def approximate_rows(s: Setup) -> list[Row]:
    """The approximate engine's rows (``occlusion.engine: approximate`` at
    ``--approx-threshold``, the worker's options): ``approximate`` with its check windows and
    ``approx-unchecked`` without them.

    ``approximate``'s ``extra``: ``approx_error`` (the largest over the images of the error
    measured on the check windows, score units), ``largest_error`` (the largest over the images
    of the error over every window, measured once, untimed), and the recomputed elements and
    conv MACs per occluded copy against the exact engine's.
    """
    _, wc = s.worker("approximate")
    engine = wc.options.engine
    assert isinstance(engine, ApproximateEngine)
    res = s.ours(1, "approximate")  # warm-up
    checks = wc.options.approx_check_windows
    setting = f"tau={engine.approx_threshold:g},checks={checks},{worker_setting(wc)}"
    row = Row("approximate", setting, lambda: None)

    def run() -> torch.Tensor:
        r = _attribute(s, wc.options)
        err = r.approx_error
        row.extra["approx_error"] = None if err is None else float(err.max())
        return r.full()[:, 0]

    row.run = run
    every = _attribute(s, replace(wc.options, approx_check_windows=res.grid.n_windows))
    assert every.approx_error is not None
    unchecked = replace(wc.options, approx_check_windows=0)
    _attribute(s, unchecked)  # warm-up
    bare = Row(
        "approx-unchecked",
        f"tau={engine.approx_threshold:g},checks=0,{worker_setting(wc)}",
        lambda: _attribute(s, unchecked).full()[:, 0],
    )
    approx, exact = engine.cost(res.grid), engine.cost(res.grid, 1.0)
    row.extra.update(
        approx_threshold=engine.approx_threshold,
        approx_check_windows=checks,
        windows=res.grid.n_windows,
        largest_error=float(every.approx_error.max()),
        recomputed_elements=approx.elements,
        exact_recomputed_elements=exact.elements,
        conv_macs=approx.conv_macs,
        exact_conv_macs=exact.conv_macs,
        full_pass_conv_macs=exact.full_conv_macs,
    )
    return [row, bare]
