"""One shard: decode images, compute occlusion maps and metrics, build its Parquet table.

This is the whole per-shard computation without Ray, so that the Ray path and a direct local call
give the same answer (the Ray worker only adds model loading and the atomic write).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from pipeline.baselines import Baseline
from pipeline.images import DataError, load_image, load_mask
from pipeline.metrics import image_metrics, nan_metrics
from pipeline.occlusion import attribute
from pipeline.schema import IMAGE_METRICS, STATUS_ERROR, STATUS_OK, maps_schema

__all__ = ["ShardSpec", "error_table", "load_shard", "process_shard"]


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to process any shard (built once from the run config)."""

    root: str | None  # images/masks resolve against this folder or URI
    image_size: tuple[int, int]  # (H, W) after resize, pixels
    group_by: tuple[str, ...]  # manifest columns stored with each row
    window: tuple[int, ...]  # [h, w] or [c, h, w]
    stride: tuple[int, ...]
    baseline: str = Baseline.RANDOM_PIXEL.value
    n_baselines: int = 3
    seed: int = 0
    value: Any = None  # constant baseline value
    blur_sigma: float = 4.0
    precision: str = "fp32"
    max_batch: int | None = None  # None: pipeline.occlusion.default_max_batch
    channels_last: bool = False
    engine: str = "auto"  # auto | generic | incremental
    task: str = "classification"
    score: str = "logit"
    target: str | int = "predicted"  # "predicted" | "label" | output index
    boundary_px: int = 0
    io_threads: int = 4  # decode threads; Pillow releases the GIL while decoding
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Loaded:
    index: int
    image: torch.Tensor | None = None  # (3, H, W)
    mask: torch.Tensor | None = None  # (H, W) bool
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


def _load(i: int, record: Any, spec: ShardSpec) -> _Loaded:
    item = _Loaded(i)
    try:
        img, orig = load_image(record.path, spec.root, spec.image_size, image_id=record.image_id)
        if record.mask is not None or record.box is not None:
            item.mask = load_mask(
                record.mask,
                record.box,
                spec.root,
                spec.image_size,
                orig,
                image_id=record.image_id,
            )
        item.target = _label_target(record) if spec.target == "label" else None
        item.image = img
    except DataError as e:
        item.error = str(e)
    except Exception as e:  # an unexpected decoder failure still names the image
        item.error = f"image {record.image_id!r} ({record.path}): {type(e).__name__}: {e}"
    return item


def _targets(spec: ShardSpec, items: Sequence[_Loaded]) -> Any:
    if spec.target == "label":
        return [it.target for it in items]
    return spec.target


def load_shard(records: Sequence[Any], spec: ShardSpec) -> list[_Loaded]:
    """Decode and resize the images and masks of a shard (I/O bound; no model needed).

    A failure is kept on its item as a message naming the image, never raised.
    """
    with ThreadPoolExecutor(max_workers=max(1, spec.io_threads)) as pool:
        return list(pool.map(lambda ir: _load(ir[0], ir[1], spec), enumerate(records)))


def process_shard(
    model: Any,
    records: Sequence[Any],
    spec: ShardSpec,
    shard: int,
    loaded: Sequence[_Loaded] | None = None,
    engine: Any = None,
) -> pa.Table:
    """Compute the stored rows of one shard.

    Args:
        model: pixel-space model (normalisation inside), already on its device.
        records: manifest records (``image_id, path, groups, label, mask, box``) in order.
        spec: per-run settings.
        shard: shard index, stored with each row.
        loaded: the result of :func:`load_shard` for these records, if already done.
        engine: an occluded-forward engine for :func:`pipeline.attribute` (None: generic).

    Returns:
        A table with ``maps_schema(spec.group_by)``: one row per record, in record order, each
        ``ok`` or ``error`` with a message naming the image.
    """
    items = list(loaded) if loaded is not None else load_shard(records, spec)
    good = [it for it in items if it.error is None]
    results: dict[int, dict[str, Any]] = {}
    if good:
        results = _attribute_all(model, [records[it.index] for it in good], good, spec, engine)
    rows = [_row(records[it.index], it, results.get(it.index), spec, shard) for it in items]
    return pa.Table.from_pylist(rows, schema=maps_schema(spec.group_by))


def _attribute_all(
    model: Any,
    records: Sequence[Any],
    items: Sequence[_Loaded],
    spec: ShardSpec,
    engine: Any = None,
) -> dict[int, dict[str, Any]]:
    images = torch.stack([it.image for it in items])  # (N, 3, H, W)
    try:
        r = attribute(
            model,
            images,
            window=spec.window,
            stride=spec.stride,
            baseline=spec.baseline,
            n_baselines=spec.n_baselines,
            seed=spec.seed,
            image_ids=[rec.image_id for rec in records],
            target=_targets(spec, items),
            task=spec.task,
            score=spec.score,
            value=spec.value,
            blur_sigma=spec.blur_sigma,
            max_batch=spec.max_batch,
            precision=spec.precision,
            channels_last=spec.channels_last,
            on_nonfinite="nan",
            fixed_batch=True,
            engine=engine,
        )
    except Exception as e:
        # A model that fails on this batch fails on every image of it: record, don't crash.
        msg = f"model failed: {type(e).__name__}: {e}"
        return {
            it.index: {"error": f"image {rec.image_id!r}: {msg}"}
            for it, rec in zip(items, records, strict=True)
        }
    full = r.grid.expand(r.delta[:, 0])  # (N, C, H, W)
    out: dict[int, dict[str, Any]] = {}
    for j, (it, rec) in enumerate(zip(items, records, strict=True)):
        if not bool(r.finite[j]):
            out[it.index] = {"error": f"image {rec.image_id!r}: the model returned a NaN/Inf score"}
            continue
        metrics, note = image_metrics(full[j], it.mask, spec.boundary_px)
        out[it.index] = {
            "target": int(r.target[j, 0]),
            "score": float(r.score[j, 0]),
            "delta": r.delta[j, 0].flatten().cpu().tolist(),
            "delta_std": r.delta_std[j, 0].flatten().cpu().tolist(),
            "metrics": metrics,
            "metric_note": note,
            "grid": r.grid,
        }
    return out


def _mask_text(record: Any) -> str | None:
    if record.mask is not None:
        return str(record.mask)
    if record.box is not None:
        return "box:" + ",".join(f"{v:g}" for v in record.box)
    return None


def _row(
    record: Any, item: _Loaded, res: dict[str, Any] | None, spec: ShardSpec, shard: int
) -> dict[str, Any]:
    groups = dict(record.groups)
    row: dict[str, Any] = {
        "image_id": record.image_id,
        **{g: None if groups.get(g) is None else str(groups[g]) for g in spec.group_by},
        "path": str(record.path),
        "mask": _mask_text(record),
        "label": None if record.label is None else str(record.label),
        "shard": shard,
        "image_h": spec.image_size[0],
        "image_w": spec.image_size[1],
    }
    error = item.error or (res or {}).get("error")
    if error is not None or res is None:
        row.update(status=STATUS_ERROR, error=error or "not processed", **nan_metrics())
        return row
    g = res["grid"]
    row.update(
        status=STATUS_OK,
        error=None,
        target=res["target"],
        score=res["score"],
        image_c=g.image[0],
        window=list(g.window),
        stride=list(g.stride),
        grid_c=g.counts[0],
        grid_h=g.counts[1],
        grid_w=g.counts[2],
        delta=res["delta"],
        delta_std=res["delta_std"],
        metric_note=res["metric_note"],
        **{m: res["metrics"][m] for m in IMAGE_METRICS},
    )
    for m in IMAGE_METRICS:  # store NaN (not null) so readers see a float column
        if row[m] is None:
            row[m] = math.nan
    return row


def error_table(records: Sequence[Any], spec: ShardSpec, shard: int, message: str) -> pa.Table:
    """Rows marking every image of a failed shard as ``error`` with ``message``."""
    rows = [
        _row(rec, _Loaded(i, error=f"image {rec.image_id!r}: {message}"), None, spec, shard)
        for i, rec in enumerate(records)
    ]
    return pa.Table.from_pylist(rows, schema=maps_schema(spec.group_by))
