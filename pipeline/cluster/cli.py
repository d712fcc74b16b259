"""The ``occlusion-audit submit`` subcommand: its arguments, turned into a :func:`submit` call.

What a submission does (ids, upload, authentication, exit codes) is :mod:`pipeline.cluster.submit`;
this module only reads the command line, loads ``--runtime-env`` and passes ``run``'s own switches
on.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from pipeline.cluster import submit as core
from pipeline.cluster.submit import SCHEDULE_TIME_ENV, parse_schedule_time

__all__ = ["add_submit_parser", "run_submit"]

_RUN_FLAGS = ("--resume", "--no-report", "--quiet")  # `run` switches that `submit` passes on


def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``submit`` to the CLI's subparsers; it dispatches through ``func=run_submit``."""
    p = subparsers.add_parser(
        "submit",
        help="submit the audit of a config to a Ray cluster as a Ray job",
        description=(
            "Run `occlusion-audit run CONFIG` on a Ray cluster as a Ray job. A scheduled run "
            f"(--schedule-time or ${SCHEDULE_TIME_ENV}) gets the id occlusion-audit-<name>-"
            "<YYYYMMDD>-<HHMM> (UTC); Ray refuses a second job with that id (exit 3)."
        ),
    )
    p.add_argument("config", help="audit config (YAML), inside the working dir")
    p.add_argument("--address", help="Ray dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="stream logs; exit 0 only if it succeeds")
    p.add_argument("--submission-id", help="job id (default: from --schedule-time)")
    p.add_argument(
        "--schedule-time",
        help=f"scheduled time: ISO 8601 or a CronJob's Job name (default: ${SCHEDULE_TIME_ENV})",
    )
    p.add_argument("--working-dir", help="folder to upload (default: the current directory)")
    p.add_argument("--runtime-env", metavar="YAML", help="e.g. jobs/runtime_env.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to run")
    for flag in _RUN_FLAGS:
        p.add_argument(flag, action="store_true", help="passed to run")
    p.set_defaults(func=run_submit)
    return p


def run_submit(args: argparse.Namespace) -> int:
    """The ``submit`` subcommand: turn parsed arguments into a :func:`submit` call."""
    runtime_env = None
    if args.runtime_env:
        with open(args.runtime_env, encoding="utf-8") as f:
            runtime_env = yaml.safe_load(f) or {}
        if not isinstance(runtime_env, dict):
            raise ValueError(f"runtime env {args.runtime_env!r} must be a YAML mapping")
    extra = [a for s in args.set for a in ("--set", s)]
    extra += [flag for flag in _RUN_FLAGS if getattr(args, flag[2:].replace("-", "_"))]
    # looked up at call time: replacing pipeline.cluster.submit.submit takes effect
    return core.submit(
        args.config,
        args.address,
        wait=args.wait,
        submission_id=args.submission_id,
        schedule_time=parse_schedule_time(args.schedule_time) if args.schedule_time else None,
        working_dir=args.working_dir,
        runtime_env=runtime_env,
        extra_args=extra,
    )
