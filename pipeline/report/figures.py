"""Report figures as PNG bytes, drawn with matplotlib's object API (no pyplot global state).

Every function returns PNG bytes. The charts take plain arrays and labels; images and maps are
drawn by :mod:`pipeline.report.assets`. Choosing what to show belongs to
:mod:`pipeline.report.build`, writing HTML to :mod:`pipeline.report.html`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pipeline.terminal import printable

__all__ = [
    "HIST_EDGES",
    "STATUS_COLORS",
    "distribution_chart",
    "drawn",
    "fmt_threshold",
    "png_bytes",
    "ratio_chart",
    "set_log_x",
]

#: Colour of each group status, shared by the charts and the HTML.
STATUS_COLORS = {
    "flagged": "#c0392b",
    "inconclusive": "#d68910",
    "ok": "#1e8449",
    "too-few": "#7f8c8d",
    "unreliable": "#7d3c98",
}
#: log10 bin edges of per-image fg/bg ratios, 0.01 to 100; values beyond go to the end bins.
HIST_EDGES = np.linspace(-2.0, 2.0, 65)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # attach an Agg canvas explicitly: no backend lookup, no GUI
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def drawn(labels: Sequence[str]) -> list[str]:
    """Labels from the data as a figure draws them: control characters have no glyph, and
    matplotlib's warning about each would quote it raw on the terminal (``printable``)."""
    return [printable(s) for s in labels]


def fmt_threshold(t: float) -> str:
    """A threshold as people write it: ``1.0``, ``0.8``, ``0.125``."""
    return f"{t:.1f}" if round(t, 1) == t else f"{t:g}"


def set_log_x(ax: Axes) -> None:
    """Logarithmic x axis labelled 0.5, 1, 2 rather than 5x10^-1."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def ratio_chart(
    labels: Sequence[str],
    gmean: Sequence[float],
    ci_low: Sequence[float],
    ci_high: Sequence[float],
    statuses: Sequence[str],
    threshold: float,
    confidence: float,
) -> bytes:
    """Forest plot: each group's geometric-mean fg/bg ratio with its interval, log scale.

    Args:
        labels: group names, drawn top to bottom in the given order.
        gmean: geometric-mean ratios (unitless; NaN groups are listed but not drawn).
        ci_low: lower interval bounds.
        ci_high: upper interval bounds.
        statuses: group statuses, which pick the colours (``STATUS_COLORS``).
        threshold: ratio below which a group is flagged, drawn as a dashed line.
        confidence: interval coverage, for the axis label (e.g. 0.95).

    Returns:
        PNG bytes.
    """
    n = len(labels)
    fig = Figure(figsize=(7.5, 1.2 + 0.32 * max(n, 1)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first group on top
    for yi, g, lo, hi, status in zip(y, gmean, ci_low, ci_high, statuses, strict=True):
        if not math.isfinite(g):
            continue
        color = STATUS_COLORS.get(status, "#333333")
        if math.isfinite(lo) and math.isfinite(hi):
            ax.plot([lo, hi], [yi, yi], color=color, linewidth=2.2, solid_capstyle="butt")
        ax.plot([g], [yi], "o", color=color, markersize=6)
    ax.axvline(threshold, color="#222222", linestyle="--", linewidth=1)
    set_log_x(ax)
    ax.set_yticks(y, drawn(labels))
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(
        f"geometric-mean fg/bg ratio, {confidence:.0%} bootstrap interval\n"
        f"(log scale; dashed line: threshold {fmt_threshold(threshold)})"
    )
    ax.grid(axis="x", which="both", alpha=0.25)
    handles = [
        Line2D([], [], color=c, marker="o", linewidth=2, label=s) for s, c in STATUS_COLORS.items()
    ]
    # above the axes, so it never hides a group
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=4,
        fontsize=8,
        frameon=False,
    )
    return png_bytes(fig)


def distribution_chart(
    labels: Sequence[str],
    counts: Sequence[np.ndarray],
    statuses: Sequence[str],
    threshold: float,
) -> bytes:
    """Ridgeline of per-image fg/bg ratios per group (each row scaled to its own peak).

    Args:
        labels: group names, drawn top to bottom.
        counts: per group, (len(HIST_EDGES) - 1,) counts from :func:`log_histogram`.
        statuses: group statuses, which pick the colours.
        threshold: drawn as a dashed line (unitless ratio).

    Returns:
        PNG bytes.
    """
    n = len(labels)
    fig = Figure(figsize=(7.5, 1.2 + 0.42 * max(n, 1)), layout="constrained")
    ax = fig.add_subplot()
    # step outline over the bin edges, in ratio units so the axis can be logarithmic
    xs = 10.0 ** np.repeat(HIST_EDGES, 2)[1:-1]
    for k, (c, status) in enumerate(zip(counts, statuses, strict=True)):
        base = n - 1 - k
        c = np.asarray(c, dtype=float)
        height = 0.9 * c / c.max() if c.max() > 0 else c
        ys = base + np.repeat(height, 2)
        color = STATUS_COLORS.get(status, "#333333")
        ax.fill_between(xs, base, ys, color=color, alpha=0.35, linewidth=0)
        ax.plot(xs, ys, color=color, linewidth=1)
    ax.axvline(threshold, color="#222222", linestyle="--", linewidth=1)
    set_log_x(ax)
    # show the occupied bins (and the threshold) rather than the whole 0.01-100 range
    total = np.sum([np.asarray(c) for c in counts], axis=0) if n else np.zeros(1)
    occupied = np.flatnonzero(total)
    lo, hi = (occupied[0], occupied[-1] + 1) if len(occupied) else (0, len(HIST_EDGES) - 1)
    lo_x = min(10.0 ** HIST_EDGES[lo], threshold) / 1.25
    hi_x = max(10.0 ** HIST_EDGES[hi], threshold) * 1.25
    ax.set_xlim(max(lo_x, 10.0 ** HIST_EDGES[0]), min(hi_x, 10.0 ** HIST_EDGES[-1]))
    ax.set_yticks(np.arange(n)[::-1] + 0.3, drawn(labels))
    ax.set_ylim(-0.2, n)
    ax.set_xlabel("per-image fg/bg ratio (log scale; values beyond 0.01-100 drawn at the ends)")
    ax.grid(axis="x", which="major", alpha=0.25)
    return png_bytes(fig)
