"""Charts across runs: a dumbbell per group (run A to run B) and each group's trend over runs.

Built on ``matplotlib.figure.Figure`` directly (no pyplot state), returned as PNG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from pipeline.report.figures import STATUS_COLORS, drawn, fmt_threshold, png_bytes, set_log_x

__all__ = ["VERDICT_COLORS", "dumbbell_chart", "trend_chart"]

VERDICT_COLORS = {
    "new-flag": "#c0392b",
    "regressed": "#d68910",
    "cleared": "#1e8449",
    "improved": "#148f77",
    "unchanged": "#7f8c8d",
}


def dumbbell_chart(
    labels: Sequence[str],
    ratio_a: Sequence[float],
    ratio_b: Sequence[float],
    verdicts: Sequence[str],
    threshold: float,
) -> bytes:
    """Each group's geometric-mean ratio in run A (open circle) and run B (dot), log scale.

    Args:
        labels: group names, top to bottom.
        ratio_a, ratio_b: geometric-mean fg/bg ratios (NaN: the group is missing in that run).
        verdicts: per group, picks the colour (``VERDICT_COLORS``).
        threshold: drawn as a dashed line.

    Returns:
        PNG bytes.
    """
    n = len(labels)
    fig = Figure(figsize=(7.5, 1.3 + 0.32 * max(n, 1)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    for yi, a, b, v in zip(y, ratio_a, ratio_b, verdicts, strict=True):
        color = VERDICT_COLORS.get(v, "#333333")
        if math.isfinite(a) and math.isfinite(b):
            ax.plot([a, b], [yi, yi], color=color, linewidth=2)
        if math.isfinite(a):
            ax.plot([a], [yi], "o", markerfacecolor="white", color=color, markersize=7)
        if math.isfinite(b):
            ax.plot([b], [yi], "o", color=color, markersize=7)
    ax.axvline(threshold, color="#222222", linestyle="--", linewidth=1)
    set_log_x(ax)
    ax.set_yticks(y, drawn(labels))
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(
        "geometric-mean fg/bg ratio: run A (open) to run B (filled)\n"
        f"(log scale; dashed line: threshold {fmt_threshold(threshold)})"
    )
    ax.grid(axis="x", which="both", alpha=0.25)
    handles = [Line2D([], [], color=c, linewidth=2, label=v) for v, c in VERDICT_COLORS.items()]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=5,
              fontsize=8, frameon=False)  # fmt: skip
    return png_bytes(fig)


def trend_chart(
    runs: Sequence[str],
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[str]]],
    threshold: float,
) -> bytes:
    """One line per group over the runs: geometric mean with its interval, dots by verdict.

    Args:
        runs: run names, oldest first (the x axis).
        series: group label -> (gmean, ci_low, ci_high, status) per run (NaN where absent).
        threshold: drawn as a dashed line.

    Returns:
        PNG bytes.
    """
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(runs))
    for label, (g, lo, hi, status) in series.items():
        g, lo, hi = (np.asarray(v, dtype=float) for v in (g, lo, hi))
        (line,) = ax.plot(x, g, linewidth=1.5, label=drawn([label])[0])
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
        for xi, gi, s in zip(x, g, status, strict=True):
            if math.isfinite(gi):
                ax.plot([xi], [gi], "o", markersize=6, color=STATUS_COLORS.get(s, "#333333"))
    ax.axhline(threshold, color="#222222", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(x, drawn(runs), rotation=30, ha="right")
    ax.set_ylabel("geometric-mean fg/bg ratio (log scale)")
    ax.set_title("dots: the group's verdict in that run; bands: bootstrap intervals", fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.25)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return png_bytes(fig)
