"""Evidence beyond the ratio for one shard: counterfactual backgrounds and localisation metrics.

Runs in the worker after the occlusion maps. Each image is scored with all its counterfactual
copies in one forward pass of its own, so its scores do not depend on which other images share
its shard (``pipeline.kernel.counterfactual``). Localisation metrics come from the map just
computed (``pipeline.kernel.localisation``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.config import AuditConfig, Task
from pipeline.kernel.counterfactual import background, counterfactual_scores
from pipeline.kernel.forward import Forward
from pipeline.kernel.localisation import LOCALISATION_METRICS, localisation_metrics
from pipeline.kernel.occlusion import OcclusionResult
from pipeline.kernel.options import ComputeOptions
from pipeline.run.bank import ShardEvidence
from pipeline.schema import COUNTERFACTUAL_METRICS

__all__ = ["evidence_rows", "localisation_rows"]


@torch.inference_mode()
def localisation_rows(
    full: torch.Tensor,
    masks: Sequence[torch.Tensor | None],
    ignores: Sequence[torch.Tensor | None] | None = None,
) -> list[dict]:
    """The four Quantus localisation metrics of each map (positive part, channel mean).

    Args:
        full: ``(N, C, H, W)`` full-resolution maps (``r.grid.expand(r.delta[:, 0])``).
        masks: per map, the ``(H, W)`` bool foreground or None.
        ignores: per map, the ``(H, W)`` bool pixels that are neither foreground nor
            background, or None; their relevance is set to zero, so they count for neither.
    """
    full = full.mean(dim=1).clamp(min=0)  # (N, H, W)
    out = []
    for j, m in enumerate(masks):
        if m is None:
            out.append(dict.fromkeys(LOCALISATION_METRICS, math.nan))
            continue
        rel = full[j]
        ign = None if ignores is None else ignores[j]
        if ign is not None:
            rel = rel.masked_fill(ign.to(rel.device), 0.0)
        out.append(localisation_metrics(rel, m))
    return out


def _label(record: Any, task: Task) -> int | None:
    if task is not Task.CLASSIFICATION or record.label is None:
        return None
    try:
        return int(float(record.label))
    except (TypeError, ValueError):
        return None


@torch.inference_mode()
def evidence_rows(
    model: Any,
    items: Sequence[Any],
    records: Sequence[Any],
    r: OcclusionResult,
    evidence: ShardEvidence,
    bank_items: dict[str, Any],
    cfg: AuditConfig,
    options: ComputeOptions,
) -> list[dict[str, Any]]:
    """Counterfactual columns of each image (NaN with a ``cf_note`` where there are none).

    Args:
        model: the pixel-space model.
        items: the shard's loaded items (``image``, ``mask``) whose maps are in ``r``.
        records: their manifest records, in the same order.
        r: their occlusion result (targets).
        evidence: the shard's draws.
        bank_items: loaded bank images by id (``image``, ``mask``, ``error``).
        cfg: the run's config.
        options: the kernel options of the worker (precision, memory format).
    """
    cf = cfg.counterfactual
    task = cfg.model.task
    device = r.target.device  # where the maps were computed: the model's device
    fwd = Forward(model, device, options.precision, task, cfg.model.score, options.channels_last)
    backs: dict[str, torch.Tensor] = {}
    out = []
    for j, (it, rec) in enumerate(zip(items, records, strict=True)):
        draws = evidence.draws.get(rec.image_id)
        if it.mask is None or draws is None:
            out.append(_empty("no foreground mask or box"))
            continue
        same, rand, missing, used = [], [], [], []
        for ids, into in ((draws.same, same), (draws.rand, rand)):
            for i in ids:
                b = bank_items.get(i)
                if b is None or b.image is None or b.mask is None:
                    missing.append(i)
                    continue
                if i not in backs:
                    backs[i] = background(b.image, b.mask, cf.fill.value)
                into.append(backs[i])
                if into is same:
                    used.append(i)
        if not same:
            out.append(_empty("no other image of the group has a foreground to swap in"))
            continue
        rand = rand if len(rand) == cf.swaps else []  # a partial mixed-rand set is not used
        try:
            res = counterfactual_scores(
                fwd,
                it.image.to(device)[None],
                it.mask.to(device)[None],
                [[b.to(device) for b in same]],
                [[b.to(device) for b in rand]],
                r.target[j : j + 1, 0].to(device),
                cf.fill.value,
                classification=task is Task.CLASSIFICATION,
            )
        except Exception as e:  # the maps stand; only this line of evidence is missing
            out.append(_empty(f"counterfactual failed: {type(e).__name__}: {e}"[:500]))
            continue
        out.append(_row(res, used, rec, task, missing))
    return out


def _empty(note: str) -> dict[str, Any]:
    return {**dict.fromkeys(COUNTERFACTUAL_METRICS, math.nan), "cf_note": note}


def _row(res: Any, same_ids: Sequence[str], rec: Any, task: Task, missing: list[str]) -> dict:
    row = {
        "swap_delta": float(res.swap_delta[0]),
        "nofg_delta": float(res.nofg_delta[0]),
        "rand_delta": float(res.rand_delta[0]),
        "only_fg_delta": float(res.only_fg_delta[0]),
        "swap_flip": float(res.swap_flip[0]),
        "bg_reliance": float(res.bg_reliance[0]),
        "swap_ids": list(same_ids),
        "swap_scores": res.swap_scores[0].float().cpu().tolist(),
        "cf_note": None,
    }
    if math.isnan(row["bg_reliance"]):
        row["cf_note"] = "both deltas are about 0: the score moves with neither"
    if missing:
        row["cf_note"] = f"bank images not decodable, left out: {sorted(set(missing))[:5]}"
    label = _label(rec, task)
    pred = res.pred[0].cpu()
    s = len(same_ids)
    n_rand = pred.shape[0] - 3 - s  # [x, same..., rand..., no-fg, only-fg]
    if label is None:
        row.update(dict.fromkeys(("acc_original", "acc_mixed_same", "acc_mixed_rand",
                                  "acc_only_fg"), math.nan))  # fmt: skip
        return row
    hit = (pred == label).float()
    row["acc_original"] = float(hit[0])
    row["acc_mixed_same"] = float(hit[1 : 1 + s].mean())
    row["acc_mixed_rand"] = float(hit[1 + s : 1 + s + n_rand].mean()) if n_rand else math.nan
    row["acc_only_fg"] = float(hit[-1])
    return row
