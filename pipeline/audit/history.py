"""Many runs of one audit over time: each group's ratio and verdict, run by run.

Runs are ordered by their start time (``run.json``); each run's summary is recomputed from its
stored maps with its own audit settings, so old runs read with today's statistics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from pipeline.audit.aggregate import aggregate
from pipeline.run.folder import RunFolder
from pipeline.storage.paths import base_name
from pipeline.storage.store import Store

__all__ = ["History", "find_runs", "run_history"]


@dataclass
class History:
    """Per run and group: ``run``, ``started_at``, group columns, ``n_valid``, ``gmean_ratio``,
    ``ci_low``, ``ci_high``, ``q_value``, ``status``; runs oldest first."""

    table: pd.DataFrame
    runs: list[str]
    group_by: tuple[str, ...]
    threshold: float
    class_names: Mapping[str, str] = field(default_factory=dict)  # the newest run's, by label


def _is_run(path: str) -> bool:
    folder = RunFolder(path)
    return folder.has_record() and bool(folder.shard_names())


def _children(folder: str) -> list[str]:
    """Folders directly under ``folder`` (local or a bucket prefix) that hold a ``run.json``."""
    store = Store(folder)
    tops = {n.split("/", 1)[0] for n in store.list("", "run.json", recursive=True) if "/" in n}
    return sorted(store.uri(t) for t in tops)


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Run folders among ``paths``: each path is a run folder, or a folder holding run folders.

    Returns:
        The finished runs, oldest first (by ``started_at``, then by path).

    Raises:
        FileNotFoundError: no run folder was found.
    """
    found: list[str] = []
    for p in (str(p) for p in paths):
        found += [p] if _is_run(p) else [c for c in _children(p) if _is_run(c)]
    records = [(RunFolder(p).read_record(), p) for p in found]
    runs = [(r.started_at or "", str(p)) for r, p in records if r and r.status == "finished"]
    if not runs:
        raise FileNotFoundError(f"no finished run folders in {[str(p) for p in paths]}")
    return [p for _, p in sorted(runs)]


def run_history(runs: Sequence[str]) -> History:
    """The per-group statistics of every run (group columns from the newest run)."""
    newest = RunFolder(runs[-1]).read_record()
    group_by = tuple(newest.config.dataset.group_by) if newest is not None else ()
    frames = []
    for run in runs:
        record = RunFolder(run).read_record()
        summary = aggregate(run, group_by=group_by or None, write=False)
        summary.insert(0, "run", base_name(run))
        summary.insert(1, "started_at", record.started_at if record else None)
        frames.append(summary)
    keep = ["run", "started_at", *group_by, "n_valid", "gmean_ratio", "ci_low", "ci_high",
            "q_value", "status"]  # fmt: skip
    table = pd.concat(frames, ignore_index=True)[keep]
    threshold = newest.config.audit.threshold if newest is not None else 1.0
    names = dict(newest.class_names) if newest is not None else {}
    return History(table, [base_name(r) for r in runs], group_by, threshold, names)
