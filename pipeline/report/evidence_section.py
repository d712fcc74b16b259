"""The second line of evidence beside the ratio: the background swaps of a group, in words and
rebuilt as pictures.

A swap is rebuilt exactly as the worker built it (``pipeline.kernel.counterfactual``): the
image's foreground over the bank image's background; its stored score says how the model's
score moved. Each group page shows the swaps of its two images whose score moved most; the
report's "Two lines of evidence" section shows those of the first flagged groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.report.figures import fmt_threshold
from pipeline.report.html import fmt

__all__ = ["EvidenceBlock", "Swap", "evidence_lines", "group_swaps"]


@dataclass(frozen=True)
class Swap:
    """One rebuilt swap: the original and the swapped picture (files) and what the score did."""

    original: str
    swapped: str
    caption: str


@dataclass
class EvidenceBlock:
    """One group's two lines of evidence and its example swaps.

    Attributes:
        label: the group in words.
        status: its verdict.
        href: its page, relative to the report folder.
        lines: the ratio and the swaps in sentences.
        confirmed: flagged, and the swaps confirm it (``bg_reliance_low > 0.5``).
        swaps: rebuilt swaps, the largest score change first.
        note: why some swaps could not be drawn, if so.
    """

    label: str
    status: str
    href: str
    lines: list[str]
    confirmed: bool = False
    swaps: list[Swap] = field(default_factory=list)
    note: str = ""


def evidence_lines(row: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """The ratio and the swap evidence of one summary row, in sentences (plain text)."""
    t = fmt_threshold(float(params["threshold"]))
    ratio = (
        f"Occlusion: geometric-mean fg/bg ratio {fmt(row['gmean_ratio'])} "
        f"({fmt(row['ci_low'])}-{fmt(row['ci_high'])})"
    )
    if row["status"] == "flagged":
        ratio += f" below the threshold {t}: the map's mass sits off the object."
    else:
        ratio += f"; threshold {t}."
    rel = row.get("bg_reliance")
    if rel is None or not math.isfinite(float(rel)):
        return [ratio, "Background swaps: no images with a mask to swap (no second line)."]
    verdict = "confirmed" if bool(row.get("confirmed")) else "not confirmed"
    swaps = (
        f"Background swaps: bg_reliance {fmt(rel)} ({fmt(row['bg_reliance_low'])}-"
        f"{fmt(row['bg_reliance_high'])}), 1 = the score follows the background, 0 = the object"
    )
    swaps += (
        f"; {verdict} (the interval must lie above 0.5)." if row["status"] == "flagged" else "."
    )
    extra = []
    if math.isfinite(float(row.get("acc_original", math.nan))):
        extra.append(
            f"Accuracy: original {fmt(row['acc_original'])}, same-group backgrounds "
            f"{fmt(row['acc_mixed_same'])}, other groups' {fmt(row['acc_mixed_rand'])}, object on "
            f"grey {fmt(row['acc_only_fg'])}; BG-gap {fmt(row['bg_gap'])}."
        )
    return [ratio, swaps, *extra]


def group_swaps(
    assets: Any,
    examples: Sequence[Mapping[str, Any]],
    load: Callable[[str], Any],
    fill: str,
    per_image: int = 2,
) -> tuple[list[Swap], str]:
    """Rebuild the stored swaps of a group's example images.

    Args:
        assets: the report's :class:`~pipeline.report.assets.Assets`.
        examples: stored rows (``image_id``, ``score``, ``swap_ids``, ``swap_scores``), the
            largest ``|swap_delta|`` first.
        load: image id -> its loaded item (``image`` (C, H, W), ``fg``), or the exception
            its read raised.
        fill: the run's ``counterfactual.fill``.
        per_image: swaps shown per image.

    Returns:
        ``(swaps, note)``; the note says why some could not be drawn.
    """
    from pipeline.kernel.counterfactual import background, composite

    out, note = [], ""
    for row in examples:
        image_id = str(row["image_id"])
        item = load(image_id)
        if isinstance(item, BaseException) or item.fg is None:
            note = (
                f"some swaps cannot be drawn: {item}" if isinstance(item, BaseException) else note
            )
            continue
        pairs = list(zip(row.get("swap_ids") or [], row.get("swap_scores") or [], strict=False))
        for bank_id, score in pairs[:per_image]:
            bank = load(str(bank_id))
            if isinstance(bank, BaseException):
                note = f"some swaps cannot be drawn: {bank}"
                continue
            if bank.fg is None:
                continue
            swapped = composite(item.image, item.fg, background(bank.image, bank.fg, fill))
            original = assets.picture(image_id, item.image, item.fg)
            picture = assets.picture(f"{image_id}\0swap\0{bank_id}", swapped, item.fg)
            moved = f"score {fmt(float(row['score']))} -> {fmt(float(score))}"
            out.append(Swap(original, picture, f"{image_id} on {bank_id}'s background: {moved}"))
    return out, note
