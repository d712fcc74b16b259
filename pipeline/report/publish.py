"""After a run: compare it with the previous run, rebuild the history, tell a webhook.

What a scheduled job does once its maps and report are written (``trend`` and ``notify`` config
sections). The webhook receives one JSON document by HTTP POST: the run, its counts, its flagged
groups and, when there is a previous run, the comparison's new flags and regressions. A webhook
that fails is reported on stderr; it never changes the run's exit code.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import AuditConfig
from pipeline.report.outdir import join
from pipeline.storage.paths import is_uri
from pipeline.terminal import printable

__all__ = ["post_json", "publish_run", "run_summary"]


def _previous(runs: list[str], run_dir: Any) -> str | None:
    """The newest of ``runs`` (oldest first) other than ``run_dir``."""
    earlier = [r for r in runs if _same(r, run_dir) is False]
    return earlier[-1] if earlier else None


def _same(a: Any, b: Any) -> bool:
    """Whether two run folders (paths or URIs) are the same one."""
    if is_uri(str(a)) or is_uri(str(b)):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def run_summary(cfg: AuditConfig, run_dir: Path) -> dict[str, Any]:
    """The JSON summary of a finished run: name, folders, counts, flagged groups."""
    from pipeline.audit.aggregate import read_summary
    from pipeline.audit.compare import group_label
    from pipeline.run.folder import RunFolder

    record = RunFolder(run_dir).read_record()
    summary = read_summary(run_dir)
    group_by = tuple(cfg.dataset.group_by)
    flagged = summary[summary["status"] == "flagged"]
    return {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "report_dir": str(cfg.output.report_dir),
        "status": None if record is None else record.status,
        "counts": None if record is None else vars(record.counts),
        "flagged": [group_label(r, group_by) for _, r in flagged.iterrows()],
    }


def publish_run(cfg: AuditConfig, run_dir: Path) -> dict[str, Any]:
    """Compare with the previous run and rebuild the history (``trend.runs_dir``), then post
    the summary to ``notify.webhook``; return the summary."""
    from pipeline.audit.compare import CompareError, compare_runs
    from pipeline.audit.history import find_runs, run_history
    from pipeline.report.compare_page import write_comparison
    from pipeline.report.history_page import write_history

    doc = run_summary(cfg, run_dir)
    report_dir = str(cfg.output.report_dir)
    if cfg.trend.runs_dir is not None:
        runs = find_runs([cfg.trend.runs_dir])  # one listing serves the compare and the history
        previous = _previous(runs, run_dir)
        if previous is not None:
            try:
                c = compare_runs(previous, run_dir)
                out = write_comparison(c, join(report_dir, "compare"))
                doc["compare"] = {
                    "previous": previous,
                    "page": join(out, "compare.html"),
                    "new_flags": c.summary["groups"]["new-flag"],
                    "regressions": c.summary["groups"]["regressed"],
                    "cleared": c.summary["groups"]["cleared"],
                    "counts": c.summary["counts"],
                }
                print(printable(f"compare with {previous}: {c.summary['counts']}"))
            except CompareError as e:  # another occlusion setting: say so, chart the rest
                doc["compare"] = {"previous": previous, "refused": str(e)}
                print(printable(f"compare with {previous} refused: {e}"), file=sys.stderr)
        out = write_history(run_history(runs), join(report_dir, "history"))
        doc["history"] = {"runs": len(runs), "page": join(out, "history.html")}
        print(printable(f"history: {len(runs)} runs -> {join(out, 'history.html')}"))
    if cfg.notify.webhook is not None:
        post_json(cfg.notify.webhook, doc, cfg.notify.timeout_s)
    return doc


def post_json(url: str, doc: dict[str, Any], timeout_s: float) -> bool:
    """POST ``doc`` as JSON to ``url``; report a failure on stderr and return False."""
    request = urllib.request.Request(
        url,
        data=json.dumps(doc, default=str).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": "occlusion-audit"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
        return True
    except (urllib.error.URLError, OSError) as e:
        print(printable(f"notify: POST to {url} failed: {e}"), file=sys.stderr)
        return False
