"""Hand-built run directories with known answers: real Parquet parts, run.json, PNG images/masks.

Per-image metrics are chosen, not computed, so the per-group answers are known in advance; the
``delta`` grids are shaped to match (background windows matter more in background-reliant rows)
so that the report's overlays look like what they describe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.schema import STATUS_ERROR, STATUS_OK, maps_schema

IMAGE_SIZE = 32  # pixels after resize (square)
ORIGINAL_SIZE = 48  # pixels of the PNGs on disk, so loading has to resize
WINDOW, STRIDE = 8, 4  # pixels; ceil((32 - 8) / 4) + 1 = 7 window positions per axis
GRID = math.ceil((IMAGE_SIZE - WINDOW) / STRIDE) + 1
OBJECT_BOX = (12, 12, 36, 36)  # x0, y0, x1, y1 of the foreground square in original pixels


def spread_ratios(center: float, spread: float, n: int) -> np.ndarray:
    """``n`` ratios whose logs are evenly spaced normal quantiles: mean log is exactly log(center).

    Args:
        center: geometric mean of the result (unitless ratio).
        spread: standard deviation of the log-ratios.
        n: how many.

    Returns:
        (n,) float64 ratios, symmetric in log space around ``log(center)``.
    """
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    z -= z.mean()  # exact symmetry despite rounding in inv_cdf
    return np.exp(math.log(center) + spread * z)


def _delta(ratio: float) -> list[float]:
    """A window-delta grid whose centre (object) windows weigh ``ratio`` against the rest."""
    centre = (np.arange(GRID) * STRIDE + WINDOW / 2) * ORIGINAL_SIZE / IMAGE_SIZE
    inside = (centre > OBJECT_BOX[0]) & (centre < OBJECT_BOX[2])
    fg = np.outer(inside, inside)
    grid = np.where(fg, ratio, 1.0) if math.isfinite(ratio) and ratio > 0 else np.zeros_like(fg)
    return grid.astype(np.float32).ravel().tolist()


def make_row(
    image_id: str,
    groups: Mapping[str, str | None],
    ratio: float,
    *,
    fg_share: float = 0.3,
    fg_area: float = 0.25,
    ratio_pos: float | None = None,
    error: str | None = None,
    note: str | None = None,
    mask: str | None = None,
) -> dict[str, Any]:
    """One stored row (``maps_schema`` fields); ``error`` makes it an error row without metrics."""
    metrics: dict[str, float | None] = {
        "fg_share": fg_share,
        "fg_area": fg_area,
        "fg_bg_ratio": ratio,
        "fg_share_pos": fg_share,
        "fg_bg_ratio_pos": ratio if ratio_pos is None else ratio_pos,
    }
    if error is not None:
        metrics = dict.fromkeys(metrics)
    return {
        "image_id": image_id,
        **groups,
        "path": f"images/{image_id}.png",
        "mask": mask,
        "label": "1",
        "target": 0,
        "score": 2.5,
        "status": STATUS_ERROR if error else STATUS_OK,
        "error": error,
        "image_h": IMAGE_SIZE,
        "image_w": IMAGE_SIZE,
        "image_c": 3,
        "window": [3, WINDOW, WINDOW],
        "stride": [3, STRIDE, STRIDE],
        "grid_c": 1,
        "grid_h": None if error else GRID,
        "grid_w": None if error else GRID,
        "delta": None if error else _delta(ratio),
        "delta_std": None if error else [0.0] * GRID * GRID,
        **metrics,
        "metric_note": note,
        "shard": 0,
    }


def write_images(root: Path, image_ids: Iterable[str], masks: bool = True) -> None:
    """A PNG per image (a bright square object on a textured background) and its mask PNG."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    x0, y0, x1, y1 = OBJECT_BOX
    for k, image_id in enumerate(image_ids):
        rng = np.random.default_rng(k)
        img = (rng.random((ORIGINAL_SIZE, ORIGINAL_SIZE, 3)) * 90).astype(np.uint8)
        img[y0:y1, x0:x1] = (230, 160 + k % 60, 40)
        Image.fromarray(img).save(root / "images" / f"{image_id}.png")
        if masks:
            mask = np.zeros((ORIGINAL_SIZE, ORIGINAL_SIZE), np.uint8)
            mask[y0:y1, x0:x1] = 255
            Image.fromarray(mask).save(root / "masks" / f"{image_id}.png")


def write_run(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    group_by: Sequence[str],
    *,
    parts: int = 1,
    name: str = "test-run",
    audit: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``rows`` as ``parts`` contiguous Parquet shards plus a run.json; returns ``run_dir``.

    Args:
        run_dir: folder to create; images, if any, live in ``run_dir / "data"``.
        rows: rows from :func:`make_row`, in manifest order.
        group_by: the group columns present in the rows.
        parts: number of ``maps/part-NNNNN.parquet`` files (shards of near-equal size).
        name: run name.
        audit: overrides of ``config.audit``.
        extra: top-level run.json keys to add or replace.
    """
    maps = run_dir / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    schema = maps_schema(group_by)
    bounds = np.linspace(0, len(rows), parts + 1).round().astype(int)
    for k in range(parts):
        shard = [{**r, "shard": k} for r in rows[bounds[k] : bounds[k + 1]]]
        pq.write_table(pa.Table.from_pylist(shard, schema=schema), maps / f"part-{k:05d}.parquet")
    errors = [r for r in rows if r["status"] == STATUS_ERROR]
    info: dict[str, Any] = {
        "name": name,
        "config": {
            "name": name,
            "dataset": {
                "manifest": "data/manifest.parquet",
                "root": str(run_dir / "data"),
                "columns": {"id": "image_id", "path": "path", "mask": "mask"},
                "group_by": list(group_by),
                "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            },
            "model": {"torchscript": "models/<tiny>.pt", "task": "classification"},
            "occlusion": {
                "window": [WINDOW, WINDOW],
                "stride": [STRIDE, STRIDE],
                "baseline": "random-pixel",
                "n_baselines": 3,
                "seed": 0,
            },
            "audit": {
                "threshold": 1.0,
                "min_images": 20,
                "confidence": 0.95,
                "boundary_px": 0,
                "bootstrap": 1000,
                "seed": 0,
                **(audit or {}),
            },
            "output": {"dir": str(run_dir)},
        },
        "versions": {"torch": "2.13.0", "pyarrow": pa.__version__},
        "model_hash": "sha256:0123abcd",
        "engine": "local",
        "counts": {"images": len(rows), "ok": len(rows) - len(errors), "error": len(errors)},
        "timings": {"total_s": 12.5, "images_per_s": len(rows) / 12.5},
        "failures": [{"image_id": r["image_id"], "error": r["error"]} for r in errors],
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:00:12+00:00",
        **(extra or {}),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return run_dir


def standard_rows() -> list[dict[str, Any]]:
    """Rooms with known verdicts at threshold 1, min_images 20.

    kitchen: 48 ratios around 0.5 (flagged) plus 2 NaN and 2 error rows; bath: 40 around 2 (ok);
    hall: 40 centred on 1 with spread (inconclusive); garage: 6 (too-few).
    """
    rows: list[dict[str, Any]] = []
    for room, center, spread, n in (
        ("kitchen", 0.5, 0.3, 48),
        ("bath", 2.0, 0.3, 40),
        ("hall", 1.0, 0.6, 40),
        ("garage", 0.5, 0.3, 6),
    ):
        for i, r in enumerate(spread_ratios(center, spread, n)):
            mask = f"masks/{room}-{i:03d}.png" if i % 2 == 0 else "box:12,12,36,36"
            rows.append(make_row(f"{room}-{i:03d}", {"room": room}, float(r), mask=mask))
    rows += [
        make_row("kitchen-nan0", {"room": "kitchen"}, math.nan, note="foreground mask is empty"),
        make_row("kitchen-nan1", {"room": "kitchen"}, math.nan, note="map is all zero"),
        make_row("kitchen-err0", {"room": "kitchen"}, math.nan, error="cannot decode image: EOF"),
        make_row("kitchen-err1", {"room": "kitchen"}, math.nan, error="mask missing: m.png"),
    ]
    # interleave rooms, as a manifest would, so every shard holds several groups
    order = np.random.default_rng(7).permutation(len(rows))
    return [rows[i] for i in order]
