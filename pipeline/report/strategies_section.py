"""The strategies ``discover`` found in each group: one tile per cluster.

Read from ``RUN_DIR/strategies.parquet`` (``occlusion-audit discover``): the cluster's share, its
mean map, and the images nearest its centre. Small clusters with concentrated maps come first
(the file's order): they are where shortcuts hide. Each group page shows its group's tiles;
the report's "Strategies" section shows the first groups with a marked cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.audit.strategies import strategy_group_columns
from pipeline.report.assets import Card
from pipeline.report.html import fmt
from pipeline.report.names import GroupKey, group_key

__all__ = [
    "Strategies",
    "StrategyGroup",
    "StrategyTile",
    "marked",
    "other_grouping",
    "read_strategies",
    "strategy_tiles",
]

EXAMPLES = 3  # images shown per cluster, nearest its mean map first


@dataclass
class StrategyTile:
    """One cluster: its mean map (a file), words, marks and its images nearest the centre,
    each with the group page that draws it (relative to the report folder)."""

    title: str
    caption: str
    mean: str
    marks: list[str]
    examples: list[tuple[Card, str]] = field(default_factory=list)


@dataclass
class StrategyGroup:
    """A group of ``strategies.parquet`` when ``discover`` grouped otherwise than the report:
    its words and tiles, shown on the index only."""

    label: str
    strategies: list[StrategyTile]
    href: str | None = None


@dataclass(frozen=True)
class Strategies:
    """``strategies.parquet`` split by group: its group columns and each group's clusters."""

    group_by: tuple[str, ...]
    groups: Mapping[GroupKey, list[dict[str, Any]]]  # each group's rows, in the file's order
    table: pd.DataFrame

    def example_ids(self) -> set[str]:
        """The images every tile shows (read with their maps to draw them)."""
        return {
            str(i) for part in self.groups.values() for c in part
            for i in list(c["nearest_ids"])[:EXAMPLES]
        }  # fmt: skip


def read_strategies(folder: Any) -> Strategies | None:
    """The run's strategies by group, or None without ``strategies.parquet``."""
    data = folder.read_file("strategies.parquet")
    if data is None:
        return None
    table = pq.read_table(pa.BufferReader(data)).to_pandas()
    cols = strategy_group_columns(table)
    groups: dict[GroupKey, list[dict[str, Any]]] = {}
    for row in table.to_dict("records"):
        groups.setdefault(group_key(row, cols), []).append(row)
    return Strategies(tuple(cols), groups, table)


def strategy_tiles(
    assets: Any,
    name: str,
    clusters: Sequence[Mapping[str, Any]],
    cards: Mapping[str, tuple[Card, str]],
) -> list[StrategyTile]:
    """One tile per cluster of a group.

    Args:
        assets: the report's :class:`~pipeline.report.assets.Assets` (mean maps are written).
        name: a name unique to the group (the mean maps' file key).
        clusters: the group's rows of ``strategies.parquet``.
        cards: image id -> its drawn card and the page it is on (examples not drawn are left
            out).
    """
    tiles = []
    for c in clusters:
        marks = [m for m, on in (("fixed place", c["fixed_place"]),
                                 ("off the object", c["off_object"])) if on]  # fmt: skip
        grid = np.asarray(c["mean_delta"], dtype=np.float64).reshape(int(c["grid_h"]), -1)
        tile = StrategyTile(
            title=f"cluster {c['cluster']}: {c['n']} images ({c['share']:.0%})",
            caption=(
                f"peak at cell ({c['peak_row']}, {c['peak_col']}); {c['concentration']:.0%} "
                f"of the mean map in its top tenth; fg/bg ratio {fmt(c['gmean_ratio'])}"
            ),
            mean=assets.grid(f"{name}\0strategy\0{c['cluster']}", grid),
            marks=marks,
        )
        for image_id in list(c["nearest_ids"])[:EXAMPLES]:
            found = cards.get(str(image_id))
            if found is not None and found[0].image is not None:
                tile.examples.append(found)
        tiles.append(tile)
    return tiles


def marked(view: Any) -> bool:
    """Whether a group view shows a marked cluster (fixed place, off the object)."""
    return any(t.marks for t in view.strategies)


def other_grouping(assets: Any, strategies: Strategies, views: Sequence[Any]) -> list[Any]:
    """The index's strategy groups when ``discover`` grouped otherwise than the report: tiles
    per strategy group, their examples linked to the group pages that draw them."""
    cards = {c.image_id: (c, v.href) for v in views for c in v.cards}
    out = []
    for key, clusters in strategies.groups.items():
        values = dict(zip(strategies.group_by, key, strict=True))
        label = ", ".join(f"{g} {v}" for g, v in values.items()) or "All images"
        out.append(StrategyGroup(label, strategy_tiles(assets, label, clusters, cards)))
    return out
