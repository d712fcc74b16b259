"""``occlusion-audit bench``: our kernel against Captum's ``Occlusion`` and the forward roofline.

Every engine runs in this one process on the same seeded images and the same ``K`` random-pixel
baselines (``pipeline.baselines.make_baselines``). Settings are searched and every engine warmed
up first; then the timed runs are interleaved (one run of each engine per round, ``--repeats``
rounds) so that a burst of load on a shared machine slows all engines alike, and each reported
time is the median. The roofline is the same number of plain forward passes (``N*K*P + N``) at
the best batch size and memory format on pre-built inputs: an engine that runs the whole model on
every occluded copy cannot beat it. An engine whose maps differ from Captum's fails the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.baselines import make_baselines
from pipeline.bench_nets import build_bench_model
from pipeline.heap import trim_heap, tune_heap
from pipeline.occlusion import OcclusionResult, attribute

__all__ = ["run_bench"]

_PPE = (1, 8, 16, 32, 64, 128)  # Captum perturbations_per_eval candidates
_BATCHES = (16, 32, 64, 128, 256)  # roofline batch-size candidates
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    """One engine: ``run()`` computes all ``N`` maps ``(N, C, H, W)`` (or None for no maps)."""

    engine: str
    setting: str
    run: Callable[[], torch.Tensor | None]
    seconds: list[float] = field(default_factory=list)  # per run of all N images
    peak_bytes: int = 0  # peak RSS (CPU) or peak allocated device memory (CUDA) over the runs
    added_bytes: int = 0  # the largest peak above the usage when a run started
    max_abs_diff: float | None = None  # of its maps against Captum-best's
    extra: dict[str, Any] = field(default_factory=dict)
    maps: torch.Tensor | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def facts(self, n: int) -> dict[str, Any]:
        keys = ("engine", "setting", "seconds", "peak_bytes", "added_bytes", "max_abs_diff")
        return {
            **{k: getattr(self, k) for k in keys},
            "median_seconds": self.median,
            "images_per_s": n / self.median,
            **self.extra,
        }


class _Device:
    """Timer and peak memory of one device (CPU: process RSS; CUDA: the caching allocator)."""

    def __init__(self, name: str) -> None:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def timed(self, fn: Callable[[], Any]) -> tuple[float, int, int, Any]:
        """``(seconds, peak bytes, bytes at start, output)`` of one call of ``fn``."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
            start = torch.cuda.memory_allocated(self.dev)
        else:
            trim_heap()  # RSS close to live memory before each run
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS, Linux >= 4.0
            start = _status_kb("VmRSS") * 1024
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()  # CUDA work is asynchronous: wait for it before reading the timer
        secs = time.perf_counter() - t0
        peak = (
            torch.cuda.max_memory_allocated(self.dev) if self.cuda else _status_kb("VmHWM") * 1024
        )
        return secs, int(peak), int(start), out

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.dev)
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")), "")


def _status_kb(key: str) -> int:
    lines = Path("/proc/self/status").read_text().splitlines()
    return next((int(s.split()[1]) for s in lines if s.startswith(key + ":")), 0)


def _autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = _DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(dev.type, dtype=dtype)


@dataclass
class _Setup:
    model: torch.nn.Module
    x: torch.Tensor  # (N, C, H, W) pixel-space images on the device
    ids: list[str]
    args: argparse.Namespace
    d: _Device

    def ours(self, n: int, channels_last: bool, engine: Any = None) -> OcclusionResult:
        a, window, stride = self.args, [self.args.window] * 2, [self.args.stride] * 2
        return attribute(
            self.model, self.x[:n], window=window, stride=stride, baseline="random-pixel",
            n_baselines=a.k, image_ids=self.ids[:n], max_batch=a.max_batch,
            precision=a.precision, channels_last=channels_last, engine=engine,
        )  # fmt: skip

    @torch.inference_mode()
    def score_noise(self) -> float:
        """Largest change of an output when its image runs alone rather than in a batch of 16:
        the model's own float rounding (CPU kernels block by batch size), which every engine's
        deltas inherit; deep fp32 networks reach ~1e-5 of the logit scale."""
        n = self.x.shape[0]
        with _autocast(self.d.dev, self.args.precision):
            alone = torch.cat([self.model(self.x[i : i + 1]).float() for i in range(n)])
            together = self.model(self.x[torch.arange(max(16, n)) % n]).float()[:n]
        return float((alone - together).abs().max())

    def ours_maps(self, n: int, channels_last: bool, engine: Any = None) -> torch.Tensor:
        """``(n, C, H, W)`` full-resolution maps of :meth:`ours` (first target)."""
        return self.ours(n, channels_last, engine).full()[:, 0]

    def captum(self, n: int, ppe: int, target: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` Captum maps, mean over the same ``K`` draws as ours."""
        from captum.attr import Occlusion

        a, x, c = self.args, self.x[:n], self.x.shape[1]
        base = make_baselines(x, "random-pixel", a.k, seed=0, image_ids=self.ids[:n])
        occ = Occlusion(self._captum_forward)
        maps = [
            occ.attribute(
                x,
                sliding_window_shapes=(c, a.window, a.window),
                strides=(c, a.stride, a.stride),
                baselines=base[:, j],  # (n, C, 1, 1): one colour per image and draw
                target=target[:n],
                perturbations_per_eval=ppe,
            )
            for j in range(a.k)
        ]
        return torch.stack(maps).mean(dim=0)

    def _captum_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Captum only sees a function: it gets the same autocast as ours, with fp32 outputs.
        with _autocast(self.d.dev, self.args.precision):
            return self.model(x).float()

    def forwards(self, total: int, batch: int, channels_last: bool) -> Callable[[], None]:
        """``total`` plain forward passes in batches of ``batch`` on pre-built inputs."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        full = self.x[torch.arange(batch) % self.x.shape[0]].contiguous(memory_format=fmt)
        tail = full[: total % batch].contiguous(memory_format=fmt)

        @torch.inference_mode()
        def run() -> None:
            with _autocast(self.d.dev, self.args.precision):
                for _ in range(total // batch):
                    self.model(full)
                if tail.shape[0]:
                    self.model(tail)

        return run


def _captum_rows(s: _Setup, tgt: torch.Tensor, p: int) -> list[Row]:
    """Captum at its default ``perturbations_per_eval=1`` and at the fastest candidate."""
    n = s.x.shape[0]
    s.captum(1, 1, tgt)  # warm-up
    search = {ppe: s.d.timed(partial(s.captum, n, ppe, tgt))[0] for ppe in _PPE if ppe <= p}
    best = min(search, key=search.__getitem__) if search else p
    return [
        Row("captum", "perturbations_per_eval=1", partial(s.captum, n, 1, tgt)),
        Row("captum-best", f"perturbations_per_eval={best}", partial(s.captum, n, best, tgt),
            extra={"search_seconds": search}),
    ]  # fmt: skip


def _repeat(fn: Callable[[], Any], calls: int) -> None:
    for _ in range(calls):
        fn()


def _roofline_row(s: _Setup, total: int) -> Row:
    """``total`` plain forward passes at the fastest batch size and memory format."""
    cands = [(b, cl) for b in sorted({min(b, total) for b in _BATCHES}) for cl in (False, True)]
    fns = {c: s.forwards(c[0], c[0], c[1]) for c in cands}
    search: dict[tuple[int, bool], float] = {}
    for rnd in range(2):
        # Two interleaved rounds, best of the two: load from other processes only ever adds time.
        for c, fn in fns.items():
            calls = max(2, -(-min(total, 256) // c[0]))  # about 256 images, at least two batches
            if rnd == 0:
                fn()  # warm-up batch
            secs = s.d.timed(partial(_repeat, fn, calls))[0]
            search[c] = min(search.get(c, float("inf")), secs / (calls * c[0]))
    batch, cl = min(search, key=search.__getitem__)
    fn = s.forwards(total, batch, cl)
    fn()  # warm-up (the tail batch too)
    facts = {f"batch={b},channels_last={c}": v for (b, c), v in search.items()}
    return Row("roofline", f"batch={batch},channels_last={cl}", fn,
               extra={"search_seconds_per_image": facts})  # fmt: skip


def _incremental_row(s: _Setup) -> Row | str:
    """The incremental engine's row (as ``occlusion.engine: auto`` builds it), or why there is
    none for this model."""
    from pipeline.incremental import auto_engine

    try:
        engine, why = auto_engine(s.model, tuple(s.x.shape[1:]), s.d.dev)
    except Exception as e:  # reported in the table: a broken engine must not hide the others
        return f"the incremental engine failed to build: {type(e).__name__}: {e}"
    if engine is None:
        return f"no incremental engine for {s.args.model}: {why}"
    s.ours(1, False, engine)  # warm-up
    n = s.x.shape[0]
    return Row("incremental", "engine=incremental", partial(s.ours_maps, n, False, engine))


def _stored_bytes(r: OcclusionResult, ids: list[str]) -> float:
    """Bytes per image of ``r`` stored as maps rows (Parquet, zstd, as a run writes its shards)."""
    import pyarrow as pa

    from pipeline.schema import STATUS_OK, maps_schema
    from pipeline.store import write_shard

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
        return write_shard(table, Path(tmp) / "part.parquet").stat().st_size / len(ids)


def _measure(args: argparse.Namespace, d: _Device) -> tuple[list[Row], OcclusionResult, str, float]:
    """Search, warm up, then time every engine in interleaved rounds.

    Returns:
        the rows (both ``generic`` settings first), the generic kernel's result, why there is
        no incremental row ("" when there is one), and the model's score noise
        (:meth:`_Setup.score_noise`).
    """
    n, size = int(args.images), int(args.image_size)
    model = build_bench_model(args.model, size).to(d.dev)
    x = torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(0)).to(d.dev)
    s = _Setup(model, x, [f"bench-{i:04d}" for i in range(n)], args, d)
    res = s.ours(n, False)  # warm-up, and the predicted targets every engine explains
    p = res.grid.n_windows
    s.ours(1, True)  # warm-up
    rows = [
        Row("generic", f"channels_last={cl}", partial(s.ours_maps, n, cl)) for cl in (False, True)
    ]
    if not args.no_captum:
        rows += _captum_rows(s, res.target[:, 0], p)
    rows.append(_roofline_row(s, n * args.k * p + n))
    inc = _incremental_row(s) if args.engine == "auto" else "--engine generic"
    rows += [inc] if isinstance(inc, Row) else []
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
    yield (
        f"{'engine':<12} {'setting':<28} {'s/image':>9} {'images/s':>9} {'x ours':>7} "
        f"{'peak MiB':>9} {'added':>6} {'max|diff|':>9}"
    )
    for r in rows:
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        yield (
            f"{r.engine:<12} {r.setting:<28} {r.median / n:>9.4f} {n / r.median:>9.3f} "
            f"{r.median / ours.median:>7.2f} {r.peak_bytes / 2**20:>9.0f} "
            f"{r.added_bytes / 2**20:>6.0f} {diff:>9}"
        )


def _ratios(rows: list[Row], ours: Row) -> dict[str, float]:
    """Speed-ups (time of the other over time of ours) of ours, generic and incremental."""
    # Captum's fastest timed setting: the default can beat the searched one on a noisy machine.
    captum = [r for r in rows if r.engine.startswith("captum")]
    refs = {"roofline": next(r for r in rows if r.engine == "roofline")}
    if captum:
        refs["captum-best"] = min(captum, key=lambda r: r.median)
    named = {"ours": ours, **{r.engine: r for r in rows if r.engine in ("generic", "incremental")}}
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
    if args.precision not in _DTYPES:
        raise ValueError(f"--precision must be one of {sorted(_DTYPES)}, got {args.precision!r}")
    # as a run's workers do: CPU forward passes reuse freed buffers (pipeline.heap)
    heap_tuned = False if args.default_malloc else tune_heap()
    d, n = _Device(args.device), int(args.images)
    rows, res, no_inc, noise = _measure(args, d)
    scale = max(1.0, float(res.score.abs().max()))
    tol = max((1e-5 if args.precision == "fp32" else 3e-2) * scale, 4 * noise)
    bad = [r for r in rows if r.max_abs_diff is not None and not r.max_abs_diff <= tol]
    generic = min(rows[:2], key=lambda r: r.median)  # the faster memory format
    generic.extra["other_setting"] = rows[1 - rows.index(generic)].facts(n)
    rows = [generic, *rows[2:]]
    ours = next((r for r in rows if r.engine == "incremental"), generic)
    ratios = _ratios(rows, ours)
    p, stored = res.grid.n_windows, _stored_bytes(res, [f"bench-{i:04d}" for i in range(n)])
    total = n * args.k * p + n
    print(
        f"bench {args.model} {args.image_size}px window {args.window} stride {args.stride} "
        f"K={args.k} N={n}: {p} windows/image, {total} forward passes/run, median of "
        f"{len(ours.seconds)}, {args.precision}, {d.name()}, {torch.get_num_threads()} threads, "
        f"heap {'tuned' if heap_tuned else 'default'}"
    )
    print("\n".join(_table(rows, ours, n)))
    if no_inc:
        print(f"incremental: n/a ({no_inc})")
    labels = {
        "ours": f"ours (occlusion.engine auto: {ours.engine})",
        "generic": "generic (full forward passes)",
        "incremental": "incremental",
    }
    for name, label in labels.items():
        if f"{name}/roofline" in ratios:
            vs_captum = ratios.get(f"{name}/captum-best")
            print(
                f"{label}: "
                + ("" if vs_captum is None else f"{vs_captum:.2f}x Captum's fastest, ")
                + f"{ratios[f'{name}/roofline']:.2f}x the roofline"
            )
    print("targets: ours >= 3x Captum's fastest and >= 0.9x the roofline; incremental >= 5x it")
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
            "torch_threads": torch.get_num_threads(),
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
            "work": {"images": n, "windows": p, "draws": args.k, "forward_passes": total},
            "rows": [r.facts(n) for r in rows],
            "incremental": no_inc or "ok",
            "ours": ours.engine,
            "ratios": ratios,
            "stored_bytes_per_image": stored,
            "tolerance": tol,
            "score_noise": noise,
            "ok": not bad,
        }
        Path(args.json).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return 1 if bad else 0
