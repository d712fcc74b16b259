"""The pipeline's own cost per image, with its run folder in a bucket: N tiny images, 1 window.

Writes N random 8x8 PNG images into one `datasets`-style Parquet file (Image column, bytes
inside), then, in a fresh child process, starts a moto S3 server on loopback and runs a real
audit (`run_audit` on the embedded
Ray, one window per image, K=1, a one-layer model, counterfactuals off) with `output.dir` in the
bucket. Each size runs in a fresh child process, so its peak RSS is the driver's own. Reports:

- wall seconds, and images/s once the actors had started (run.json `timings.images_per_s`);
- ms/image of pipeline overhead: the workers' time minus the model's (`phases_s` without
  `kernel_s`), per image, and the whole run's wall time per image;
- the driver's peak RSS (the child's ``VmHWM``: ``ru_maxrss`` would keep the forking parent's
  peak across ``exec``), to compare between sizes, and the peak at the run's steps;
- object-store requests per shard (moto's server runs as its own process, as a store would, and
  logs one line per request).

Usage:
    python benchmarks/bucket_scale.py [--sizes 20000 200000] [--shard-size 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _summary import flat_line  # benchmarks/ is on sys.path when run as a script

_CHILD = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
from pipeline import load_config, run_audit
from pipeline.run.folder import RunFolder
import pipeline.run.runner as runner

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
marks = {}
def marked(name, fn):
    def call(*a, **k):
        marks[f"before_{name}"] = hwm_mb()
        out = fn(*a, **k)
        marks[f"after_{name}"] = hwm_mb()
        return out
    return call
runner.run_pool = marked("pool", runner.run_pool)
runner._stored = marked("stored", runner._stored)

# the data and the S3 server live in the parent: this process's peak RSS is the driver's alone
n, shard, tmp, run = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
cfg = load_config({
    "name": "scale",
    "dataset": {"manifest": str(tmp / "images.parquet"), "group_by": ["group"],
                "image_size": [8, 8]},
    "model": {"factory": "pipeline.bench.nets:Tiny", "weights": str(tmp / "w.pt"),
              "task": "regression"},
    "occlusion": {"window": [8, 8], "stride": [8, 8], "baseline": "zero"},
    "counterfactual": {"enabled": False},
    "cluster": {"shard_size": shard},
    "output": {"dir": run},
})
t0 = time.perf_counter()
res = run_audit(cfg, progress=False)
wall = time.perf_counter() - t0
rec = RunFolder(run).read_record()
phases = dict(rec.timings.get("phases_s", {}))
work = sum(phases.values())
print(json.dumps({
    "images": n, "ok": res.ok, "shards": rec.shards, "wall_s": round(wall, 1),
    "startup_s": rec.timings.get("startup_s"),
    "images_per_s": rec.timings.get("images_per_s"),
    "overhead_ms_per_image": round(1000 * (work - phases.get("kernel_s", 0.0)) / n, 3),
    "model_ms_per_image": round(1000 * phases.get("kernel_s", 0.0) / n, 3),
    "wall_ms_per_image": round(1000 * wall / n, 3),
    "phases_s": phases,
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
    "driver_peak_rss_mb": round(hwm_mb(), 1),
    "driver_hwm_mb": {k: round(v, 1) for k, v in marks.items()},
}))
"""


def write_images(tmp: Path, n: int) -> None:
    """``images.parquet`` (``datasets`` layout, Image column with PNG bytes) and ``w.pt``."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from pipeline.bench.nets import Tiny

    rng = np.random.default_rng(0)
    buf = []
    for _ in range(n):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(b, format="PNG")
        buf.append({"bytes": b.getvalue(), "path": None})
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {
        "image_id": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "group": {"dtype": "string", "_type": "Value"},
    }
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.table(
        {
            "image_id": [f"i{i:07d}" for i in range(n)],
            "image": pa.array(buf, img_type),
            "group": [str(i % 8) for i in range(n)],
        }
    ).replace_schema_metadata(meta)
    pq.write_table(table, tmp / "images.parquet", row_group_size=4096)
    del buf, table
    torch.manual_seed(0)
    torch.save(Tiny().state_dict(), tmp / "w.pt")


@contextlib.contextmanager
def _moto(log: Path) -> Iterator[tuple[str, Path]]:
    """moto's S3 server in its own process (as a real store is), logging one line per request."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(100):  # wait until it answers
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait()


def _requests(log: Path) -> int:
    """Requests the server has logged so far."""
    methods = ('"GET ', '"PUT ', '"POST ', '"HEAD ', '"DELETE ')
    return sum(1 for line in log.read_text().splitlines() if any(m in line for m in methods))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    rows = []
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as logs, _moto(Path(logs) / "s3.log") as (endpoint, log):
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        s3.create_bucket(Bucket="scale-bench")
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as tmp:
                write_images(Path(tmp), n)
                before = _requests(log)
                run = f"s3://scale-bench/run-{n}"
                argv_child = [sys.executable, "-c", _CHILD, str(n), str(args.shard_size), tmp, run]
                out = subprocess.run(argv_child, capture_output=True, text=True, cwd=root, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["requests"] = _requests(log) - before
            row["requests_per_shard"] = round(row["requests"] / row["shards"], 2)
            rows.append(row)
            print(json.dumps(row))
    if len(rows) >= 2:
        print(flat_line(rows, "images", "driver_peak_rss_mb", "driver peak RSS, images"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
