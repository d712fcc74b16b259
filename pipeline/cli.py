"""The ``occlusion-audit`` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.exit_codes import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_USAGE
from pipeline.terminal import printable  # every line printed from the data goes through it

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config.load import load_config
    from pipeline.run.runner import run_audit

    cfg = load_config(args.config, overrides=args.set)
    result = run_audit(cfg, resume=args.resume, progress=not args.quiet)
    done = (
        f"maps: {result.ok} ok, {result.errors} failed of {result.images} images "
        f"in {result.seconds:.1f}s -> {result.run_dir}"
    )
    print(printable(done))
    for f in result.failures[:10]:
        print(printable(f"  error {f['image_id']}: {f['error']}"), file=sys.stderr)
    if not args.no_report:
        _aggregate_and_report(result.run_dir, None)
        if cfg.trend.runs_dir is not None or cfg.notify.webhook is not None:
            from pipeline.report.publish import publish_run

            publish_run(cfg, result.run_dir)
    return result.exit_code


def _aggregate_and_report(run_dir: object, out: str | None) -> None:
    from pipeline.audit.aggregate import aggregate
    from pipeline.report.build import write_report
    from pipeline.run.folder import RunFolder

    folder = RunFolder.of(run_dir)  # aggregate and report share one listing of the shards
    summary = aggregate(folder)
    _print_summary(summary)
    path = write_report(folder, out)
    print(printable(f"report: {path}"))


def _print_summary(summary: object) -> None:
    import pandas as pd

    assert isinstance(summary, pd.DataFrame)
    cols = [c for c in summary.columns if c not in _HIDDEN_COLUMNS]
    # group values are escaped cell by cell, so that one holding a newline keeps its row
    shown = summary[cols].apply(
        lambda col: col.map(lambda v: printable(v) if isinstance(v, str) else v)
    )
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        text = shown.to_string(index=False, float_format=lambda v: f"{v:.3g}")
    print(printable(text, lines=True))


_HIDDEN_COLUMNS = {
    "gmean_ratio_pos",
    "ci_low_pos",
    "ci_high_pos",
    "median_ratio_pos",
    "share_below_1_pos",
    "mean_fg_share_pos",
    "n_nan",
    "p_value",
}


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from pipeline.config.load import load_config
    from pipeline.run.inspect import inspect_audit

    cfg = load_config(args.config, overrides=args.set)
    found = inspect_audit(
        cfg, sample=args.sample, calibrate=args.calibrate, cluster_file=args.cluster
    )
    print(printable(found.text(found.group_by), lines=True))
    if args.json:
        from dataclasses import asdict

        data = asdict(found)
        data["groups"] = [{"group": list(k), "images": n} for k, n in found.groups.items()]
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from pipeline.audit.aggregate import aggregate

    group_by = [g for g in args.group_by.split(",") if g] if args.group_by else None
    summary = aggregate(
        args.run_dir,
        group_by=group_by,
        threshold=args.threshold,
        min_images=args.min_images,
        confidence=args.confidence,
        max_error_share=args.max_error_share,
        fdr=args.fdr,
    )
    _print_summary(summary)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report.build import write_report

    print(printable(f"report: {write_report(args.run_dir, args.out)}"))
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from pipeline.data.manifest import build_manifest

    table = build_manifest(args.image_dir, args.out, masks_dir=args.masks, group_column=args.group)
    print(printable(f"manifest: {table.num_rows} images -> {args.out}"))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo.run import run_demo

    return run_demo(args.out, quick=args.quick)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.mode == "token-drop":
        if args.end_to_end:
            raise ValueError("--mode token-drop times the kernel; leave out --end-to-end")
        from pipeline.bench.tokens import run_token_bench

        return run_token_bench(args)
    if args.end_to_end:
        from pipeline.bench.end_to_end import run_end_to_end

        return run_end_to_end(args)
    from pipeline.bench.main import run_bench

    return run_bench(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="occlusion-audit",
        description="Occlusion-saliency audits of vision models over whole datasets, on Ray.",
    )
    from pipeline import __version__
    from pipeline.kernel import defaults

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="generate the demo data and model, audit it, write the report")
    d.add_argument("--out", default="demo-data", help="folder for data, model and run")
    d.add_argument("--quick", action="store_true", help="a smaller dataset (for smoke tests)")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("run", help="run the batch audit of a config")
    r.add_argument("config", help="audit config (YAML)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set occlusion.stride=[8,8]",
    )
    r.add_argument("--resume", action="store_true", help="skip shards already complete")
    r.add_argument("--no-report", action="store_true", help="stop after the maps")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.set_defaults(func=_cmd_run)

    ins = sub.add_parser(
        "inspect", help="before a long audit: format, counts, foregrounds, bad files, ETA"
    )
    ins.add_argument("config", help="audit config (YAML)")
    ins.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ins.add_argument("--sample", type=int, default=32, help="images decoded to check (32)")
    ins.add_argument("--calibrate", type=int, default=4, help="images timed for the ETA (4)")
    ins.add_argument(
        "--cluster",
        metavar="FILE",
        help="plan the pool and its ETA for this deployment's node types (cluster.yaml, a "
        "KubeRay RayCluster/RayJob/RayCronJob) as a cold cluster",
    )
    ins.add_argument("--json", metavar="FILE", help="also write the findings as JSON")
    ins.set_defaults(func=_cmd_inspect)

    a = sub.add_parser("aggregate", help="recompute summary and flags from stored maps")
    a.add_argument("run_dir")
    a.add_argument("--group-by", help="comma-separated manifest columns (default: the run's)")
    a.add_argument("--threshold", type=float)
    a.add_argument("--min-images", type=int)
    a.add_argument("--confidence", type=float)
    a.add_argument(
        "--max-error-share", type=float, help="more failed images than this share: unreliable"
    )
    a.add_argument(
        "--fdr",
        help="false-discovery rate of the flags (default: the run's audit.fdr, 0.05); "
        "'off': flag by each group's own interval",
    )
    a.set_defaults(func=_cmd_aggregate)

    rep = sub.add_parser("report", help="rebuild the HTML/CSV report of a run")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="report folder (default reports/<run name>)")
    rep.set_defaults(func=_cmd_report)

    m = sub.add_parser("manifest", help="build a manifest from a <group>/<image> folder tree")
    m.add_argument("image_dir")
    m.add_argument("--out", required=True, help="manifest.parquet or manifest.csv")
    m.add_argument("--masks", help="folder of masks with the same relative paths")
    m.add_argument("--group", default="group", help="name of the group column")
    m.set_defaults(func=_cmd_manifest)

    from pipeline.cluster.cli import add_submit_parser

    add_submit_parser(sub)

    from pipeline.report.cli import add_runs_parsers

    add_runs_parsers(sub)

    b = sub.add_parser("bench", help="time our kernel against Captum and the forward roofline")
    b.add_argument(
        "--model",
        default="seed-cnn",
        help="seed-cnn | seed-cnn-gap | small-resnet | resnet50 | vgg-small, or your architecture "
        "with random weights: timm:NAME | torchvision:NAME | transformers:PATH (a folder with "
        "config.json); or a torch.export archive with its weights: export:FILE.pt2",
    )
    b.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="keyword arguments of a timm, torchvision or transformers architecture, e.g. "
        "'{\"img_size\": 64}'",
    )
    b.add_argument("--image-size", type=int, default=224, help="square side, pixels")
    b.add_argument("--window", type=int, default=32)
    b.add_argument("--stride", type=int, default=16)
    b.add_argument(
        "--n-baselines",
        "--k",
        dest="n_baselines",
        type=int,
        default=defaults.default_draws("random-pixel"),
        metavar="K",
        help="random-pixel baselines per image, occlusion.n_baselines (alias --k; default "
        f"{defaults.default_draws('random-pixel')}, a random baseline's)",
    )
    b.add_argument("--images", type=int, default=4, help="images per timed run")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median)")
    b.add_argument("--device", default="cpu", help="cpu | cuda")
    b.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16")
    b.add_argument(
        "--max-batch",
        type=int,
        help="occluded copies per pass, occlusion.max_batch (default as a run: "
        f"{defaults.MAX_BATCH_CPU_FULL} for CPU full passes, else {defaults.MAX_BATCH_OTHER})",
    )
    b.add_argument("--json", help="also write the results here")
    b.add_argument(
        "--end-to-end",
        type=int,
        metavar="N",
        help="time a whole audit of N images against the kernel and a Captum script",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--end-to-end: interleaved rounds; rows report the median (default 1)",
    )
    b.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "generic"),
        help="auto: also time the incremental engine, ours when the model allows it (as a run)",
    )
    b.add_argument(
        "--mode",
        default="fill",
        choices=("fill", "token-drop"),
        help="token-drop: time token-drop occlusion of a ViT against fill with --n-baselines draws "
        "(the two rows alone)",
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="also time the generic kernel with occlusion.compile: true (torch.compile); "
        "with --end-to-end, the run and the kernel compile",
    )
    b.add_argument(
        "--no-captum",
        action="store_true",
        help="leave out Captum (slow on large networks); maps are checked against generic's",
    )
    b.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default heap thresholds (a run's workers tune them: pipeline.run.heap)",
    )
    from pipeline.bench.approximate import add_approx_argument

    add_approx_argument(b)
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``occlusion-audit`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise  # a bug: the traceback is the most useful report
        # Expected failures (bad config, missing files, a locked run, a full disk) get one line.
        print(printable(f"occlusion-audit {args.command}: error: {e}"), file=sys.stderr)
        return code


def _exit_code(e: BaseException) -> int | None:
    from pipeline.run.runner import RunIncompleteError

    if isinstance(e, RunIncompleteError):
        return EXIT_INCOMPLETE
    if isinstance(e, ValueError | OSError | RuntimeError):
        return EXIT_USAGE
    return None


if __name__ == "__main__":
    sys.exit(main())
