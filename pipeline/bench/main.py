"""``occlusion-audit bench``: our kernel against Captum's ``Occlusion`` and the forward roofline.

Every engine runs in this one process on the same seeded images and the same ``K`` random-pixel
baselines (``pipeline.kernel.baselines.make_baselines``). Our rows compute with exactly the
settings a run's worker uses (:func:`pipeline.run.settings.worker_compute`), and every row runs
with a worker's torch threads (:func:`pipeline.run.pool.worker_threads_here`). Captum's
and the roofline's settings are searched and every engine warmed up first; then the timed runs
are interleaved (one run of each engine per round, ``--repeats`` rounds) so that a burst of load
on a shared machine slows all engines alike, and each reported time is the median. The roofline
is the same number of plain forward passes (``N*K*P + N``) at the best batch size and memory
format on pre-built inputs: an engine that runs the whole model on every occluded copy cannot
beat it. An engine whose maps differ from Captum's fails the benchmark, except the
``approximate`` row (projective fields capped at ``--approx-threshold``), whose maps are
approximate by design: it reports the error it measured on its check windows instead, beside the
largest error over every window, and ``approx-unchecked`` (the same maps without the check
windows) says what the check costs. The engines themselves are in :mod:`pipeline.bench.engines`
and :mod:`pipeline.bench.approximate`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.approximate import approximate_rows
from pipeline.bench.engines import (
    Device,
    Row,
    Setup,
    captum_rows,
    compiled_row,
    counterfactual_row,
    generic_row,
    incremental_row,
    roofline_row,
)
from pipeline.bench.nets import build_bench_model
from pipeline.kernel.approx_check import error_meaning
from pipeline.kernel.defaults import Precision
from pipeline.kernel.occlusion import OcclusionResult
from pipeline.run.folder import RunFolder
from pipeline.run.heap import tune_heap
from pipeline.run.pool import worker_threads_here

__all__ = ["run_bench"]


def _stored_bytes(r: OcclusionResult, ids: list[str]) -> float:
    """Bytes per image of ``r`` stored as maps rows (Parquet, zstd, as a run writes its shards)."""
    import pyarrow as pa

    from pipeline.schema import STATUS_OK, maps_schema

    g = r.grid
    fixed: dict[str, Any] = dict(zip(("image_c", "image_h", "image_w"), g.image, strict=True))
    fixed.update(zip(("grid_c", "grid_h", "grid_w"), g.counts, strict=True))
    fixed.update(status=STATUS_OK, shard=0, window=list(g.window), stride=list(g.stride))
    rows = [
        {
            **fixed,
            "image_id": i,
            "target": int(r.target[j, 0]),
            "score": float(r.score[j, 0]),
            "delta": r.delta[j, 0].flatten().tolist(),
            "delta_std": r.delta_std[j, 0].flatten().tolist(),
        }
        for j, i in enumerate(ids)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.Table.from_pylist(rows, schema=maps_schema([]))
        return RunFolder(tmp).write_shard(0, table).stat().st_size / len(ids)


def _measure(args: argparse.Namespace, d: Device) -> tuple[list[Row], OcclusionResult, str, float]:
    """Search, warm up, then time every engine in interleaved rounds.

    Returns:
        the rows (``generic`` first), the generic kernel's result, why there is
        no incremental row ("" when there is one), and the model's score noise
        (:meth:`Setup.score_noise`).
    """
    n, size = int(args.images), int(args.image_size)
    extra = json.loads(args.model_kwargs) if getattr(args, "model_kwargs", None) else None
    model = build_bench_model(args.model, size, kwargs=extra).to(d.dev)
    x = torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(0)).to(d.dev)
    s = Setup(model, x, [f"bench-{i:04d}" for i in range(n)], args, d)
    res = s.ours(n, "generic")  # warm-up, and the predicted targets every engine explains
    p = res.grid.n_windows
    rows = [generic_row(s)] + ([compiled_row(s)] if getattr(args, "compile", False) else [])
    if not args.no_captum:
        rows += captum_rows(s, res.target[:, 0], p)
    rows.append(roofline_row(s, n * args.n_baselines * p + n))
    inc = incremental_row(s) if args.engine == "auto" else "--engine generic"
    rows += [inc, *approximate_rows(s)] if isinstance(inc, Row) else []
    rows.append(counterfactual_row(s))
    for _ in range(max(1, int(args.repeats))):
        for r in rows:
            secs, peak, start, r.maps = d.timed(r.run)
            r.seconds.append(secs)
            r.peak_bytes, r.added_bytes = max(r.peak_bytes, peak), max(r.added_bytes, peak - start)
    # maps are checked against Captum's; with --no-captum, against the generic kernel's
    ref = next(r.maps for r in rows if r.engine == ("generic" if args.no_captum else "captum-best"))
    for r in rows:
        if r.maps is not None and ref is not None:
            r.max_abs_diff = float((r.maps.float() - ref.float()).abs().max())
    return rows, res, "" if isinstance(inc, Row) else inc, s.score_noise()


def _table(rows: list[Row], ours: Row, n: int) -> Iterator[str]:
    w = max(32, *(len(r.setting) for r in rows))
    yield (
        f"{'engine':<16} {'setting':<{w}} {'s/image':>9} {'images/s':>9} {'x ours':>7} "
        f"{'peak MiB':>9} {'added':>6} {'max|diff|':>9}"
    )
    for r in rows:
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        yield (
            f"{r.engine:<16} {r.setting:<{w}} {r.median / n:>9.4f} {n / r.median:>9.3f} "
            f"{r.median / ours.median:>7.2f} {r.peak_bytes / 2**20:>9.0f} "
            f"{r.added_bytes / 2**20:>6.0f} {diff:>9}"
        )


def _approx_lines(r: Row, bare: Row, ours: Row) -> Iterator[str]:
    """What the approximate row saved, what its check windows cost (against ``bare``, the same
    engine without them) and what it measured (``r.extra``)."""
    e = r.extra

    def share(key: str, of: str) -> str:
        return f"{e[key] / e[of]:.0%}" if e[of] else "-"

    err, diff, largest = e["approx_error"], r.max_abs_diff, e["largest_error"]
    elements = share("recomputed_elements", "exact_recomputed_elements")
    macs, full = share("conv_macs", "exact_conv_macs"), share("conv_macs", "full_pass_conv_macs")
    yield (
        f"approximate (tau={e['approx_threshold']:g}): {ours.median / r.median:.2f}x ours "
        f"({ours.engine}), {ours.median / bare.median:.2f}x without its check windows; per copy "
        f"it recomputes {elements} of the exact engine's elements, {macs} of its conv MACs "
        f"({full} of a full pass's)"
    )
    yield (
        f"approximate: {e['approx_check_windows']} check windows of {e['windows']} cost "
        f"{r.median / bare.median - 1:+.0%} over the approximate maps alone (approx-unchecked)"
    )
    yield f"approximate: {error_meaning(e['approx_check_windows'])}"
    yield (
        f"approximate: measured error {'-' if err is None else f'{err:.3g}'} (largest over the "
        f"images); the largest over every window {largest:.3g}; its full maps differ by "
        f"{'-' if diff is None else f'{diff:.3g}'}"
    )


def _ratios(rows: list[Row], ours: Row) -> dict[str, float]:
    """Speed-ups (time of the other over time of ours) of ours, generic, incremental and
    approximate."""
    # Captum's fastest timed setting: the default can beat the searched one on a noisy machine.
    captum = [r for r in rows if r.engine.startswith("captum")]
    refs = {"roofline": next(r for r in rows if r.engine == "roofline")}
    if captum:
        refs["captum-best"] = min(captum, key=lambda r: r.median)
    kinds = ("generic", "compiled", "incremental", "approximate")
    named = {"ours": ours, **{r.engine: r for r in rows if r.engine in kinds}}
    return {
        f"{name}/{ref}": other.median / r.median
        for name, r in named.items()
        for ref, other in refs.items()
    }


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark of the ``bench`` subcommand's arguments; print the table.

    ``ours`` is the engine a run uses for this model (``occlusion.engine: auto``): the
    incremental engine when the model's graph allows it, else the generic kernel.

    Returns:
        0, or 1 when an engine's maps differ from Captum's (with ``--no-captum``: the generic
        kernel's) by more than the tolerance:
        ``1e-5`` (fp32) or ``3e-2`` (bf16/fp16 autocast) times ``max(1, largest |score|)``, or
        4 times the model's own score noise when that is larger (a map is a mean of score
        differences, so it carries that noise from both sides).
    """
    allowed = [p.value for p in Precision]
    if args.precision not in allowed:
        raise ValueError(f"--precision must be one of {allowed}, got {args.precision!r}")
    # as a run's workers do: CPU forward passes reuse freed buffers (pipeline.run.heap)
    heap_tuned = False if args.default_malloc else tune_heap()
    d, n = Device(args.device), int(args.images)
    # and with a worker's torch threads: the CPUs the pool gives each actor on this machine
    on_gpu = d.dev.type == "cuda"
    threads = worker_threads_here(gpus=on_gpu)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        threads = torch.get_num_threads()  # what the rows really ran with
        rows, res, no_inc, noise = _measure(args, d)
    finally:
        torch.set_num_threads(before)
    scale = max(1.0, float(res.score.abs().max()))
    tol = max((1e-5 if args.precision == "fp32" else 3e-2) * scale, 4 * noise)
    # approximate maps are not exact by design: their measured error is reported instead
    exact = [r for r in rows if not r.engine.startswith("approx")]
    bad = [r for r in exact if r.max_abs_diff is not None and not r.max_abs_diff <= tol]
    generic = rows[0]
    ours = next((r for r in rows if r.engine == "incremental"), generic)
    ratios = _ratios(rows, ours)
    p, stored = res.grid.n_windows, _stored_bytes(res, [f"bench-{i:04d}" for i in range(n)])
    total = n * args.n_baselines * p + n
    print(
        f"bench {args.model} {args.image_size}px window {args.window} stride {args.stride} "
        f"K={args.n_baselines} N={n}: {p} windows/image, {total} forward passes/run, median of "
        f"{len(ours.seconds)}, {args.precision}, {d.name()}, {threads} threads (a worker's), "
        f"heap {'tuned' if heap_tuned else 'default'}"
    )
    print("\n".join(_table(rows, ours, n)))
    if no_inc:
        print(f"incremental: n/a ({no_inc})")
    labels = {
        "ours": f"ours (occlusion.engine auto: {ours.engine})",
        "generic": "generic (full forward passes)",
        "compiled": "generic compiled (occlusion.compile)",
        "incremental": "incremental",
        "approximate": "approximate",
    }
    for name, label in labels.items():
        if f"{name}/roofline" in ratios and not (name == "incremental" and ours.engine == name):
            vs_captum = ratios.get(f"{name}/captum-best")
            print(
                f"{label}: "
                + ("" if vs_captum is None else f"{vs_captum:.2f}x Captum's fastest, ")
                + f"{ratios[f'{name}/roofline']:.2f}x the roofline"
            )
    print("targets: ours >= 3x Captum's fastest and >= 0.9x the roofline; incremental >= 5x it")
    if "compiled/roofline" in ratios:
        gain = ratios["compiled/roofline"] / ratios["generic/roofline"]
        print(f"compile: {gain:.2f}x the generic kernel's speed")
        ratios["compiled/generic"] = gain
    approx = next((r for r in rows if r.engine == "approximate"), None)
    bare = next((r for r in rows if r.engine == "approx-unchecked"), None)
    if approx is not None and bare is not None:
        print("\n".join(_approx_lines(approx, bare, ours)))
        ratios["approximate/approx-unchecked"] = bare.median / approx.median
    cf = next(r for r in rows if r.engine == "cf-swaps")
    print(
        f"counterfactual pass: {cf.median / n:.4f} s/image extra, "
        f"{cf.median / ours.median:.0%} of ours ({ours.engine}) for the maps"
    )
    print(f"stored: {stored:.0f} bytes/image (Parquet zstd; deltas {2 * p * 4} bytes as float32)")
    ref = "the generic kernel's" if args.no_captum else "Captum's"
    print(f"maps vs {ref}: tolerance {tol:.2g} (model score noise {noise:.2g})")
    for r in bad:
        print(f"FAILED: {r.engine} maps differ from {ref} by {r.max_abs_diff:.3g} > {tol:.3g}")
    if args.json:
        machine = {
            "device": str(d.dev),
            "device_name": d.name(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": threads,  # a worker's (pipeline.run.pool.worker_threads_here)
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            # glibc malloc tuning changes CPU forward speed ~2x (page faults on fresh buffers)
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "heap_tuned": heap_tuned,
        }
        facts = {
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "machine": machine,
            "work": {"images": n, "windows": p, "draws": args.n_baselines, "forward_passes": total},
            "rows": [r.facts(n) for r in rows],
            "incremental": no_inc or "ok",
            "ours": ours.engine,
            "ratios": ratios,
            "stored_bytes_per_image": stored,
            "counterfactual_seconds_per_image": cf.median / n,
            "tolerance": tol,
            "score_noise": noise,
            "ok": not bad,
        }
        Path(args.json).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return 1 if bad else 0
