"""The ``compare``, ``history``, ``discover`` and ``export`` subcommands: runs against runs, the
strategies inside a run, and a run's results for other tools."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.exit_codes import EXIT_FAILED
from pipeline.terminal import printable

__all__ = ["add_runs_parsers"]

# exit status of `compare --fail-on` when a listed verdict occurs


def _verdicts(text: str) -> tuple[str, ...]:
    from pipeline.audit.compare import VERDICTS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VERDICTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown verdict(s) {unknown}; choose from {VERDICTS}")
    return names


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.audit.compare import compare_runs
    from pipeline.report.compare_page import write_comparison

    c = compare_runs(
        args.run_a,
        args.run_b,
        group_by=[g for g in args.group_by.split(",") if g] if args.group_by else None,
        force=args.force,
        min_change=args.min_change,
    )
    out = write_comparison(c, args.out)
    counts = c.summary["counts"]
    tally = ", ".join(f"{n} {v}" for v, n in counts.items())
    print(printable(f"{tally} -> {out / 'compare.html'}"))
    for verdict in ("new-flag", "regressed", "cleared", "improved"):
        for label in c.summary["groups"][verdict]:
            print(printable(f"  {verdict:<10} {label}"))
    hits = [v for v in args.fail_on if counts.get(v)]
    if hits:
        print(f"compare: failing on {', '.join(hits)} (--fail-on)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from pipeline.audit.history import find_runs, run_history
    from pipeline.report.history_page import write_history

    runs = find_runs(args.runs)
    history = run_history(runs)
    out = write_history(history, args.out or _default_out(args.runs))
    print(printable(f"history of {len(runs)} runs -> {out / 'history.html'}"))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from pipeline.audit.strategies import discover

    clusters: int | str = "auto" if args.clusters == "auto" else int(args.clusters)
    group_by = [g for g in args.group_by.split(",") if g] if args.group_by else ["label"]
    table = discover(args.run_dir, group_by, clusters, seed=args.seed)
    marked = table[table["fixed_place"] | table["off_object"]] if len(table) else table
    groups = len(table[group_by].drop_duplicates()) if len(table) else 0
    written = f"{args.run_dir}/strategies.parquet"
    print(printable(f"{len(table)} strategies in {groups} groups -> {written}"))
    for _, r in marked.iterrows():
        where = ", ".join(f"{g}={r[g]}" for g in group_by)
        kind = "fixed place" if r["fixed_place"] else "off the object"
        line = (f"  {where} cluster {r['cluster']}: {r['n']} images ({r['share']:.0%}), {kind} "
                f"at cell ({r['peak_row']}, {r['peak_col']})")  # fmt: skip
        print(printable(line))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.report.export import export_run

    written = export_run(args.run_dir, args.to, args.out, dataset_name=args.dataset)
    print(printable(f"export: {written}"))
    return 0


def _default_out(runs: list[str]) -> str:
    from pathlib import Path

    first = Path(runs[0])
    # one folder of runs: its history goes beside them; a list of runs: in the newest
    return str(first / "history") if len(runs) == 1 else str(Path(runs[-1]) / "history")


def add_runs_parsers(sub: Any) -> None:
    """Add ``compare`` and ``history`` to the ``occlusion-audit`` subcommands."""
    c = sub.add_parser("compare", help="compare run B with run A group by group")
    c.add_argument("run_a", help="the reference run (last night, model v1)")
    c.add_argument("run_b", help="the run to judge (tonight, model v2)")
    c.add_argument("--out", help="output folder (default RUN_B/compare)")
    c.add_argument("--group-by", help="comma-separated group columns (default: run A's)")
    c.add_argument(
        "--fail-on",
        type=_verdicts,
        default=(),
        metavar="VERDICTS",
        help="exit 1 when a group gets one of these verdicts, e.g. new-flag,regressed",
    )
    c.add_argument("--min-change", type=float, default=1.5, help="smallest reported change")
    c.add_argument("--force", action="store_true", help="compare runs with other map settings")
    c.set_defaults(func=_cmd_compare)

    h = sub.add_parser("history", help="trend of each group's ratio over many runs")
    h.add_argument("runs", nargs="+", help="run folders, or one folder that holds run folders")
    h.add_argument("--out", help="output folder (default: FOLDER/history or the newest run's)")
    h.set_defaults(func=_cmd_history)

    d = sub.add_parser("discover", help="cluster each group's maps into strategies (SpRAy)")
    d.add_argument("run_dir")
    d.add_argument("--group-by", help="comma-separated group columns (default: label)")
    d.add_argument("--clusters", default="auto", help="auto (eigengap) or a number per group")
    d.add_argument("--seed", type=int, default=0, help="k-means seed")
    d.set_defaults(func=_cmd_discover)

    e = sub.add_parser("export", help="per-image results for FiftyOne or any other tool")
    e.add_argument("run_dir")
    e.add_argument("--to", required=True, choices=("fiftyone", "csv", "parquet"))
    e.add_argument("--out", help="file for csv/parquet (default RUN_DIR/export.<to>)")
    e.add_argument("--dataset", help="FiftyOne dataset name (default occlusion-audit-<run>)")
    e.set_defaults(func=_cmd_export)
