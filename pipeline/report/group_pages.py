"""One page per group: every image sorted by ratio, drawn with its map side by side and as an
overlay, the group's background swaps and its strategies.

Pages are built group by group from the scan's light table (:mod:`~.scan`); only the images a
page draws (the lowest ratios up to :attr:`Limits.page_images`, the swap examples and the
strategy examples) are read again with their grids, in one filtered pass over the run. Cost and
files grow linearly with images and groups; each image is decoded once per page.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.audit.aggregate import iter_batches
from pipeline.report import html as rh
from pipeline.report.assets import Card, put, single_thread
from pipeline.report.evidence_section import EvidenceBlock, evidence_lines, group_swaps
from pipeline.report.names import GROUP_DIR, group_key
from pipeline.report.scan import Scan, stored_columns
from pipeline.report.strategies_section import Strategies, StrategyTile, strategy_tiles
from pipeline.schema import STATUS_OK

__all__ = ["GroupView", "ImageLine", "Limits", "build_group_pages"]

_DRAW_COLUMNS = ("image_id", "delta", "image_c", "window", "stride")
_SWAP_COLUMNS = ("swap_ids", "swap_scores")


@dataclass(frozen=True)
class Limits:
    """How much of a run the report draws and lists (docs/design.md, "Report folder")."""

    gallery_size: int = 6  # lowest-ratio images per gallery on the index
    gallery_groups: int = 12  # flagged and inconclusive groups with an index gallery
    page_images: int | None = 50  # images drawn per group page, lowest ratio first (None: all)
    swap_images: int = 2  # images per group whose swaps are rebuilt (largest |swap_delta|)
    swaps_per_image: int = 1  # swaps rebuilt per such image
    evidence_groups: int = 10  # flagged groups whose swaps the index shows
    strategy_groups: int = 10  # groups whose strategies the index shows, marked ones first
    max_groups: int = 40  # groups drawn in the index's charts
    curation_limit: int | None = 10_000  # low-ratio images in curation.csv
    review_limit: int | None = 10_000  # images in review.csv
    review_shown: int = 50  # images of the review queue on the index


@dataclass(frozen=True)
class ImageLine:
    """One image of a group page's full list, and its card when the page draws it."""

    image_id: str
    ratio: float
    fg_share: float
    status: str
    note: str
    valid: bool
    card: Card | None = None


@dataclass
class GroupView:
    """What a group's page shows; the index reuses the first groups' cards and swaps."""

    label: str
    status: str
    href: str
    sentence: str | None
    evidence: EvidenceBlock
    lines: list[ImageLine] = field(default_factory=list)
    strategies: list[StrategyTile] = field(default_factory=list)

    @property
    def cards(self) -> list[Card]:
        return [line.card for line in self.lines if line.card is not None]

    def gallery(self, size: int) -> list[Card]:
        """The ``size`` lowest valid ratios' cards (placeholders included)."""
        return [ln.card for ln in self.lines if ln.valid and ln.card is not None][:size]


def _float(value: Any) -> float:
    """A light row's number as a float; a null (Arrow reads pandas' NaN back as null) is NaN."""
    return math.nan if value is None else float(value)


def _order(images: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row positions sorted by group index, then valid ratios (ascending), undefined ratios,
    errors, each by id; and the group index of each position in that order."""
    r = images["fg_bg_ratio"].to_numpy(dtype=np.float64, na_value=np.nan)
    valid = images["valid"].to_numpy()
    ok = (images["status"] == STATUS_OK).to_numpy()
    keys = pd.DataFrame(
        {
            "g": images["group"].to_numpy(),
            "rank": np.select([valid, ok], [0, 1], 2),
            "r": np.where(valid, r, np.inf),
            "id": images["image_id"].to_numpy(),
        }
    )
    order = keys.sort_values(["g", "rank", "r", "id"], kind="stable").index.to_numpy()
    return order, keys["g"].to_numpy()[order]


def _drawn_ids(images: pd.DataFrame, order: np.ndarray, codes: np.ndarray, limits: Limits,
               extra: set[str]) -> set[str]:  # fmt: skip
    """The ids a page draws: per group the first ``page_images`` ``ok`` rows in page order,
    the largest ``|swap_delta|`` rows, and ``extra`` (strategy examples)."""
    ok = (images["status"] == STATUS_OK).to_numpy()[order]
    ids = images["image_id"].to_numpy()[order]
    rank = pd.Series(ok.astype(np.int64)).groupby(codes).cumsum().to_numpy()  # ok rows so far
    cap = limits.page_images
    drawn = set(ids[ok & (rank <= cap)]) if cap is not None else set(ids[ok])
    moved = np.abs(images["swap_delta"].to_numpy(dtype=np.float64, na_value=np.nan))[order]
    frame = pd.DataFrame({"g": codes, "m": moved, "id": ids})[np.isfinite(moved) & ok]
    top = frame.sort_values(["g", "m"], ascending=[True, False], kind="stable")
    drawn |= set(top.groupby("g", sort=False).head(limits.swap_images)["id"])
    return {str(i) for i in drawn} | extra


def _full_rows(run_dir: Any, ids: set[str]) -> tuple[pa.Table, dict[str, int]]:
    """The drawn images' grids (and stored swaps), read in one filtered pass."""
    stored = set(stored_columns(run_dir))
    cols = [*_DRAW_COLUMNS, *(c for c in _SWAP_COLUMNS if c in stored)]
    if not ids:
        return pa.table({c: pa.array([], pa.string()) for c in cols}), {}
    batches = list(iter_batches(run_dir, cols, filter=pc.field("image_id").isin(sorted(ids))))
    table = pa.Table.from_batches(batches) if batches else pa.table({"image_id": []})
    return table, {str(i): k for k, i in enumerate(table.column("image_id").to_pylist())}


class _Builder:
    """Builds and writes the group pages of one report."""

    def __init__(self, out: Path, ctx: Any, scan: Scan, limits: Limits) -> None:
        self.out, self.ctx, self.limits = out, ctx, limits
        self.scan = scan
        self.images = scan.images
        # object dtype: its hash table answers one id in microseconds (arrow strings do not)
        self.ids = pd.Index(self.images["image_id"].astype(str).to_numpy(dtype=object))
        self.local: dict[str, dict[str, Any]] = {}  # the current group's light rows
        strategies: Strategies | None = ctx.strategies
        self.examples = strategies.example_ids() if strategies is not None else set()
        self.order, self.codes = _order(self.images)
        drawn = _drawn_ids(self.images, self.order, self.codes, limits, self.examples)
        self.full, self.full_at = _full_rows(ctx.run_dir, drawn)
        starts = np.searchsorted(self.codes, np.arange(len(ctx.summary) + 1))
        self.bounds = list(itertools.pairwise(starts))

    def light(self, image_id: str) -> dict[str, Any] | None:
        """An image's light columns: from the current group, else looked up in the scan."""
        found = self.local.get(image_id)
        if found is not None:
            return found
        try:
            i = self.ids.get_loc(image_id)
        except KeyError:
            return None
        return self.scan.rows([int(i)])[0] if isinstance(i, int | np.integer) else None

    def row(self, image_id: str) -> dict[str, Any] | None:
        """The stored row to draw: light columns and, when read, grid and swaps."""
        light = self.light(image_id)
        k = self.full_at.get(image_id)
        if light is None or k is None:
            return light
        return {**light, **self.full.slice(k, 1).to_pylist()[0]}

    def view(self, k: int, srow: Mapping[str, Any]) -> GroupView:
        ctx = self.ctx
        cache: dict[str, Any] = {}

        def load(image_id: str) -> Any:
            if image_id not in cache:
                light = self.light(image_id)
                try:
                    if light is None:
                        raise KeyError(f"{image_id!r} is not among the stored rows")
                    cache[image_id] = ctx.assets.load(light)
                except Exception as exc:  # one unreadable image must not sink the report
                    cache[image_id] = exc
            return cache[image_id]

        status = str(srow["status"])
        label = ctx.labels[k]
        sentence = rh.finding_sentence(srow, ctx.group_by, ctx.params, label)
        lines = evidence_lines(srow, ctx.params)
        block = EvidenceBlock(label, status, ctx.pages[k], lines, bool(srow.get("confirmed")))
        view = GroupView(label, status, block.href, sentence if status in rh.REVIEW else None,
                         block)  # fmt: skip
        start, stop = self.bounds[k]
        records = self.scan.rows(self.order[start:stop])
        self.local = {str(r["image_id"]): r for r in records}
        for light in records:
            view.lines.append(self._line(light, load))
        examples = self._swap_examples(view)
        block.swaps, block.note = group_swaps(
            ctx.assets, examples, load, ctx.fill, self.limits.swaps_per_image
        )
        if ctx.strategies is not None and ctx.strategies.group_by == tuple(ctx.group_by):
            part = ctx.strategies.groups.get(group_key(srow, ctx.group_by))
            if part is not None:
                cards = {c.image_id: (c, block.href) for c in view.cards}
                view.strategies = strategy_tiles(ctx.assets, block.href, part, cards)
        return view

    def _line(self, light: Mapping[str, Any], load: Any) -> ImageLine:
        image_id = str(light["image_id"])
        ratio, share = _float(light["fg_bg_ratio"]), _float(light["fg_share"])
        note = light["error"] if light["status"] != STATUS_OK else light["metric_note"]
        line = ImageLine(image_id, ratio, share, str(light["status"]),
                         note if isinstance(note, str) else "", bool(light["valid"]))  # fmt: skip
        if image_id not in self.full_at:
            return line
        caption = f"{image_id}: fg/bg ratio {rh.fmt(ratio, 3)}, fg_share {rh.fmt(share)}"
        flip = _float(light["swap_flip"])
        if flip == flip:  # not NaN: the run swapped this image's background
            caption += f", swap flips {flip:.0%}"
        caption += f" — {light['path']}"
        row = self.row(image_id)
        card = self.ctx.assets.card(row, load(image_id), caption)
        return replace(line, card=card)

    def _swap_examples(self, view: GroupView) -> list[dict[str, Any]]:
        if "swap_ids" not in self.full.column_names:
            return []
        rows = []
        for line in view.lines:
            row = self.row(line.image_id) if line.image_id in self.full_at else None
            if row and row.get("swap_ids") and np.isfinite(_float(row["swap_delta"])):
                rows.append(row)
        rows.sort(key=lambda r: -abs(_float(r["swap_delta"])))
        return rows[: self.limits.swap_images]


def build_group_pages(out: Path, ctx: Any, scan: Scan, limits: Limits) -> list[GroupView]:
    """Write ``groups/<name>.html`` for every summary row; return the views in summary order.

    Args:
        out: the local report folder.
        ctx: the report's context (``run_dir``, ``summary``, ``group_by``, ``names``,
            ``params``, ``assets``, ``strategies``, ``fill``, ``title``).
        scan: the pass over the run.
        limits: what is drawn.
    """
    builder = _Builder(out, ctx, scan, limits)
    (out / GROUP_DIR).mkdir(parents=True, exist_ok=True)
    template = rh.environment().get_template("group.html.j2")
    views, galleries = [], 0
    with single_thread():
        for k, srow in enumerate(ctx.rows):
            view = builder.view(k, srow)
            page = template.render(view=view, row=srow, title=ctx.title, root="../",
                                   drawn=limits.page_images, group_by=ctx.group_by)  # fmt: skip
            put(out / view.href, rh.fix_quotes(page))
            if view.status in rh.REVIEW and galleries < limits.gallery_groups:
                galleries += 1  # the index draws this group's gallery: keep its images
            else:  # keep what the index may show (strategy examples), not every image
                view.lines = [ln for ln in view.lines if ln.image_id in builder.examples]
            views.append(view)
    return views
