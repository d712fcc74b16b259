"""Incremental inference vs full forward passes on SeedCNN, in one process on the same images.

Times three ways of getting the same occluded scores (window 32, stride 16, K = 3 random-pixel
draws on 224x224 images, so 13 x 13 windows x 3 draws = 507 occluded copies per image):

- ``generic``: :func:`pipeline.attribute` with full forward passes (``engine=None``);
- ``incremental``: the same call with :class:`pipeline.incremental.IncrementalEngine`;
- ``roofline``: the same number of plain forward passes (``N * (1 + K * P)``) at the best batch
  size and memory format, with no occlusion work at all.

Each method's setting (batch size, memory format) is picked from a small search (one timed call
each, after a warm-up); the best is then timed ``--runs`` more times and the median reported.
The incremental and generic maps are compared too.

Usage:
    python benchmarks/incremental_speed.py --images 2 --runs 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch

from pipeline import attribute
from pipeline.incremental import IncrementalEngine
from pipeline.nets import SeedCNN

WINDOW, STRIDE, DRAWS, SIZE = [32, 32], [16, 16], 3, 224


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best(options: dict[str, Callable[[], object]], runs: int) -> tuple[str, float]:
    """The fastest option (one timed call each, after one warm-up call) and the median of
    ``runs`` further calls of it, in seconds."""
    next(iter(options.values()))()  # warm-up: allocator, oneDNN kernels, plans
    picked = min(options, key=lambda k: _seconds(options[k]))
    return picked, statistics.median(_seconds(options[picked]) for _ in range(runs))


def _attribute(model: torch.nn.Module, x: torch.Tensor, engine, max_batch: int, cl: bool):
    return attribute(
        model,
        x,
        window=WINDOW,
        stride=STRIDE,
        baseline="random-pixel",
        n_baselines=DRAWS,
        max_batch=max_batch,
        channels_last=cl,
        engine=engine,
    )


def _roofline(model: torch.nn.Module, x: torch.Tensor, passes: int, batch: int, cl: bool):
    """``passes`` plain forward passes in batches of ``batch`` (copies of the images)."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    net = copy.deepcopy(model).to(memory_format=fmt)
    reps = -(-batch // x.shape[0])
    inp = x.repeat(reps, 1, 1, 1)[:batch].contiguous(memory_format=fmt)

    def run() -> None:
        with torch.inference_mode():
            done = 0
            while done < passes:
                n = min(batch, passes - done)
                net(inp[:n])
                done += n

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SeedCNN(num_classes=1, input_dim=SIZE).eval()
    x = torch.rand(args.images, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    engine, reason = IncrementalEngine.build_or_reason(model, x.shape[1:], x.device)
    build_s = time.perf_counter() - t0
    assert engine is not None, reason
    passes = args.images * (1 + DRAWS * 13 * 13)

    incremental = {
        f"max_batch={mb}": (lambda m=mb: _attribute(model, x, engine, m, False))
        for mb in (512, 1024)
    }
    generic = {
        f"max_batch=256 channels_last={cl}": (lambda c=cl: _attribute(model, x, None, 256, c))
        for cl in (False, True)
    }
    roofline = {
        f"batch={bs} channels_last={cl}": _roofline(model, x, passes, bs, cl)
        for bs in (64, 128)
        for cl in (False, True)
    }
    rows = [
        (name, *_best(options, args.runs))
        for name, options in (
            ("generic", generic),
            ("incremental", incremental),
            ("roofline", roofline),
        )
    ]
    ref = _attribute(model, x, None, 256, False).delta
    inc = _attribute(model, x, engine, 1024, False).delta
    roof = rows[-1][2]
    print(
        f"SeedCNN {SIZE}x{SIZE}, window {WINDOW}, stride {STRIDE}, K={DRAWS}: {args.images} "
        f"images, {passes} forward passes; {args.threads} threads; median of {args.runs}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'method':<12} {'seconds':>8} {'img/s':>7} {'vs roofline':>12}  setting")
    for name, setting, t in rows:
        print(f"{name:<12} {t:>8.3f} {args.images / t:>7.2f} {roof / t:>11.2f}x  {setting}")
    err = (inc - ref).abs().max().item()
    print(
        f"engine build {build_s:.2f} s; max |delta incremental - generic| = {err:.1e} "
        f"(max |delta| {ref.abs().max().item():.1e})"
    )


if __name__ == "__main__":
    main()
