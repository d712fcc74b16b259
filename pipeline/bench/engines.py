"""The engines ``occlusion-audit bench`` times: our kernel (generic, incremental; the approximate
rows are in :mod:`pipeline.bench.approximate`), Captum's ``Occlusion`` and the forward-pass
roofline, each as a :class:`Row` whose ``run()`` does the work of one timed run, plus the timer
and peak-memory probe of the device they run on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.config import OcclusionConfig
from pipeline.incremental.select import attribute
from pipeline.kernel import defaults
from pipeline.kernel.baselines import make_baselines
from pipeline.kernel.occlusion import OcclusionResult
from pipeline.kernel.options import precision_context
from pipeline.kernel.targets import Score, Task
from pipeline.run.heap import trim_heap
from pipeline.run.settings import WorkerCompute, occlusion_keywords, worker_compute

__all__ = [
    "Device",
    "Row",
    "Setup",
    "bench_checks",
    "bench_occlusion",
    "bench_threshold",
    "captum_rows",
    "counterfactual_row",
    "generic_row",
    "incremental_row",
    "roofline_row",
    "worker_setting",
]

_PPE = (1, 8, 16, 32, 64, 128)  # Captum perturbations_per_eval candidates
_BATCHES = (16, 32, 64, 128, 256)  # roofline batch-size candidates


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


class Device:
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


def bench_occlusion(
    args: argparse.Namespace, engine: str, compile_: bool = False
) -> OcclusionConfig:
    """The ``occlusion`` config section a run with the bench's arguments would have."""
    return OcclusionConfig(
        compile=compile_,
        window=(args.window, args.window),
        stride=(args.stride, args.stride),
        n_baselines=args.n_baselines,
        precision=args.precision,
        max_batch=args.max_batch,
        engine=engine,
        approx_threshold=bench_threshold(args),
        approx_check_windows=bench_checks(args),
    )


def bench_threshold(args: argparse.Namespace) -> float:
    """``--approx-threshold``: tau of the approximate row (the default where not given)."""
    tau = getattr(args, "approx_threshold", None)
    return defaults.APPROX_THRESHOLD if tau is None else float(tau)


def bench_checks(args: argparse.Namespace) -> int:
    """``--approx-check-windows`` of the approximate row (the default where not given)."""
    n = getattr(args, "approx_check_windows", None)
    return defaults.APPROX_CHECK_WINDOWS if n is None else int(n)


@dataclass
class Setup:
    model: torch.nn.Module
    x: torch.Tensor  # (N, C, H, W) pixel-space images on the device
    ids: list[str]
    args: argparse.Namespace
    d: Device
    _compute: dict[tuple[str, bool], tuple[OcclusionConfig, WorkerCompute]] = field(
        default_factory=dict
    )

    def worker(self, engine: str, compile_: bool = False) -> tuple[OcclusionConfig, WorkerCompute]:
        """The config section and compute settings a worker would use with ``engine`` (and
        ``occlusion.compile: compile_``), built by the worker's own code path
        (:func:`pipeline.run.settings.worker_compute`)."""
        key = (engine, compile_)
        if key not in self._compute:
            occ = bench_occlusion(self.args, engine, compile_)
            shape = (int(self.x.shape[1]), int(self.x.shape[2]), int(self.x.shape[3]))
            self._compute[key] = (occ, worker_compute(occ, self.model, shape, self.d.dev))
        return self._compute[key]

    def ours(self, n: int, engine: str = "generic", compile_: bool = False) -> OcclusionResult:
        """What a run's worker computes for the first ``n`` images, with the worker's settings."""
        occ, wc = self.worker(engine, compile_)
        return attribute(
            self.model,
            self.x[:n],
            image_ids=self.ids[:n],
            options=wc.options,
            **occlusion_keywords(occ),
        )

    @torch.inference_mode()
    def score_noise(self) -> float:
        """Largest change of an output when its image runs alone rather than in a batch of 16,
        or channels-last rather than contiguous: the model's own float rounding (CPU kernels
        block by batch size and memory format), which every engine's deltas inherit; deep fp32
        networks reach ~1e-5 of the logit scale."""
        n = self.x.shape[0]
        batch = self.x[torch.arange(max(16, n)) % n]
        with precision_context(self.d.dev, self.args.precision):
            alone = torch.cat([self.model(self.x[i : i + 1]).float() for i in range(n)])
            together = self.model(batch).float()[:n]
            cl = self.model(batch.contiguous(memory_format=torch.channels_last)).float()[:n]
        return max(float((alone - together).abs().max()), float((cl - together).abs().max()))

    def ours_maps(self, n: int, engine: str = "generic", compile_: bool = False) -> torch.Tensor:
        """``(n, C, H, W)`` full-resolution maps of :meth:`ours` (first target)."""
        return self.ours(n, engine, compile_).full()[:, 0]

    def captum(self, n: int, ppe: int, target: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` Captum maps, mean over the same ``K`` draws as ours."""
        from captum.attr import Occlusion

        a, x, c = self.args, self.x[:n], self.x.shape[1]
        base = make_baselines(x, "random-pixel", a.n_baselines, seed=0, image_ids=self.ids[:n])
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
            for j in range(a.n_baselines)
        ]
        return torch.stack(maps).mean(dim=0)

    def _captum_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Captum only sees a function: it gets the same autocast as ours, with fp32 outputs.
        with precision_context(self.d.dev, self.args.precision):
            return self.model(x).float()

    def forwards(self, total: int, batch: int, channels_last: bool) -> Callable[[], None]:
        """``total`` plain forward passes in batches of ``batch`` on pre-built inputs."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        full = self.x[torch.arange(batch) % self.x.shape[0]].contiguous(memory_format=fmt)
        tail = full[: total % batch].contiguous(memory_format=fmt)

        @torch.inference_mode()
        def run() -> None:
            with precision_context(self.d.dev, self.args.precision):
                for _ in range(total // batch):
                    self.model(full)
                if tail.shape[0]:
                    self.model(tail)

        return run


def captum_rows(s: Setup, tgt: torch.Tensor, p: int) -> list[Row]:
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


def roofline_row(s: Setup, total: int) -> Row:
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


def incremental_row(s: Setup) -> Row | str:
    """The incremental engine's row (as a worker with ``occlusion.engine: auto`` builds it), or
    why there is none for this model."""
    try:
        _, wc = s.worker("auto")
    except Exception as e:  # reported in the table: a broken engine must not hide the others
        return f"the incremental engine failed to build: {type(e).__name__}: {e}"
    if wc.engine_name != "incremental":
        return f"no incremental engine for {s.args.model}: {wc.engine_note}"
    s.ours(1, "auto")  # warm-up
    n = s.x.shape[0]
    return Row("incremental", worker_setting(wc), partial(s.ours_maps, n, "auto"))


def worker_setting(wc: WorkerCompute) -> str:
    """The table's setting column of a row computed with a worker's options."""
    o = wc.options
    return f"max_batch={o.max_batch},cl={int(o.channels_last)},fixed" + (",compile" * o.compile)


def generic_row(s: Setup) -> Row:
    """The generic kernel as a worker with ``occlusion.engine: generic`` runs it."""
    _, wc = s.worker("generic")
    return Row("generic", worker_setting(wc), partial(s.ours_maps, s.x.shape[0], "generic"))


def compiled_row(s: Setup) -> Row:
    """The generic kernel as a worker with ``engine: generic`` and ``compile: true`` runs it
    (compiled while the worker's settings are built, as a worker does at start-up)."""
    _, wc = s.worker("generic", compile_=True)
    s.ours(1, "generic", compile_=True)  # warm-up
    return Row("compiled", worker_setting(wc), partial(s.ours_maps, s.x.shape[0], "generic", True))


def counterfactual_row(s: Setup, swaps: int = 4) -> Row:
    """The counterfactual pass a worker adds per image: ``swaps`` same-group and ``swaps``
    other-group backgrounds, no-fg and only-fg, one forward pass per image (worker options)."""
    from pipeline.kernel.counterfactual import background, counterfactual_scores
    from pipeline.kernel.forward import Forward

    _, wc = s.worker("generic")
    o = wc.options
    n, (_, h, w) = s.x.shape[0], s.x.shape[1:]
    mask = torch.zeros(h, w, dtype=torch.bool, device=s.d.dev)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True  # the object: the central quarter
    backs = [background(s.x[i], mask) for i in range(n)]
    fwd = Forward(s.model, s.d.dev, o.precision, Task.CLASSIFICATION, Score.LOGIT, o.channels_last)
    target = torch.zeros(1, dtype=torch.long, device=s.d.dev)

    def run() -> None:
        for i in range(n):
            others = [backs[(i + k) % n] for k in range(1, swaps + 1)]
            counterfactual_scores(fwd, s.x[i : i + 1], mask[None], [others], [others], target)

    run()  # warm-up
    return Row("cf-swaps", f"swaps={swaps}+{swaps},1 pass/image", run)
