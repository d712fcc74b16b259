"""The report's "Two lines of evidence" section: per flagged group, the occlusion ratio beside
the background swaps, with example swaps rebuilt from the stored rows.

A swap is rebuilt exactly as the worker built it (``pipeline.kernel.counterfactual``): the
image's foreground over the bank image's background; its stored score says how the model's
score moved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.figure import Figure

from pipeline.data.stored import StoredImages
from pipeline.report.figures import fmt_threshold, png_bytes
from pipeline.report.html import fmt, group_label
from pipeline.run.folder import RunFolder
from pipeline.run.record import RunRecord

__all__ = ["EvidenceBlock", "evidence_blocks", "run_evidence"]


@dataclass
class EvidenceBlock:
    """One flagged group: the two lines of evidence and example swaps."""

    label: str
    status: str
    lines: list[str]
    confirmed: bool = False
    swaps: list[tuple[bytes, str]] = field(default_factory=list)  # (PNG, caption)
    note: str = ""


def _sentences(row: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    ratio = (
        f"Occlusion: geometric-mean fg/bg ratio {fmt(row['gmean_ratio'])} "
        f"({fmt(row['ci_low'])}-{fmt(row['ci_high'])}) below the threshold "
        f"{fmt_threshold(float(params['threshold']))}: the map's mass sits off the object."
    )
    rel = row.get("bg_reliance")
    if rel is None or not math.isfinite(float(rel)):
        return [ratio, "Background swaps: no images with a mask to swap (no second line)."]
    verdict = "confirmed" if bool(row.get("confirmed")) else "not confirmed"
    swaps = (
        f"Background swaps: bg_reliance {fmt(rel)} ({fmt(row['bg_reliance_low'])}-"
        f"{fmt(row['bg_reliance_high'])}), 1 = the score follows the background, 0 = the object; "
        f"{verdict} (the interval must lie above 0.5)."
    )
    extra = []
    if math.isfinite(float(row.get("acc_original", math.nan))):
        extra.append(
            f"Accuracy: original {fmt(row['acc_original'])}, same-group backgrounds "
            f"{fmt(row['acc_mixed_same'])}, other groups' {fmt(row['acc_mixed_rand'])}, object on "
            f"grey {fmt(row['acc_only_fg'])}; BG-gap {fmt(row['bg_gap'])}."
        )
    return [ratio, swaps, *extra]


def _swap_figure(original: np.ndarray, swapped: np.ndarray) -> bytes:
    fig = Figure(figsize=(3.2, 1.7), layout="constrained")
    for k, (img, title) in enumerate(((original, "original"), (swapped, "swapped"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    return png_bytes(fig, dpi=90)


def _example(row: Mapping[str, Any], rows_by_id: Mapping[str, Any], root: Any, fill: str):
    """(PNG, caption) of each stored swap of one image, rebuilt from the stored rows."""
    from pipeline.kernel.counterfactual import background, composite
    from pipeline.report.figures import stored_item

    item = stored_item(row, root)
    x, m = item.image, item.fg
    if m is None:
        return []
    out = []
    for bank_id, score in zip(row["swap_ids"], row["swap_scores"], strict=True):
        b = rows_by_id.get(bank_id)
        if b is None:
            continue
        bank = stored_item(b, root)
        if bank.fg is None:
            continue
        swapped = composite(x, m, background(bank.image, bank.fg, fill))
        png = _swap_figure(x.permute(1, 2, 0).numpy(), swapped.permute(1, 2, 0).numpy())
        moved = f"score {fmt(float(row['score']))} -> {fmt(float(score))}"
        caption = f"{row['image_id']} on {bank_id}'s background: {moved}"
        out.append((png, caption))
    return out


def evidence_blocks(
    maps: pd.DataFrame,
    summary: pd.DataFrame,
    group_by: Sequence[str],
    params: Mapping[str, Any],
    root: Any,
    fill: str = "mean",
    per_group: int = 2,
) -> list[EvidenceBlock]:
    """One block per flagged group (in summary order).

    Args:
        maps: stored rows with ``image_id``, group columns, ``path``, ``mask``, ``image_h``,
            ``image_w``, ``score``, ``swap_delta``, ``swap_ids``, ``swap_scores``.
        summary: the per-group summary.
        group_by: its group columns.
        params: audit parameters (``threshold``).
        root: a :class:`pipeline.data.stored.StoredImages` for the run's dataset, or the
            folder image paths resolve against.
        fill: the run's ``counterfactual.fill``.
        per_group: images whose swaps are shown (largest ``|swap_delta|`` first).
    """
    if "swap_ids" not in maps.columns:
        return []
    rows_by_id = {r["image_id"]: r for r in maps.to_dict("records")}
    blocks = []
    for _, s in summary[summary["status"] == "flagged"].iterrows():
        block = EvidenceBlock(
            group_label(s, group_by), "flagged", _sentences(s, params), bool(s.get("confirmed"))
        )
        mask = np.ones(len(maps), dtype=bool)
        for g in group_by:
            mask &= (maps[g].isna() if pd.isna(s[g]) else maps[g] == s[g]).to_numpy()
        group = maps[mask & maps["swap_delta"].notna().to_numpy()]
        order = group["swap_delta"].abs().sort_values(ascending=False).index[:per_group]
        for _, row in group.loc[order].iterrows():
            try:
                block.swaps += _example(row, rows_by_id, root, fill)[:2]
            except Exception as e:  # an image that cannot be read: say so, keep the section
                block.note = f"some swaps cannot be drawn: {e}"
        blocks.append(block)
    return blocks


def run_evidence(
    folder: RunFolder,
    summary: pd.DataFrame,
    group_by: Sequence[str],
    params: Mapping[str, Any],
    record: RunRecord | None,
) -> list[EvidenceBlock]:
    """The two-lines-of-evidence blocks of the flagged groups (none for older runs)."""
    if record is None or not (summary["status"] == "flagged").any():
        return []
    cols = [*group_by, "image_id", "path", "mask", "image_h", "image_w", "score", "swap_delta"]
    try:
        maps = folder.read_maps([*dict.fromkeys(cols), "swap_ids", "swap_scores"])
    except (KeyError, ValueError, pa.ArrowInvalid):  # a run stored before swaps existed
        return []
    root, fill = StoredImages(record.config.dataset), record.config.counterfactual.fill.value
    return evidence_blocks(maps, summary, group_by, params, root, fill)
