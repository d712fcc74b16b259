"""``occlusion-audit bench --mode token-drop``: token-drop occlusion of a ViT against fill
occlusion with ``K`` random-pixel draws, on the same images and windows.

Both rows compute as a run's worker does (:func:`pipeline.run.settings.worker_compute`, fixed
batches, a worker's torch threads): ``fill`` with ``occlusion.mode: fill, engine: generic`` and
``--n-baselines`` draws, ``token-drop`` with ``occlusion.mode: token-drop`` (``K = 1``, the
tokens under each window removed). Each is warmed up, then the timed runs interleave (one of
each per round, ``--repeats`` rounds) and the table shows medians. The two maps differ by
design (token-drop has no fill value), so no tolerance applies; the bench prints how alike they
are instead.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.engines import Device, Row, Setup, bench_occlusion, worker_setting
from pipeline.bench.nets import build_bench_model
from pipeline.incremental.select import attribute
from pipeline.kernel.defaults import Mode
from pipeline.run.heap import tune_heap
from pipeline.run.pool import worker_threads_here
from pipeline.run.settings import occlusion_keywords, worker_compute

__all__ = ["run_token_bench"]


def _row(s: Setup, mode: Mode) -> tuple[Row, int]:
    """The row of ``mode`` computed with a worker's settings, and its forward passes per
    image (unoccluded included)."""
    k = 1 if mode is Mode.TOKEN_DROP else int(s.args.n_baselines)
    occ = replace(bench_occlusion(s.args, "generic"), mode=mode, n_baselines=k)
    shape = (int(s.x.shape[1]), int(s.x.shape[2]), int(s.x.shape[3]))
    wc = worker_compute(occ, s.model, shape, s.d.dev)

    def run(n: int) -> torch.Tensor:
        r = attribute(s.model, s.x[:n], image_ids=s.ids[:n], options=wc.options,
                      **occlusion_keywords(occ))  # fmt: skip
        return r.delta[:, 0].flatten(1)  # (n, P)

    p = run(1).shape[1]  # warm-up
    return Row(str(mode), f"K={k},{worker_setting(wc)}", partial(run, s.x.shape[0])), k * p + 1


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of two ``(N, P)`` window grids."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    r = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return float(r.mean())


def run_token_bench(args: argparse.Namespace) -> int:
    """Time ``fill`` (``--n-baselines`` draws) against ``token-drop`` on ``--model``; print the
    table.

    Returns:
        0 (the two modes' maps differ by design: nothing to fail on).

    Raises:
        ValueError: the model is no ViT that token-drop applies to, or ``--window`` and
            ``--stride`` are not multiples of its patch size (naming both).
    """
    heap_tuned = False if args.default_malloc else tune_heap()
    d, n = Device(args.device), int(args.images)
    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads_here(gpus=d.dev.type == "cuda"))
    try:
        threads = torch.get_num_threads()
        extra = json.loads(args.model_kwargs) if args.model_kwargs else None
        model = build_bench_model(args.model, args.image_size, kwargs=extra).to(d.dev)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((n, 3, args.image_size, args.image_size), generator=gen).to(d.dev)
        s = Setup(model, x, [f"bench-{i:04d}" for i in range(n)], args, d)
        (fill, fill_passes), (tokens, token_passes) = _row(s, Mode.FILL), _row(s, Mode.TOKEN_DROP)
        maps: dict[str, Any] = {}
        for _ in range(max(1, int(args.repeats))):
            for r in (fill, tokens):
                secs, peak, start, maps[r.engine] = d.timed(r.run)
                r.seconds.append(secs)
                r.peak_bytes, r.added_bytes = (
                    max(r.peak_bytes, peak),
                    max(r.added_bytes, peak - start),
                )
    finally:
        torch.set_num_threads(before)
    speed = fill.median / tokens.median
    alike = _correlation(maps["fill"], maps["token-drop"])
    print(
        f"bench {args.model} {args.image_size}px window {args.window} stride {args.stride} "
        f"N={n}: fill K={args.n_baselines} {fill_passes} forward passes/image, token-drop K=1 "
        f"{token_passes}; median of {len(fill.seconds)}, {args.precision}, {d.name()}, "
        f"{threads} threads (a worker's), heap {'tuned' if heap_tuned else 'default'}"
    )
    print(f"{'mode':<11} {'setting':<32} {'s/image':>9} {'images/s':>9} {'peak MiB':>9}")
    for r in (fill, tokens):
        print(
            f"{r.engine:<11} {r.setting:<32} {r.median / n:>9.4f} {n / r.median:>9.3f} "
            f"{r.peak_bytes / 2**20:>9.0f}"
        )
    print(
        f"token-drop: {speed:.2f}x the speed of fill with K={args.n_baselines} "
        f"({fill_passes / token_passes:.2f}x fewer forward passes)"
    )
    print(f"maps: mean Pearson correlation of the two modes' window grids {alike:.3f}")
    if args.json:
        facts = {
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "machine": {"device_name": d.name(), "cpus_usable": len(os.sched_getaffinity(0)),
                        "torch_threads": threads, "torch": torch.__version__},
            "rows": [r.facts(n) for r in (fill, tokens)],
            "passes_per_image": {"fill": fill_passes, "token-drop": token_passes},
            "token-drop/fill speed": speed,
            "map_correlation": alike,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return 0
