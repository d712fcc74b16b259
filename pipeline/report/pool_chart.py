"""The run's actor timeline: when each actor of the pool was up, on which node and device, and
how many shards it computed (``run.json`` ``actors``; docs/design.md, "Distribution").

Built on ``matplotlib.figure.Figure`` directly (no pyplot state), returned as PNG bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.report.figures import png_bytes
from pipeline.report.html import Chart

__all__ = ["pool_section", "timeline_chart"]

DEVICE_COLORS = {"cuda": "#1f77b4", "cpu": "#7f7f7f"}
_END_COLORS = {"released": "#222222", "preempted": "#c0392b"}  # the bar's right edge


def timeline_chart(entries: Sequence[Mapping[str, Any]], end_s: float | None = None) -> bytes:
    """One row per actor of the pool, one bar per time it was up.

    Args:
        entries: ``run.json`` ``actors``: ``actor``, ``up_s``, ``down_s`` (None: still up at
            ``end_s``), ``device``, ``node_id``, ``shards``, ``end``.
        end_s: seconds after the pool's creation where open bars end (default: the latest
            ``down_s`` or ``up_s``).

    Returns:
        PNG bytes.
    """
    rows = sorted({int(e["actor"]) for e in entries})
    times = [float(t) for e in entries for t in (e.get("up_s"), e.get("down_s")) if t is not None]
    end = end_s if end_s is not None else max(times, default=1.0)
    fig = Figure(figsize=(8.0, 1.4 + 0.35 * max(len(rows), 1)), layout="constrained")
    ax = fig.add_subplot()
    for e in entries:
        y = rows.index(int(e["actor"]))
        up = float(e.get("up_s") or 0.0)
        down = float(e["down_s"]) if e.get("down_s") is not None else end
        device = "cuda" if e.get("gpu_ids") else "cpu"
        ax.barh(y, max(down - up, end * 0.003), left=up, height=0.6,
                color=DEVICE_COLORS[device], alpha=0.85)  # fmt: skip
        ending = str(e.get("end") or "")
        edge = _END_COLORS.get(ending, "#d68910" if ending.startswith("lost") else None)
        if edge is not None and ending != "released":
            ax.plot([down, down], [y - 0.35, y + 0.35], color=edge, linewidth=2.5)
        node = str(e.get("node_id") or "?")[-6:]
        ax.text(up + (down - up) / 2, y, f"{e.get('shards', 0)} shards · node …{node}",
                ha="center", va="center", fontsize=7, color="white")  # fmt: skip
    ax.set_yticks(range(len(rows)), [f"actor {r}" for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, end * 1.02)
    ax.set_xlabel("seconds after the pool's actors were created")
    ax.grid(axis="x", alpha=0.25)
    handles = [
        Patch(color=DEVICE_COLORS["cuda"], label="GPU actor"),
        Patch(color=DEVICE_COLORS["cpu"], label="CPU actor"),
        Patch(color=_END_COLORS["preempted"], label="preempted"),
        Patch(color="#d68910", label="lost"),
    ]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=4,
              fontsize=8, frameon=False)  # fmt: skip
    return png_bytes(fig)


def pool_section(record: Any) -> Chart | None:
    """The timeline chart of a finished or stopped run's record (None: no actor was up)."""
    entries = list(getattr(record, "actors", None) or [])
    if not entries or not all("up_s" in e and "actor" in e for e in entries):
        return None  # a record written before the pool kept a timeline
    pool = dict(getattr(record, "pool", None) or {})
    gpu = sum(int(e.get("shards", 0)) for e in entries if e.get("gpu_ids"))
    total = sum(int(e.get("shards", 0)) for e in entries)
    caption = (
        f"The pool asked for up to {pool.get('actors', '?')} {pool.get('device', '')} actor(s) "
        f"({pool.get('why', 'no reason recorded')}); {len({e['actor'] for e in entries})} came "
        f"up. {gpu} of {total} shard(s) were computed on GPU actors. A bar ends where its "
        "actor went away: at the end of the run, or when its node was lost."
    )
    return Chart("Actor timeline", timeline_chart(entries), caption)
