"""The report's "Strategies" section: per group, one tile per discovered cluster.

Read from ``RUN_DIR/strategies.parquet`` (``occlusion-audit discover``): the cluster's share, its
mean map, and the images nearest its centre with their own maps. Small clusters with
concentrated maps come first: they are where shortcuts hide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from pipeline.audit.strategies import strategy_group_columns
from pipeline.report.figures import png_bytes, stored_row_figure
from pipeline.report.html import fmt
from pipeline.run.folder import RunFolder

__all__ = ["StrategyTile", "strategy_groups"]


@dataclass
class StrategyTile:
    """One cluster: its mean map and the images nearest its centre."""

    title: str
    caption: str
    mean_png: bytes
    marks: list[str]
    examples: list[tuple[bytes, str]] = field(default_factory=list)


def _mean_png(values: Sequence[float], h: int, w: int) -> bytes:
    grid = np.asarray(values, dtype=float).reshape(h, w)
    lim = float(np.abs(grid).max()) or 1.0
    fig = Figure(figsize=(1.8, 1.8), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title("mean map", fontsize=7)
    ax.axis("off")
    return png_bytes(fig, dpi=90)


def strategy_groups(
    folder: RunFolder, root: Any, max_groups: int = 20, examples: int = 3
) -> list[tuple[str, list[StrategyTile]]]:
    """``(group label, tiles)`` for the first ``max_groups`` groups; empty without
    ``strategies.parquet``."""
    data = folder.read_file("strategies.parquet")
    if data is None:
        return []
    st = pq.read_table(pa.BufferReader(data)).to_pandas()
    gcols = strategy_group_columns(st)
    wanted = {i for ids in st["nearest_ids"] for i in list(ids)[:examples]}
    rows = {r["image_id"]: r for r in folder.read_maps(image_ids=wanted).to_dict("records")}
    out = []
    for key, part in st.groupby(gcols, sort=False, dropna=False) if gcols else [((), st)]:
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{g} {v}" for g, v in zip(gcols, key, strict=True)) or "All images"
        tiles = []
        for _, c in part.iterrows():
            marks = [m for m, on in (("fixed place", c["fixed_place"]),
                                     ("off the object", c["off_object"])) if on]  # fmt: skip
            tile = StrategyTile(
                title=f"cluster {c['cluster']}: {c['n']} images ({c['share']:.0%})",
                caption=(
                    f"peak at cell ({c['peak_row']}, {c['peak_col']}); {c['concentration']:.0%} "
                    f"of the mean map in its top tenth; fg/bg ratio {fmt(c['gmean_ratio'])}"
                ),
                mean_png=_mean_png(c["mean_delta"], int(c["grid_h"]), int(c["grid_w"])),
                marks=marks,
            )
            for image_id in list(c["nearest_ids"])[:examples]:
                row = rows.get(image_id)
                if row is None:
                    continue
                try:
                    tile.examples.append((stored_row_figure(row, root)[0], str(image_id)))
                except Exception:  # an unreadable image: the tile keeps its mean map
                    continue
            tiles.append(tile)
        out.append((label, tiles))
        if len(out) >= max_groups:
            break
    return out
