"""Quality of the approximate engine on a trained network, against the exact engine.

In one process:

1. Generates the demo's shortcut data (``pipeline.demo.synth``: six rooms of 64x64 views; in
   ``office`` and ``garage`` a lamp's position encodes the steering): training views (seed 0) and
   held-out audit views (seed 1).
2. Trains ``pipeline.models:SmallResNet`` (four residual blocks) as a steering regressor with the
   demo's training loop (``train_demo_model``).
3. Audits the held-out views as a run's workers do (``process_shard`` with ``worker_compute``'s
   options; no Ray, no counterfactuals), once with the exact incremental engine and once per tau
   with ``occlusion.engine: approximate`` and the default check windows, and aggregates each
   audit with the project's statistics (``pipeline.aggregate``: geometric-mean fg/bg ratios,
   bootstrap intervals, Benjamini-Hochberg verdicts).
4. Compares every approximate audit with the exact one: SSIM of each full-resolution map to the
   exact map (Krypton's quality measure; Wang et al. 2004, 11x11 Gaussian window, sigma 1.5,
   data range of the exact map, as ``skimage.metrics.structural_similarity`` with
   ``gaussian_weights=True, use_sample_covariance=False``), the largest change of a group's
   geometric-mean ratio, the verdicts that agree, and the stored ``approx_error`` against the
   image's true largest error over every window (one draw per window, so the maps' difference
   is each window's error).
5. Times the kernel on a subset of the views, exact and approximate with and without the check
   windows, in interleaved rounds (medians), so the speed-ups sit beside the quality.

Usage:
    python benchmarks/approx_quality.py [--train-per-room 100] [--audit-per-room 22]
        [--epochs 6] [--time-images 8] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

TAUS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WINDOW, STRIDE, SIZE = 8, 4, 64  # 15 x 15 = 225 windows per view


def ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Mean SSIM of two ``(H, W)`` maps (Wang et al. 2004): Gaussian-weighted local statistics
    (sigma 1.5, truncated at 3.5 sigma: an 11x11 window, reflected at the edges), constants
    ``(0.01 L)^2`` and ``(0.03 L)^2`` for data range ``L``, averaged away from the 5 px border."""
    a, b = a.astype(np.float64), b.astype(np.float64)

    def blur(v: np.ndarray) -> np.ndarray:
        return gaussian_filter(v, sigma=1.5, truncate=3.5, mode="reflect")

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s[5:-5, 5:-5].mean())


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path, float]:
    """The audit manifest, the trained weights and the training seconds."""
    from pipeline.demo.synth import generate_dataset
    from pipeline.demo.train import train_demo_model
    from pipeline.models.nets import SmallResNet

    size = (SIZE, SIZE)
    train = generate_dataset(root / "train", args.train_per_room, image_size=size, seed=0)
    audit = generate_dataset(root / "audit", args.audit_per_room, image_size=size, seed=1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    weights = train_demo_model(
        train, root / "small_resnet.pt", epochs=args.epochs, net=SmallResNet(), log=True
    )
    return audit, weights, time.perf_counter() - t0


def config(audit: Path, weights: Path, engine: str, tau: float = 1.0) -> Any:
    """The audit config of one engine (the demo's, with SmallResNet and one draw per window)."""
    from pipeline import load_config

    return load_config(
        {
            "name": f"approx-quality-{engine}-{tau:g}",
            "dataset": {"manifest": str(audit), "root": str(audit.parent),
                        "columns": {"id": "image_id", "path": "path", "label": "label",
                                    "mask": "mask_path"},
                        "group_by": ["room"], "image_size": [SIZE, SIZE]},
            "model": {"factory": "pipeline.models:SmallResNet", "kwargs": {"num_classes": 1},
                      "weights": str(weights), "task": "regression", "target": 0},
            "occlusion": {"window": [WINDOW, WINDOW], "stride": [STRIDE, STRIDE],
                          "baseline": "random-pixel", "n_baselines": 1, "engine": engine,
                          "approx_threshold": tau},
            "audit": {"threshold": 1.0, "min_images": 20},
            "output": {"dir": str(audit.parent / "runs" / f"{engine}-{tau:g}")},
        }
    )  # fmt: skip


def run_audit_here(cfg: Any) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[float, str]]]:
    """Maps and metrics of every view as a worker stores them, and each room's
    ``(gmean_ratio, status)`` from :func:`pipeline.aggregate`."""
    from pipeline import aggregate
    from pipeline.data.detect import open_source
    from pipeline.models import load_model
    from pipeline.run.folder import RunFolder
    from pipeline.run.settings import worker_compute
    from pipeline.run.shard import process_shard

    model = load_model(cfg.model, cfg.dataset.normalize, torch.device("cpu"))
    compute = worker_compute(cfg.occlusion, model, (3, SIZE, SIZE), "cpu")
    source, folder = open_source(cfg.dataset), RunFolder(cfg.output.dir)
    rows: dict[str, dict[str, Any]] = {}
    for i, ref in enumerate(source.shards(cfg.cluster.shard_size)):
        table = process_shard(model, source.read(ref), cfg, i, compute.options)
        folder.write_shard(i, table)
        rows.update({r["image_id"]: r for r in table.to_pylist()})
    summary = aggregate(folder.path, group_by=["room"], write=False)
    groups = {r.room: (float(r.gmean_ratio), str(r.status)) for r in summary.itertuples()}
    return rows, groups


def compare(
    exact: tuple[dict, dict], approx: tuple[dict, dict], checks: int, seed: int
) -> dict[str, Any]:
    """Quality of one approximate audit against the exact one."""
    from pipeline.kernel.approx_check import check_windows, covered_quantile
    from pipeline.kernel.occlusion import expand_map

    (rows_e, groups_e), (rows_a, groups_a) = exact, approx
    q = covered_quantile(checks)
    sims, stored_share, old_share, covered, largest_all = [], [], [], [], []
    for image_id, re_ in rows_e.items():
        ra = rows_a[image_id]
        me, ma = expand_map(re_), expand_map(ra)  # (H, W) full-resolution maps
        sims.append(ssim(ma, me, float(me.max() - me.min()) or 1.0))
        err = np.abs(np.asarray(ra["delta"]) - np.asarray(re_["delta"]))  # (P,) every window
        largest = float(err.max())
        largest_all.append(largest)
        old = float(err[check_windows(len(err), 4, [image_id], seed)[0].numpy()].max())
        if largest > 0:
            stored_share.append(ra["approx_error"] / largest)
            old_share.append(old / largest)
        covered.append(ra["approx_error"] >= np.quantile(err, q, method="inverted_cdf"))
    change = max(abs(groups_a[g][0] / groups_e[g][0] - 1) for g in groups_e)
    agree = sum(groups_a[g][1] == groups_e[g][1] for g in groups_e)
    return {
        "ssim_mean": float(np.mean(sims)),
        "ssim_min": float(np.min(sims)),
        "largest_gmean_ratio_change": change,
        "verdicts_agreeing": agree,
        "groups": len(groups_e),
        "gmean_ratios": {g: v[0] for g, v in groups_a.items()},
        "verdicts": {g: v[1] for g, v in groups_a.items()},
        # NaN where no image has an error (tau so large that nothing is truncated)
        "stored_over_largest_median": float(np.median(stored_share)) if stored_share else math.nan,
        "four_windows_over_largest_median": float(np.median(old_share)) if old_share else math.nan,
        "largest_error_median": float(np.median(largest_all)),
        "share_at_or_above_quantile": float(np.mean(covered)),
        "quantile": q,
    }


def time_engines(audit: Path, weights: Path, n: int, rounds: int) -> dict[str, float]:
    """Median seconds per image of the kernel on the first ``n`` views: exact, and each tau
    with and without its check windows, interleaved round by round."""
    from pipeline import attribute
    from pipeline.data.detect import open_source
    from pipeline.models import load_model
    from pipeline.run.settings import kernel_keywords, worker_compute
    from pipeline.run.shard import load_shard

    cfg = config(audit, weights, "incremental")
    source = open_source(cfg.dataset)
    records = [r for ref in source.shards(n) for r in source.read(ref)][:n]
    x = torch.stack([it.image for it in load_shard(records, cfg)])  # (n, 3, 64, 64)
    ids = [r.image_id for r in records]
    model = load_model(cfg.model, cfg.dataset.normalize, torch.device("cpu"))
    kw = {**kernel_keywords(cfg), "target": 0, "image_ids": ids}
    options = {"exact": worker_compute(cfg.occlusion, model, (3, SIZE, SIZE), "cpu").options}
    for tau in TAUS:
        occ = config(audit, weights, "approximate", tau).occlusion
        checked = worker_compute(occ, model, (3, SIZE, SIZE), "cpu").options
        options[f"{tau:g}"] = checked
        options[f"{tau:g} unchecked"] = replace(checked, approx_check_windows=0)
    seconds: dict[str, list[float]] = {name: [] for name in options}
    for opts in options.values():  # warm-up
        attribute(model, x[:1], options=opts, **{**kw, "image_ids": ids[:1]})
    for _ in range(rounds):
        for name, opts in options.items():
            t0 = time.perf_counter()
            attribute(model, x, options=opts, **kw)
            seconds[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in seconds.items()}


def table(results: dict[str, Any], timing: dict[str, float], exact: dict) -> list[str]:
    """The markdown table of the README."""
    out = [
        "| tau | SSIM to exact, mean (min) | largest change of a room's gmean ratio "
        "| verdicts as exact | approx_error / true largest, median (4 windows) "
        "| images with approx_error >= 90th pct | speed-up over exact (without checks) "
        "| check windows' cost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tau, r in results.items():
        ex, ch, bare = timing["exact"], timing[tau], timing[f"{tau} unchecked"]
        stored, old = r["stored_over_largest_median"], r["four_windows_over_largest_median"]
        errors = "no error" if math.isnan(stored) else f"{stored:.2f} ({old:.2f})"
        out.append(
            f"| {tau} | {r['ssim_mean']:.3f} ({r['ssim_min']:.3f}) "
            f"| {100 * r['largest_gmean_ratio_change']:.1f}% "
            f"| {r['verdicts_agreeing']}/{r['groups']} | {errors} "
            f"| {100 * r['share_at_or_above_quantile']:.0f}% "
            f"| {ex / ch:.2f}x ({ex / bare:.2f}x) | {ch / bare - 1:+.0%} |"
        )
    flagged = sorted(g for g, v in exact[1].items() if v[1] == "flagged")
    ratios = ", ".join(f"{g} {v[0]:.2f}" for g, v in sorted(exact[1].items()))
    out.append("")
    out.append(f"exact: {timing['exact']:.3f} s/image; flagged {flagged}; gmean ratios {ratios}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-per-room", type=int, default=100, help="training views per room")
    p.add_argument("--audit-per-room", type=int, default=22, help="audited views per room")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--time-images", type=int, default=8, help="views timed per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipeline.kernel import defaults

    with tempfile.TemporaryDirectory(prefix="approx-quality-") as tmp:
        audit, weights, train_s = prepare(Path(tmp), args)
        t0 = time.perf_counter()
        exact = run_audit_here(config(audit, weights, "incremental"))
        audit_s = {"exact": time.perf_counter() - t0}
        results = {}
        for tau in TAUS:
            t0 = time.perf_counter()
            approx = run_audit_here(config(audit, weights, "approximate", tau))
            audit_s[f"{tau:g}"] = time.perf_counter() - t0
            results[f"{tau:g}"] = compare(exact, approx, defaults.APPROX_CHECK_WINDOWS, 0)
        timing = time_engines(audit, weights, args.time_images, args.rounds)
    views = len(exact[0])
    print(
        f"SmallResNet trained in {train_s:.0f} s; {views} audited {SIZE}px views, window "
        f"{WINDOW} stride {STRIDE} ({((SIZE - WINDOW) // STRIDE + 1) ** 2} windows), K=1, "
        f"{defaults.APPROX_CHECK_WINDOWS} check windows; {args.threads} torch threads, "
        f"{os.cpu_count()} CPUs"
    )
    print("\n".join(table(results, timing, exact)))
    if args.json:
        facts = {
            "args": vars(args),
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                        "python": platform.python_version(), "platform": platform.platform()},
            "train_seconds": train_s,
            "audit_seconds": audit_s,
            "views": views,
            "exact": {"gmean_ratios": {g: v[0] for g, v in exact[1].items()},
                      "verdicts": {g: v[1] for g, v in exact[1].items()}},
            "results": results,
            "seconds_per_image": timing,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    ok = all(math.isfinite(r["ssim_mean"]) for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
