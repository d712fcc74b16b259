"""One shard: decode images, compute occlusion maps and metrics, build its Parquet table.

This is the whole per-shard computation without Ray, so that the Ray path and a direct local call
give the same answer (the Ray worker only adds model loading and the atomic write). It takes the
frozen config as it is: there is no second shape of the settings.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from pipeline.config import AuditConfig, Target
from pipeline.data.foreground import load_item
from pipeline.data.images import DataError
from pipeline.kernel.metrics import image_metrics, nan_metrics
from pipeline.kernel.occlusion import OcclusionResult, occlude
from pipeline.kernel.options import ComputeOptions
from pipeline.run.bank import ShardEvidence
from pipeline.run.evidence import evidence_rows, localisation_rows
from pipeline.run.settings import kernel_keywords
from pipeline.schema import FLOAT_METRICS, IMAGE_METRICS, STATUS_ERROR, STATUS_OK, maps_schema

__all__ = ["load_bank", "load_shard", "process_shard"]


@dataclass
class _Loaded:
    index: int
    image: torch.Tensor | None = None  # (3, H, W)
    mask: torch.Tensor | None = None  # (H, W) bool foreground
    ignore: torch.Tensor | None = None  # (H, W) bool: neither foreground nor background
    target: int | None = None
    error: str | None = None


def _label_target(record: Any) -> int:
    try:
        return int(float(record.label))
    except (TypeError, ValueError):
        raise DataError(
            f"image {record.image_id!r}: target 'label' needs an integer class label, "
            f"got {record.label!r}"
        ) from None


def _load(i: int, record: Any, cfg: AuditConfig) -> _Loaded:
    item = _Loaded(i)
    if record.error is not None:  # the source already found this item bad
        item.error = record.error
        return item
    try:
        loaded = load_item(record, cfg.dataset)
        item.mask, item.ignore = loaded.fg, loaded.ignore
        item.target = _label_target(record) if cfg.model.target is Target.LABEL else None
        item.image = loaded.image
    except DataError as e:
        item.error = str(e)
    except PermissionError as e:  # the file is there but not ours to read: a data problem
        item.error = f"image {record.image_id!r} ({record.path}): cannot read it: {e.strerror}"
    except OSError:
        raise  # a network or disk failure, not the image's fault: the shard is retried
    except Exception as e:  # an unexpected decoder failure still names the image
        item.error = f"image {record.image_id!r} ({record.path}): {type(e).__name__}: {e}"
    return item


def _targets(cfg: AuditConfig, items: Sequence[_Loaded]) -> Any:
    target = cfg.model.target
    if target is Target.LABEL:
        return [it.target for it in items]
    return target.value if isinstance(target, Target) else target


def load_shard(records: Sequence[Any], cfg: AuditConfig) -> list[_Loaded]:
    """Decode and resize the images and masks of a shard (I/O bound; no model needed).

    A failure is kept on its item as a message naming the image, never raised.
    """
    with ThreadPoolExecutor(max_workers=cfg.cluster.decode_threads) as pool:
        return list(pool.map(lambda ir: _load(ir[0], ir[1], cfg), enumerate(records)))


def process_shard(
    model: Any,
    records: Sequence[Any],
    cfg: AuditConfig,
    shard: int,
    options: ComputeOptions,
    loaded: Sequence[_Loaded] | None = None,
    evidence: ShardEvidence | None = None,
    bank: dict[str, _Loaded] | None = None,
    phases: dict[str, float] | None = None,
) -> pa.Table:
    """Compute the stored rows of one shard.

    Args:
        model: pixel-space model (normalisation inside), already on its device.
        records: the shard's :class:`~pipeline.data.records.ImageRecord`s, in order.
        cfg: the run's config.
        shard: shard index, stored with each row.
        options: how to compute (:func:`pipeline.run.settings.worker_compute`).
        loaded: the result of :func:`load_shard` for these records, if already done.
        evidence: the shard's counterfactual draws (None: no counterfactual columns).
        bank: the loaded bank images of ``evidence`` by id (loaded here when None).
        phases: when given, seconds spent are added under ``kernel_s`` (occlusion maps),
            ``evidence_s`` (counterfactual swaps), ``metrics_s`` (fg/bg and localisation
            metrics) and ``table_s`` (building the Arrow table).

    Returns:
        A table with ``maps_schema(group_by)``: one row per record, in record order, each ``ok``
        or ``error`` with a message naming the image.
    """
    items = list(loaded) if loaded is not None else load_shard(records, cfg)
    if evidence is not None and bank is None:
        bank = load_bank(evidence, cfg)
    ctx = _Context(model, cfg, options, evidence, bank or {}, phases if phases is not None else {})
    good = [it for it in items if it.error is None]
    results: dict[int, dict[str, Any]] = {}
    if good:
        results = _attribute_all(ctx, [records[it.index] for it in good], good)
    with _timed(ctx.phases, "table_s"):
        rows = [_row(records[it.index], it, results.get(it.index), cfg, shard) for it in items]
        return pa.Table.from_pylist(rows, schema=maps_schema(cfg.dataset.group_by))


@contextlib.contextmanager
def _timed(phases: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0


def load_bank(evidence: ShardEvidence, cfg: AuditConfig) -> dict[str, _Loaded]:
    """Decode the bank images a shard's draws use (a bad one is left out of the draws)."""
    return {
        rec.image_id: it
        for rec, it in zip(evidence.bank, load_shard(evidence.bank, cfg), strict=True)
    }


@dataclass(frozen=True)
class _Context:
    model: Any
    cfg: AuditConfig
    options: ComputeOptions
    evidence: ShardEvidence | None
    bank: dict[str, _Loaded]
    phases: dict[str, float]  # seconds per phase, added to as the shard is computed


def _attribute_all(
    ctx: _Context, records: Sequence[Any], items: Sequence[_Loaded]
) -> dict[int, dict[str, Any]]:
    """Maps, metrics and evidence of ``items``; a batch the model fails on is retried image by
    image, so that only the image that makes it fail gets the error row."""
    cfg = ctx.cfg

    def run(part: Sequence[_Loaded], recs: Sequence[Any]) -> OcclusionResult:
        with _timed(ctx.phases, "kernel_s"):
            return occlude(
                ctx.model,
                torch.stack([it.image for it in part]),  # type: ignore[misc]  # (N, 3, H, W)
                image_ids=[rec.image_id for rec in recs],
                target=_targets(cfg, part),
                options=ctx.options,
                **kernel_keywords(cfg),
            )

    try:
        return _results(ctx, run(items, records), items, records)
    except Exception as e:
        if len(items) == 1:
            msg = f"model failed: {type(e).__name__}: {_first_line(e)}"
            return {items[0].index: {"error": f"image {records[0].image_id!r}: {msg}"}}
    # One at a time: a bounded extra cost (len(items) calls) paid only by a failing batch. With
    # fixed_batch, each image's maps are bitwise those it would get in the full batch.
    out: dict[int, dict[str, Any]] = {}
    for it, rec in zip(items, records, strict=True):
        out.update(_attribute_all(ctx, [rec], [it]))
    return out


def _first_line(e: BaseException) -> str:
    """The line of an exception's message that says what went wrong."""
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        return lines[-1][:500]  # a scripted model's own exception closes its trace
    return (lines[0] if lines else "")[:500]


def _results(
    ctx: _Context, r: OcclusionResult, items: Sequence[_Loaded], records: Sequence[Any]
) -> dict[int, dict[str, Any]]:
    cfg = ctx.cfg
    t0, evidence_before = time.perf_counter(), ctx.phases.get("evidence_s", 0.0)
    full = r.grid.expand(r.delta[:, 0])  # (N, C, H, W)
    extra = localisation_rows(full, [it.mask for it in items], [it.ignore for it in items])
    if ctx.evidence is not None:
        with _timed(ctx.phases, "evidence_s"):
            cf = evidence_rows(
                ctx.model, items, records, r, ctx.evidence, ctx.bank, cfg, ctx.options
            )
        extra = [{**a, **b} for a, b in zip(extra, cf, strict=True)]
    out: dict[int, dict[str, Any]] = {}
    for j, (it, rec) in enumerate(zip(items, records, strict=True)):
        if not bool(r.finite[j]):
            out[it.index] = {"error": f"image {rec.image_id!r}: the model returned a NaN/Inf score"}
            continue
        metrics, note = image_metrics(full[j], it.mask, cfg.audit.boundary_px, it.ignore)
        out[it.index] = {
            "target": int(r.target[j, 0]),
            "score": float(r.score[j, 0]),
            "delta": r.delta[j, 0].flatten().cpu().tolist(),
            "delta_std": r.delta_std[j, 0].flatten().cpu().tolist(),
            "approx_error": None if r.approx_error is None else float(r.approx_error[j]),
            "metrics": metrics,
            "metric_note": note,
            "grid": r.grid,
            "extra": extra[j],
        }
    evidence_s = ctx.phases.get("evidence_s", 0.0) - evidence_before
    ctx.phases["metrics_s"] = (
        ctx.phases.get("metrics_s", 0.0) + time.perf_counter() - t0 - evidence_s
    )
    return out


def _row(
    record: Any, item: _Loaded, res: dict[str, Any] | None, cfg: AuditConfig, shard: int
) -> dict[str, Any]:
    groups = dict(record.groups)
    row: dict[str, Any] = {
        "image_id": record.image_id,
        **{g: None if groups.get(g) is None else str(groups[g]) for g in cfg.dataset.group_by},
        "path": str(record.path),
        "mask": record.mask,
        "label": None if record.label is None else str(record.label),
        "shard": shard,
        "image_h": cfg.dataset.image_size[0],
        "image_w": cfg.dataset.image_size[1],
    }
    error = item.error or (res or {}).get("error")
    if error is not None or res is None:
        row.update(status=STATUS_ERROR, error=error or "not processed", **nan_metrics())
        return _nan_floats(row)
    g = res["grid"]
    row.update(
        status=STATUS_OK,
        error=None,
        target=res["target"],
        score=res["score"],
        image_c=g.image[0],
        mode=str(cfg.occlusion.mode),
        window=list(g.window),
        stride=list(g.stride),
        grid_c=g.counts[0],
        grid_h=g.counts[1],
        grid_w=g.counts[2],
        delta=res["delta"],
        delta_std=res["delta_std"],
        approx_error=res["approx_error"],
        metric_note=res["metric_note"],
        **{m: res["metrics"][m] for m in IMAGE_METRICS},
        **res["extra"],
    )
    return _nan_floats(row)


def _nan_floats(row: dict[str, Any]) -> dict[str, Any]:
    for m in FLOAT_METRICS:  # store NaN (not null) so readers see a float column
        if row.get(m) is None:
            row[m] = math.nan
    return row
