"""Planning a run over a large manifest: time and driver peak RSS, 100,000 against 1,000,000 rows.

For each size this writes a Parquet manifest (id, path, mask path, one of 50 groups, label) and
then, in a fresh child process that imports what a run's driver imports, opens the source and
makes the driver's one streaming pass (``plan_source``) with the counterfactual bank planner
attached, exactly as ``run_audit`` does before starting Ray. The child reports the planning
seconds, its RSS after the imports, and its peak RSS (``VmHWM``). The driver holds no Python
object per image, only 8 bytes of id hash per image, so the peak should stay flat within 20%.

Usage:
    python benchmarks/manifest_scaling.py [--sizes 100000 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _summary import flat_line  # benchmarks/ is on sys.path when run as a script

_CHILD = r"""
import json, sys, time
from pathlib import Path
import pipeline.run.runner  # noqa: F401 - what a driver imports
from pipeline import load_config
from pipeline.data.detect import open_source
from pipeline.data.plan import plan_source
from pipeline.run.bank import BankPlanner

def rss_mb(key="VmRSS:"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
def hwm_mb():
    return rss_mb("VmHWM:")
base = rss_mb()
manifest = sys.argv[1]
cfg = load_config({"dataset": {"manifest": manifest, "group_by": ["group"]},
                   "model": {"factory": "pipeline.models:SeedCNN"}})
t0 = time.perf_counter()
source = open_source(cfg.dataset)
planner = BankPlanner(cfg)
plan = plan_source(source, int(cfg.cluster.shard_size), planner.add)
plan_s = time.perf_counter() - t0
banks = planner.finish(source)
print(json.dumps({
    "rows": plan.images, "shards": len(plan.shards), "groups": len(plan.groups),
    "bank_images": len(banks.flat), "plan_s": round(plan_s, 2),
    "total_s": round(time.perf_counter() - t0, 2), "rss_after_imports_mb": round(base, 1),
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
    "peak_rss_mb": round(hwm_mb(), 1),
}))
"""


def write_manifest(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    idx = pa.array(range(rows), pa.int64())
    ids = pc.binary_join_element_wise("img", pc.cast(idx, pa.string()), "")
    table = pa.table(
        {
            "image_id": ids,
            "path": pc.binary_join_element_wise("images/", ids, ".jpg", ""),
            "mask_path": pc.binary_join_element_wise("masks/", ids, ".png", ""),
            "group": pc.cast(pc.bit_wise_and(idx, 31), pa.string()),
            "label": pc.cast(pc.bit_wise_and(idx, 1), pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=65536)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"m{n}.parquet"
            write_manifest(path, n)
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(json.dumps(row))
    if len(results) >= 2:
        a, b = results[0], results[-1]
        flat = flat_line(results, "rows", "peak_rss_mb", "peak RSS, rows")
        print(f"{flat}; plan time {a['plan_s']} s -> {b['plan_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
