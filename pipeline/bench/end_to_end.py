"""``occlusion-audit bench --end-to-end N``: a whole audit against what a user would run instead.

Three ways over the same N generated images (PNG files with masks) and the same course-sized
CNN (``SeedCNN(num_classes=1, input_dim=size)`` loaded from a ``state_dict`` through
``model.factory``), with K random-pixel baselines:

- **run**: ``run_audit`` on the embedded Ray, counterfactuals off (the occlusion work alone);
  its steady-state images/s is ``shard_size`` over the median shard time per actor, start-up
  (Ray, actors, model) reported separately;
- **kernel**: the same images decoded and computed in this process with the worker's settings
  (:func:`pipeline.run.settings.worker_compute`);
- **captum-script**: a ``DataLoader`` over the files, Captum's ``Occlusion`` at its best
  ``perturbations_per_eval``, the K draws averaged, the maps written to Parquet.

Each is timed over its images after a warm-up; the ratios are images/s over images/s. With
``--compile`` the run and the kernel both use ``occlusion.compile: true``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

__all__ = ["run_end_to_end"]

_PPE = (8, 16, 32, 64)


def _data(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            root / "img" / f"{i:05d}.png"
        )
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        Image.fromarray(mask).save(root / "img" / f"{i:05d}-mask.png")
        rows.append({"image_id": f"{i:05d}", "path": f"img/{i:05d}.png",
                     "mask_path": f"img/{i:05d}-mask.png", "group": "all"})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


def _config(root: Path, args: argparse.Namespace, weights: Path) -> Any:
    from pipeline.config import load_config

    size = int(args.image_size)
    return load_config(
        {
            "name": "bench-e2e",
            "dataset": {
                "manifest": str(root / "manifest.parquet"),
                "group_by": ["group"],
                "image_size": [size, size],
            },
            "model": {
                "factory": "pipeline.models:SeedCNN",
                "kwargs": {"num_classes": 1, "input_dim": size},
                "weights": str(weights),
                "task": "regression",
                "target": 0,
            },
            "occlusion": {
                "window": [args.window] * 2,
                "stride": [args.stride] * 2,
                "n_baselines": args.n_baselines,
                "compile": bool(getattr(args, "compile", False)),
            },
            "counterfactual": {"enabled": False},
            "cluster": {"address": "local", "shard_size": 8},
            "output": {"dir": str(root / "run")},
        }
    )


def _kernel(cfg: Any, n: int) -> float:
    """Images/s of the worker's computation in this process (decode included)."""
    from pipeline.data.manifest import read_manifest, records
    from pipeline.models import load_model
    from pipeline.run.settings import worker_compute
    from pipeline.run.shard import load_shard, process_shard

    recs = records(read_manifest(cfg.dataset), cfg.dataset)
    model = load_model(cfg.model, None, "cpu")
    size = cfg.dataset.image_size
    wc = worker_compute(cfg.occlusion, model, (3, *size), torch.device("cpu"))
    shard = int(cfg.cluster.shard_size)
    process_shard(model, recs[:1], cfg, 0, wc.options)  # warm-up
    t0 = time.perf_counter()
    for k in range(0, n, shard):
        part = recs[k : k + shard]
        process_shard(model, part, cfg, k // shard, wc.options, load_shard(part, cfg))
    return n / (time.perf_counter() - t0)


def _captum_script(root: Path, cfg: Any, n: int, out: Path) -> tuple[float, int]:
    """Images/s of the script a user would write with Captum, and its best ppe."""
    from captum.attr import Occlusion

    from pipeline.kernel.baselines import make_baselines
    from pipeline.models import load_model

    model = load_model(cfg.model, None, "cpu")
    paths = sorted((root / "img").glob("[0-9][0-9][0-9][0-9][0-9].png"))

    def load(i: int) -> torch.Tensor:
        arr = np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(arr).permute(2, 0, 1)

    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=8)
    occ = Occlusion(lambda x: model(x)[:, 0])
    w, s, k = cfg.occlusion.window[0], cfg.occlusion.stride[0], cfg.occlusion.n_baselines

    def run(count: int, ppe: int) -> None:
        rows = []
        for batch in loader:
            x = torch.stack([load(i) for i in batch.tolist()])
            ids = [f"{i:05d}" for i in batch.tolist()]
            base = make_baselines(x, "random-pixel", k, image_ids=ids)
            maps = torch.stack([
                occ.attribute(x, sliding_window_shapes=(3, w, w), strides=(3, s, s),
                              baselines=base[:, j], perturbations_per_eval=ppe)
                for j in range(k)
            ]).mean(dim=0)  # fmt: skip
            rows += [{"image_id": i, "map": m.mean(dim=0).flatten().tolist()}
                     for i, m in zip(ids, maps, strict=True)]  # fmt: skip
            if len(rows) >= count:
                break
        pq.write_table(pa.Table.from_pylist(rows), out)

    with torch.inference_mode():
        search = {}
        for ppe in _PPE:
            t0 = time.perf_counter()
            run(1, ppe)
            search[ppe] = time.perf_counter() - t0
        best = min(search, key=search.__getitem__)
        t0 = time.perf_counter()
        run(n, best)
    return n / (time.perf_counter() - t0), best


def _run_rate(cfg: Any) -> tuple[float, float, float, Any]:
    """One real audit: (steady-state images/s, start-up s, total s, run record)."""
    import shutil

    from pipeline.run.folder import RunFolder
    from pipeline.run.runner import run_audit

    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    t0 = time.perf_counter()
    run_audit(cfg, progress=False)
    total = time.perf_counter() - t0
    record = RunFolder(cfg.output.dir).read_record()
    actors = int(record.pool.get("actors", 1))
    # per actor: shard_size over its median shard time, so the last shard's tail (one actor
    # busy, the other done) does not count against the steady state
    shard_s = float(record.timings.get("shard_seconds_median") or total)
    rate = actors * int(cfg.cluster.shard_size) / shard_s
    return rate, float(record.timings.get("startup_s") or 0.0), total, record


def run_end_to_end(args: argparse.Namespace) -> int:
    """The ``--end-to-end N`` bench; prints a table, writes ``--json`` if given.

    ``--rounds R`` repeats the three measurements R times, interleaved (run, kernel, Captum
    script, then again), and reports each row's median and the ratios of the medians.
    """
    from pipeline.models import SeedCNN
    from pipeline.run.heap import tune_heap

    tune_heap()
    n, rounds = int(args.end_to_end), max(1, int(getattr(args, "rounds", 1) or 1))
    runs, kernels, captums, startups, totals, ppes = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _data(root, n, int(args.image_size))
        torch.manual_seed(0)
        weights = root / "cnn.pth"
        torch.save(SeedCNN(num_classes=1, input_dim=int(args.image_size)).state_dict(), weights)
        cfg = _config(root, args, weights)
        for _ in range(rounds):
            rate, startup, total, record = _run_rate(cfg)
            runs.append(rate)
            startups.append(startup)
            totals.append(total)
            kernels.append(_kernel(cfg, n))
            captum_rate, ppe = _captum_script(root, cfg, n, root / "captum.parquet")
            captums.append(captum_rate)
            ppes.append(ppe)
    med = statistics.median
    rows = {
        "run": {
            "images_per_s": med(runs),
            "startup_s": med(startups),
            "total_s": med(totals),
            "rounds": runs,
            "ok": record.counts.ok,
            "phases_s": dict(record.timings.get("phases_s", {})),
            "engine": record.engine,
        },
        "kernel": {"images_per_s": med(kernels), "rounds": kernels},
        "captum-script": {
            "images_per_s": med(captums),
            "rounds": captums,
            "perturbations_per_eval": ppes,
        },
    }
    ratios = {
        "run/kernel": med(runs) / med(kernels),
        "run/captum-script": med(runs) / med(captums),
    }
    print(
        f"end to end: {n} images, {args.image_size}px, window {args.window} stride "
        f"{args.stride}, K={args.n_baselines}, SeedCNN regression, median of {rounds} round(s)"
    )
    for name, r in rows.items():
        each = ", ".join(f"{v:.2f}" for v in r["rounds"])
        print(f"  {name:<14} {r['images_per_s']:8.2f} images/s  ({each})")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in rows["run"]["phases_s"].items())
    print(f"  run start-up {med(startups):.1f} s of {med(totals):.1f} s; workers' time: {phases}")
    print(
        f"  run/kernel {ratios['run/kernel']:.2f}, run/captum-script "
        f"{ratios['run/captum-script']:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2,
                                              default=str) + "\n")  # fmt: skip
    return 0
