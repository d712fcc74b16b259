"""The report, compare and history pages at N and 10N groups: time and size grow at most linearly.

For each size this builds, in a fresh child process, three nights of a validation set of N
classes of 3 small images each (32x32 after resize, an 8x8 window with stride 4, so every
image's ratio differs; background swaps and strategies filled in): the hand-built runs of the
tests (``tests/_manygroups.py``), no Ray and no model. The child then times, after its imports,
``aggregate`` of night 2, ``write_report`` of night 2, ``compare_runs`` + ``write_comparison`` of
nights 1 and 2, and ``run_history`` + ``write_history`` of the three nights (each step's wall
and CPU seconds), and measures what they wrote: ``index.html``, the whole report folder (pages,
figures, CSVs) and its file count, ``compare.html`` and ``history.html``.

Each measure of the larger size over the smaller's must be at most the size ratio (x 1.2 for
noise): linear or better. Time on a shared machine is noisy; the CPU seconds are steadier.

Usage:
    python benchmarks/report_scaling.py [--sizes 100 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLACK = 1.2  # a measure may grow by the size ratio times this and still count as linear

_CHILD = r"""
import json, sys, time
from pathlib import Path
from pipeline.audit.aggregate import aggregate
from pipeline.audit.compare import compare_runs
from pipeline.audit.history import find_runs, run_history
from pipeline.report.build import write_report
from pipeline.report.compare_page import write_comparison
from pipeline.report.history_page import write_history
from tests._manygroups import write_many_groups

n, root = int(sys.argv[1]), Path(sys.argv[2])
out = {"groups": n, "images": 3 * n}

def timed(name, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    out[name + "_s"] = round(time.perf_counter() - wall, 2)
    out[name + "_cpu_s"] = round(time.process_time() - cpu, 2)
    return value

def size(path):
    files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [path]
    return sum(p.stat().st_size for p in files), len(files)

change = {**{k: 0.15 for k in range(7, n, 50)}, **{k: 8.0 for k in range(1, n, 50)}}
runs = root / "runs"
def build():
    for day, (name, moved) in enumerate((("night-1", None), ("night-2", change),
                                         ("night-3", change)), start=1):
        write_many_groups(runs / name, n, change=moved, images=root / "data",
                          started_at=f"2026-12-0{day}T02:00:00+00:00")
timed("fixture", build)
timed("aggregate", lambda: aggregate(runs / "night-2"))
index = timed("report", lambda: write_report(runs / "night-2", root / "report"))
out["index_bytes"] = index.stat().st_size
out["report_bytes"], out["report_files"] = size(root / "report")
c = timed("compare", lambda: write_comparison(compare_runs(runs / "night-1", runs / "night-2"),
                                              root / "compare"))
out["compare_bytes"] = (root / "compare" / "compare.html").stat().st_size
timed("history", lambda: write_history(run_history(find_runs([runs])), root / "history"))
out["history_bytes"] = (root / "history" / "history.html").stat().st_size
print(json.dumps(out))
"""

#: (key, what it is, unit) of the measures that must grow at most linearly
MEASURES = (
    ("report_s", "report, wall", "s"),
    ("report_cpu_s", "report, CPU", "s"),
    ("index_bytes", "index.html", "MB"),
    ("report_bytes", "report folder", "MB"),
    ("report_files", "report files", ""),
    ("compare_s", "compare, wall", "s"),
    ("compare_bytes", "compare.html", "MB"),
    ("history_s", "history, wall", "s"),
    ("history_bytes", "history.html", "MB"),
)
#: shown for reference, not judged: the statistics the pages start from (the first step of the
#: child, so it also pays for warming up pyarrow and pandas)
REFERENCE = (("aggregate_s", "aggregate, wall", "s"),)


def measure(groups: int) -> dict:
    """One size in a fresh child process, its files in a temporary folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(groups), tmp],
            capture_output=True, text=True, env=env, cwd=REPO, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{groups} groups failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shown(value: float, unit: str) -> str:
    return f"{value / 1e6:.2f} MB" if unit == "MB" else f"{value:g}{' ' + unit if unit else ''}"


def lines(rows: list[dict]) -> list[str]:
    """The table of both sizes and, per measure, its growth and whether it is linear."""
    a, b = rows[0], rows[-1]
    factor = b["groups"] / a["groups"]
    out = [f"{'measure':<18}{a['groups']:>12,} groups{b['groups']:>12,} groups   growth"]
    for key, what, unit in (*MEASURES, *REFERENCE):
        ratio = b[key] / a[key] if a[key] else float("inf")
        judged = (key, what, unit) in MEASURES
        linear = ("yes" if ratio <= factor * SLACK else "NO") if judged else "not judged"
        out.append(
            f"{what:<18}{_shown(a[key], unit):>19}{_shown(b[key], unit):>19}   "
            f"x{ratio:.1f} (linear: {linear})"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="groups")
    p.add_argument("--json", type=Path, help="write the rows and the machine facts here")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    rows = [measure(n) for n in args.sizes]
    facts = {
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for line in lines(rows):
        print(line)
    print(f"machine: {facts['cpus']} CPUs; load average {facts['load_average_before'][0]} "
          f"before, {facts['load_average_after'][0]} after")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": facts}, indent=2) + "\n")
    failed = any("linear: NO" in line for line in lines(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
