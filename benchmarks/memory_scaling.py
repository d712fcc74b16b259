"""Peak memory of a batch audit of N and of 10N images: driver and workers should stay flat.

Each size runs ``pipeline.run_audit`` on an embedded local Ray in a fresh child process (so the
driver starts clean), while this process samples ``VmRSS`` of every process in the child's tree
(driver, Ray's system processes, the shard workers) every 0.2 s and keeps the maximum per process
and the maximum of the sum. A streaming audit holds one shard at a time per worker, so every
peak should be within ~10% between N and 10N; the ratio column says whether it is.

Usage:
    python benchmarks/memory_scaling.py [--n 200] [--factor 10] [--size 64] [--json out.json]

A shard worker's RSS climbs over its first ~7 shards before it levels off (freed memory kept by
glibc's per-thread arenas: Ray runs the actor's calls on two threads), so N should give each
worker well over 7 shards; at N=40 (2 shards) the ratio measures that warm-up, not growth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

_PERIOD_S = 0.2  # sampling period, seconds


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from ``/proc/<pid>/stat``."""
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # the process ended between listdir and read
        # the command name may contain spaces and parentheses: fields resume after the last ')'
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids[ppid].append(int(entry))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _rss_and_label(pid: int) -> tuple[int, str] | None:
    """``(VmRSS bytes, short label)`` of ``pid``, or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    rss = next((int(s.split()[1]) for s in status.splitlines() if s.startswith("VmRSS:")), 0)
    words = [a.decode(errors="replace") for a in argv if a]
    label = words[0] if words else "?"
    if label.endswith("python") or "python3" in label:
        label = next((w for w in words[1:] if not w.startswith("-")), label)
    return rss * 1024, os.path.basename(label)[:60]


class Sampler(threading.Thread):
    """Samples the RSS of a process tree until stopped."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.stop = root, threading.Event()
        self.peak: dict[int, int] = {}  # pid -> max RSS, bytes
        self.label: dict[int, str] = {}  # pid -> latest label (Ray retitles idle/busy workers)
        self.series: dict[int, list[int]] = defaultdict(list)  # worker pid -> RSS per sample
        # max over samples of the concurrent sum of each group, bytes
        self.peak_sum = {"workers": 0, "ray_system": 0, "tree": 0}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            sums = dict.fromkeys(self.peak_sum, 0)
            for pid in _tree(self.root):
                got = _rss_and_label(pid)
                if got is None:
                    continue
                rss, label = got
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
                if label.startswith("ray::") or pid not in self.label:
                    self.label[pid] = label
                sums["tree"] += rss
                if pid != self.root:
                    group = "workers" if _is_worker(self.label[pid]) else "ray_system"
                    sums[group] += rss
                    if group == "workers":
                        self.series[pid].append(rss)
            self.peak_sum = {k: max(v, sums[k]) for k, v in self.peak_sum.items()}
            self.samples += 1
            self.stop.wait(_PERIOD_S)

    def summary(self) -> dict[str, Any]:
        """Peaks in MiB: driver, largest worker, and the concurrent sums of each group."""
        mib = 2**20
        workers = [p for p in self.peak if p != self.root and _is_worker(self.label[p])]
        longest = max(workers, key=lambda p: len(self.series[p]), default=None)
        quarters: list[float] = []
        if longest is not None:
            # the busiest worker's peak in each quarter of its life: growth shows as a rising row
            rss = self.series[longest]
            cut = [round(i * len(rss) / 4) for i in range(5)]
            quarters = [max(rss[a:b], default=0) / mib for a, b in itertools.pairwise(cut)]
        return {
            "driver": self.peak.get(self.root, 0) / mib,
            "worker_max": max((self.peak[p] for p in workers), default=0) / mib,
            **{f"{k}_sum": v / mib for k, v in self.peak_sum.items()},
            "worker_processes": len(workers),
            "busiest_worker_quarters": [round(q, 1) for q in quarters],
            "by_process": {
                f"{self.label[p]} (pid {p})": round(v / mib, 1)
                for p, v in sorted(self.peak.items(), key=lambda pv: -pv[1])
            },
        }


def _is_worker(label: str) -> bool:
    # Ray titles worker processes ray::<Actor> / ray::IDLE; its system daemons are
    # gcs_server, raylet and the dashboard/runtime-env agents (ray::DashboardAgent).
    return label.startswith("ray::") and "Agent" not in label


def make_dataset(root: Path, n: int, size: int) -> None:
    """``n`` random PNG images with rectangular PNG masks, and the model weights, under ``root``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from pipeline.models.nets import SeedCNNWithGAP

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img{i:05d}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            root / "images" / name
        )
        mask = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        mask[y0 : y0 + size // 3, x0 : x0 + size // 3] = 255
        Image.fromarray(mask).save(root / "masks" / name)
        rows.append(
            {"image_id": name[:-4], "path": f"images/{name}", "mask_path": f"masks/{name}",
             "room": "ab"[i % 2], "label": str(i % 2)}
        )  # fmt: skip
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, root / "manifest.parquet")
    torch.manual_seed(0)
    torch.save(SeedCNNWithGAP(num_classes=2).state_dict(), root / "model.pt")


def _child(args: argparse.Namespace) -> int:
    """Driver side: audit the first ``args.images`` manifest rows and print the run's facts."""
    import pyarrow.parquet as pq

    from pipeline import load_config, run_audit

    root, out = Path(args.root), Path(args.out)
    manifest = out / "manifest.parquet"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(root / "manifest.parquet").slice(0, args.images), manifest)
    size, win = int(args.size), int(args.window)
    cfg = load_config(
        {
            "name": f"mem-{args.images}",
            "dataset": {"manifest": str(manifest), "root": str(root), "group_by": ["room"],
                        "image_size": [size, size]},
            "model": {"factory": "pipeline.models:SeedCNNWithGAP", "kwargs": {"num_classes": 2},
                      "weights": str(root / "model.pt")},
            "occlusion": {"window": [win, win], "stride": [win // 2, win // 2],
                          "n_baselines": 2, "max_batch": 64},
            "cluster": {"shard_size": args.shard_size},
            "output": {"dir": str(out / "run")},
        }
    )  # fmt: skip
    t0 = time.perf_counter()
    result = run_audit(cfg, progress=False)
    secs = time.perf_counter() - t0
    from pipeline import RunFolder

    record = RunFolder(result.run_dir).read_record()
    restarts = len(record.actor_restarts) if record is not None else 0
    print(
        json.dumps(
            {"ok": result.ok, "errors": result.errors, "seconds": secs, "restarts": restarts}
        )
    )
    return 0 if result.errors == 0 else 1


def measure(root: Path, work: Path, images: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the audit of ``images`` images in a child process; its tree's memory peaks."""
    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--out", str(work)]
    cmd += ["--images", str(images), "--size", str(args.size), "--window", str(args.window)]
    cmd += ["--shard-size", str(args.shard_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"audit of {images} images failed (exit {proc.returncode})")
    facts = json.loads(stdout.strip().splitlines()[-1])
    return {"images": images, **facts, **sampler.summary(), "samples": sampler.samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images of the small run")
    p.add_argument("--factor", type=int, default=10, help="the large run has factor*n images")
    p.add_argument("--size", type=int, default=64, help="image side, pixels")
    p.add_argument("--window", type=int, default=16, help="window side; stride is half of it")
    p.add_argument("--shard-size", type=int, default=20)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="memscale-") as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, args.n * args.factor, args.size)
        runs = [
            measure(root, Path(tmp) / f"run{m}", m, args) for m in (args.n, args.n * args.factor)
        ]
    small, large = runs
    keys = ("driver", "worker_max", "workers_sum", "ray_system_sum", "tree_sum")
    print(f"{'peak RSS, MiB':<16} {small['images']:>10} {large['images']:>10} {'ratio':>7}")
    for k in keys:
        print(f"{k:<16} {small[k]:>10.1f} {large[k]:>10.1f} {large[k] / max(small[k], 1e-9):>7.3f}")
    print(f"{'seconds':<16} {small['seconds']:>10.1f} {large['seconds']:>10.1f}")
    for r in runs:
        print(
            f"{r['images']} images: busiest worker's peak per quarter of its life (MiB) "
            f"{r['busiest_worker_quarters']}; {r['worker_processes']} worker processes, "
            f"{r['restarts']} actor restart(s)"
        )
    flat = all(large[k] <= 1.1 * small[k] for k in keys)
    print("flat (all within 10%)" if flat else "NOT flat: a peak grew by more than 10%")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "flat": flat}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
