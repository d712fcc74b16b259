"""The ``approximate`` row of ``occlusion-audit bench``: the approximate engine as a worker with
``occlusion.engine: approximate`` runs it, at ``--approx-threshold``.

Its maps differ from the exact ones by design, so they are not held to the bench's tolerance;
instead every run reports the error it measured itself on its check windows, and the row counts
the work it saves (recomputed elements and conv multiply-accumulates per occluded copy, from the
plan, so the saving is known without timing).
"""

from __future__ import annotations

import argparse

import torch

from pipeline.bench.engines import Row, Setup, worker_setting
from pipeline.incremental import ApproximateEngine
from pipeline.kernel import defaults

__all__ = ["add_approx_argument", "approximate_row"]


def add_approx_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--approx-threshold`` to the ``bench`` parser."""
    parser.add_argument(
        "--approx-threshold",
        type=float,
        default=defaults.APPROX_THRESHOLD,
        metavar="TAU",
        help="tau in (0, 1] of the approximate row: each layer's recomputed region is at most "
        f"TAU of that layer's side (default {defaults.APPROX_THRESHOLD})",
    )


def approximate_row(s: Setup) -> Row:
    """The approximate engine's row (``occlusion.engine: approximate`` at ``--approx-threshold``,
    the worker's options). Its maps differ from the exact ones by design: each run also
    measures the error on the check windows (``extra["approx_error"]``, the largest over the
    images, score units), and ``extra`` counts the recomputed elements and conv MACs per
    occluded copy against the exact engine's."""
    _, wc = s.worker("approximate")
    engine = wc.options.engine
    assert isinstance(engine, ApproximateEngine)
    n, res = s.x.shape[0], s.ours(1, "approximate")  # warm-up
    row = Row("approximate", f"tau={engine.threshold:g},{worker_setting(wc)}", lambda: None)

    def run() -> torch.Tensor:
        r = s.ours(n, "approximate")
        err = r.approx_error
        row.extra["approx_error"] = None if err is None else float(err.max())
        return r.full()[:, 0]

    row.run = run
    approx, exact = engine.cost(res.grid), engine.cost(res.grid, 1.0)
    row.extra.update(
        approx_threshold=engine.threshold,
        approx_check_windows=wc.options.approx_check_windows,
        recomputed_elements=approx.elements,
        exact_recomputed_elements=exact.elements,
        conv_macs=approx.conv_macs,
        exact_conv_macs=exact.conv_macs,
        full_pass_conv_macs=exact.full_conv_macs,
    )
    return row
