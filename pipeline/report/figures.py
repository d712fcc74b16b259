"""Report figures as PNG bytes, drawn with matplotlib's object API (no pyplot global state).

Every function returns PNG bytes. The charts take plain arrays and labels; only
:func:`stored_row_figure` reads an image (through :mod:`pipeline.data.images`). Choosing what to
show belongs to :mod:`pipeline.report.build`, writing HTML to :mod:`pipeline.report.html`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

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
    "gallery_figure",
    "log_histogram",
    "png_bytes",
    "ratio_chart",
    "set_log_x",
    "stored_item",
    "stored_row_figure",
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


def log_histogram(ratios: np.ndarray) -> np.ndarray:
    """Counts of positive ``ratios`` in the ``HIST_EDGES`` bins (log10 space, ends clipped).

    Args:
        ratios: (N,) finite positive fg/bg ratios.

    Returns:
        (len(HIST_EDGES) - 1,) int64 counts; summing per-batch results gives the whole histogram.
    """
    logs = np.clip(np.log10(ratios), HIST_EDGES[0], HIST_EDGES[-1])
    return np.histogram(logs, bins=HIST_EDGES)[0].astype(np.int64)


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


def gallery_figure(
    image: np.ndarray,
    heat: np.ndarray | None,
    mask: np.ndarray | None,
) -> bytes:
    """Image beside its occlusion map overlay, both with the foreground outline.

    Args:
        image: (H, W, 3) float RGB in [0, 1].
        heat: (H, W) occlusion map (score drop; positive = evidence for the prediction), or
            ``None`` to draw the image alone. Drawn with a diverging colormap whose centre is
            zero: red where occluding lowers the score, blue where it raises it.
        mask: (H, W) bool foreground, or ``None``; drawn as a contour.

    Returns:
        PNG bytes.
    """
    # fixed axes positions (fractions of the figure): no layout engine, which would cost more
    # than the drawing itself for these tick-free panels
    if heat is None:
        fig = Figure(figsize=(2.4, 2.55))
        axes = [fig.add_axes((0.02, 0.02, 0.96, 0.86))]
    else:
        fig = Figure(figsize=(5.4, 2.55))
        axes = [fig.add_axes((0.01, 0.02, 0.41, 0.86)), fig.add_axes((0.44, 0.02, 0.41, 0.86))]
    axes[0].imshow(np.clip(image, 0, 1), interpolation="nearest")
    axes[0].set_title("image + mask", fontsize=8)
    if heat is not None:
        gray = np.clip(image, 0, 1).mean(axis=2)
        axes[1].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        finite = np.abs(heat[np.isfinite(heat)])
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        shown = axes[1].imshow(
            heat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.7, interpolation="nearest"
        )
        axes[1].set_title("occlusion map", fontsize=8)
        cbar = fig.colorbar(shown, cax=fig.add_axes((0.865, 0.08, 0.022, 0.74)))
        cbar.ax.tick_params(labelsize=6)
    for ax in axes:
        # a mask that is all foreground or all background has no outline to draw
        if mask is not None and mask.any() and not mask.all():
            # a dark halo under the light line keeps the outline visible on any background
            for color, width in (("#000000", 2.4), ("#00e5ff", 1.1)):
                ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=width)
        ax.set_axis_off()
    return png_bytes(fig, dpi=90)


def stored_row_figure(row: Mapping[str, Any], images: Any) -> tuple[bytes, list[str]]:
    """:func:`gallery_figure` of one stored maps row: its image, mask and expanded map.

    Args:
        row: a stored row as a dict (``path``, ``mask``, ``image_h``/``image_w``, ``delta``...).
        images: a :class:`pipeline.data.stored.StoredImages` for the run's dataset (or the
            root folder or URI that relative image and mask paths resolve against).

    Returns:
        ``(png, notes)``; ``notes`` say why the mask or the map could not be drawn, if so.

    Raises:
        Exception: whatever loading the image raised (``pipeline.data.images.DataError`` for a
            missing or corrupt file); the caller decides how to show it.
    """
    item = stored_item(row, images)
    image = np.asarray(item.image.permute(1, 2, 0), dtype=float)  # (H, W, 3) in [0, 1]
    notes, heat = [], None
    mask = None if item.fg is None else np.asarray(item.fg)
    try:
        from pipeline.kernel.occlusion import expand_map

        heat = np.asarray(expand_map(row), dtype=float)  # (H, W)
    except Exception as exc:  # a stored map that cannot be expanded: draw the image alone
        notes.append(f"map: {exc}")
    return gallery_figure(image, heat, mask), notes


def stored_item(row: Mapping[str, Any], images: Any) -> Any:
    """The row's decoded image and foreground (:class:`pipeline.data.foreground.Item`)."""
    from pipeline.data.stored import StoredImages  # here: plotting alone needs no image I/O

    if not isinstance(images, StoredImages):
        images = StoredImages(images)
    return images.load(row)
