"""Small real image sets on disk for runner tests: PNG images, PNG masks, a Parquet manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.models.nets import SeedCNNWithGAP


def make_image_set(
    root: Path, n: int = 20, size: tuple[int, int] = (24, 24), groups: tuple[str, ...] = ("a", "b")
) -> Path:
    """Write ``n`` random RGB images with rectangular masks under ``root``; return the manifest."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    h, w = size
    for i in range(n):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"img{i:03d}.png")
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 255
        Image.fromarray(mask).save(root / "masks" / f"img{i:03d}.png")
        rows.append(
            {
                "image_id": f"img{i:03d}",
                "path": f"images/img{i:03d}.png",
                "mask_path": f"masks/img{i:03d}.png",
                "room": groups[i % len(groups)],
                "label": str(i % 2),
            }
        )
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def image_set_with_model(root: Path, n: int = 20) -> Path:
    """An image set (``make_image_set``) with its ``model.pt`` beside it; returns ``root``."""
    make_image_set(root, n=n)
    save_gap_model(root / "model.pt")
    return root


def save_gap_model(path: Path, num_classes: int = 2, seed: int = 0) -> Path:
    """A seeded ``SeedCNNWithGAP`` state_dict (works at any image size)."""
    torch.manual_seed(seed)
    torch.save(SeedCNNWithGAP(num_classes=num_classes).state_dict(), path)
    return path


def audit_config(root: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """A config mapping for the image set under ``root``; ``sections`` update its sections."""
    cfg: dict[str, Any] = {
        "name": "test-audit",
        "dataset": {
            "manifest": str(root / "manifest.parquet"),
            "root": str(root),
            "group_by": ["room"],
            "image_size": [24, 24],
        },
        "model": {
            "factory": "pipeline.models:SeedCNNWithGAP",
            "kwargs": {"num_classes": 2},
            "weights": str(root / "model.pt"),
        },
        "occlusion": {"window": [8, 8], "stride": [4, 4], "n_baselines": 2, "max_batch": 64},
        "cluster": {"shard_size": 7, "actors": 1},
        "audit": {"min_images": 3},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def stored_deltas(run_dir: Path, n: int) -> np.ndarray:
    """The stored maps of images ``img000`` .. of a run over :func:`make_image_set`, in id
    order, after checking every one of the ``n`` images is stored exactly once.

    Returns:
        ``(n, grid_c * grid_h * grid_w)`` score drops.
    """
    from pipeline import read_maps

    maps = read_maps(run_dir).set_index("image_id").sort_index()
    assert list(maps.index) == [f"img{i:03d}" for i in range(n)]
    return np.stack(maps["delta"].to_list())
