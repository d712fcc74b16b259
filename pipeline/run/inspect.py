"""``occlusion-audit inspect``: what an audit will read and how long it will take, before it runs.

It opens the source as a run would (format detection included), makes the driver's one streaming
pass (counts per group, foregrounds), decodes an evenly spaced sample (missing or undecodable
files, mean foreground area), and times a few sample images through the same per-shard code a
worker runs, with the worker's settings and threads, to give an ETA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pipeline.config import AuditConfig
from pipeline.data.detect import open_source
from pipeline.data.foreground import load_item
from pipeline.data.images import DataError
from pipeline.data.plan import plan_source
from pipeline.kernel.geometry import WindowGrid
from pipeline.run.eta import estimate
from pipeline.terminal import printable

__all__ = ["Inspection", "inspect_audit"]

# What a run costs besides its images, as measured on a 2-core machine: the command's own start
# (Python, torch, Ray imports, the pre-run check) and an embedded Ray, its actors and their
# models, 15-18 s from the command to the first shard; joining a running cluster skips Ray's own
# start (not the nodes an autoscaler starts). Each shard then costs its dispatch, its Parquet
# commit and the driver's bookkeeping, about 0.5 s whatever its size (run.json: total_s -
# startup_s against the workers' phases_s).
STARTUP_LOCAL_S = 15.0
STARTUP_CLUSTER_S = 4.0
SHARD_OVERHEAD_S = 0.5


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_audit` found."""

    format: str
    detected: str
    group_by: tuple[str, ...]
    found: str
    images: int
    shards: int
    groups: dict[tuple[str | None, ...], int]
    with_fg: int
    sampled: int
    sample_errors: list[str] = field(default_factory=list)
    mean_fg_area: float = math.nan  # fraction of the image, over sampled images with one
    windows: int = 0  # per image
    n_baselines: int = 0  # K, the draws per window
    forward_passes: int = 0  # images x windows x n_baselines, plus one clean pass per image
    seconds_per_image: float = math.nan  # one worker, calibrated
    actors: int = 1  # the most actors the pool asks for on the target
    startup_s: float = 0.0
    eta_s: float = math.nan
    target: str = "this machine"  # where the pool was planned
    pool: str = ""  # the pool, in words
    calibrated_on: str = ""  # the device (and node) the calibration ran on
    note: str = ""  # why there is no ETA, if there is none

    def text(self, group_by: tuple[str, ...]) -> str:
        """The report ``inspect`` prints; values from the data are escaped for the terminal
        (:func:`pipeline.terminal.printable`)."""
        lines = [
            f"format: {self.format} ({self.detected})",
            f"  {self.found}",
            f"images: {self.images} in {self.shards} shard(s)",
            f"groups ({', '.join(group_by) or 'one group'}):",
        ]
        for key, n in sorted(self.groups.items(), key=lambda kv: [str(v) for v in kv[0]]):
            shown = ", ".join("-" if v is None else printable(v) for v in key)  # one line each
            lines.append(f"  {shown or 'all'}: {n}")
        area = "n/a" if math.isnan(self.mean_fg_area) else f"{self.mean_fg_area:.3f}"
        lines += [
            f"foreground: {self.with_fg} of {self.images} images; mean area {area} "
            f"(sample of {self.sampled})",
            f"sample: {len(self.sample_errors)} of {self.sampled} unreadable",
            *[f"  {printable(e)}" for e in self.sample_errors[:10]],
            f"forward passes: {self.forward_passes} ({self.images} images x {self.windows} "
            f"windows x {self.n_baselines} draws, + {self.images} clean)",
            f"pool on {self.target}: {self.pool}",
            f"calibration: {self.seconds_per_image:.3f} s/image per actor on "
            f"{self.calibrated_on or 'nothing'}, {self.actors} actor(s)",
            f"ETA: {_duration(self.eta_s)} (start-up {self.startup_s:.0f}s included)"
            if not self.note
            else f"ETA: unknown ({self.note})",
        ]
        return "\n".join(lines)


def _duration(s: float) -> str:
    if math.isnan(s):
        return "unknown"
    h, rest = divmod(round(s), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _sample_rows(n: int, k: int) -> list[int]:
    """``k`` evenly spaced rows of ``n`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


def inspect_audit(
    config: AuditConfig, sample: int = 32, calibrate: int = 4, cluster_file: str | None = None
) -> Inspection:
    """Inspect the source and cost of ``config``'s audit without writing anything.

    Args:
        config: the audit config.
        sample: images decoded to look for bad files and measure foreground areas.
        calibrate: sample images timed through the worker's per-shard code (after one warm-up),
            on one worker of the pool the config asks for (:mod:`pipeline.run.eta`).
        cluster_file: plan the pool for this deployment's node types (a cluster launcher
            config or a KubeRay manifest) instead of ``cluster.address``.

    Raises:
        SourceError: the source cannot be opened (the CLI exits 2).
        PoolStartError: the target cannot host the pool (the CLI exits 2).
    """
    source = open_source(config.dataset)
    config = replace(config, dataset=source.cfg)
    plan = plan_source(source, int(config.cluster.shard_size))
    rows = _sample_rows(plan.images, sample)
    records = source.take(rows)
    errors, areas, good = [], [], []
    for rec in records:
        try:
            if rec.error is not None:
                raise DataError(rec.error)
            item = load_item(rec, config.dataset)
        except (DataError, OSError) as e:
            errors.append(str(e))
            continue
        good.append(rec)
        if item.fg is not None:
            areas.append(float(item.fg.float().mean()))
    occ = config.occlusion
    grid = WindowGrid.create((3, *config.dataset.image_size), occ.window, occ.stride)
    windows = math.prod(grid.counts)
    k = int(occ.n_baselines or 1)
    est = estimate(config, good[: calibrate + 1], len(plan.shards), cluster_file)
    local = str(config.cluster.address) == "local" and cluster_file is None
    startup = STARTUP_LOCAL_S if local else STARTUP_CLUSTER_S
    if config.occlusion.compile:  # every actor compiles while it starts
        startup += est.setup_s
    actors = est.pool.actors
    per_actor = max(1, actors)
    shards_each = math.ceil(len(plan.shards) / per_actor)
    eta = startup + shards_each * SHARD_OVERHEAD_S + est.seconds_per_image * plan.images / per_actor
    pool = (
        f"{est.pool.device} ({est.pool.why}), up to {actors} actor(s) of "
        f"{{GPU: {est.pool.num_gpus:g}, CPU: {est.pool.num_cpus:g}}}"
    )
    return Inspection(
        format=plan.format,
        detected=plan.detected,
        group_by=tuple(config.dataset.group_by),
        found=plan.found,
        images=plan.images,
        shards=len(plan.shards),
        groups=plan.groups,
        with_fg=plan.with_fg,
        sampled=len(records),
        sample_errors=errors,
        mean_fg_area=sum(areas) / len(areas) if areas else math.nan,
        windows=windows,
        n_baselines=k,
        forward_passes=plan.images * (windows * k + 1),
        seconds_per_image=est.seconds_per_image,
        actors=actors,
        startup_s=startup,
        eta_s=eta,
        target=est.where,
        pool=pool,
        calibrated_on=est.calibrated_on,
        note=est.note,
    )
