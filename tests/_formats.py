"""One small image set written in every source format by the libraries that define them:
a Parquet manifest, ``datasets`` Parquet, a COCO JSON with pycocotools RLE, WebDataset tar
shards written by ``webdataset.ShardWriter``, and an image folder."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

GROUPS = ("a", "b")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_all_formats(root: Path, n: int = 8, size: tuple[int, int] = (24, 24)) -> dict[str, Any]:
    """Write ``n`` images with rectangle masks in each format under ``root``.

    Returns paths: ``table`` (manifest.parquet), ``hf`` (datasets Parquet), ``coco`` (JSON),
    ``wds`` (brace pattern of 2 tars), ``folder`` (image folder) and ``folder_masks``, plus
    ``ids`` and ``rows`` (the per-image facts).
    """
    import datasets
    import webdataset as wds
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    h, w = size
    for sub in ("images", "masks", "folder", "folder_masks", "wds"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image_id, group = f"img{i:03d}", GROUPS[i % len(GROUPS)]
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 255
        img_bytes, mask_bytes = _png(arr), _png(mask)
        (root / "images" / f"{image_id}.png").write_bytes(img_bytes)
        (root / "masks" / f"{image_id}.png").write_bytes(mask_bytes)
        for sub, data in (("folder", img_bytes), ("folder_masks", mask_bytes)):
            (root / sub / group).mkdir(exist_ok=True)
            (root / sub / group / f"{image_id}.png").write_bytes(data)
        rows.append(
            {
                "image_id": image_id,
                "path": f"images/{image_id}.png",
                "mask_path": f"masks/{image_id}.png",
                "room": group,
                "label": str(i % 2),
                "img": img_bytes,
                "mask": mask,
                "mask_png": mask_bytes,
            }
        )
    table = pa.Table.from_pylist(
        [{k: r[k] for k in ("image_id", "path", "mask_path", "room", "label")} for r in rows]
    )
    pq.write_table(table, root / "manifest.parquet")
    # the same rows under the ids a COCO file and an image folder give them
    coco_ids = pa.array([str(i + 1) for i in range(n)], pa.string())
    pq.write_table(table.set_column(0, "image_id", coco_ids), root / "manifest_coco.parquet")
    folder_ids = pa.array([f"{r['room']}/{r['image_id']}" for r in rows], pa.string())
    pq.write_table(table.set_column(0, "image_id", folder_ids), root / "manifest_folder.parquet")

    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "room": datasets.ClassLabel(names=list(GROUPS)),
            "label": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image_id": [r["image_id"] for r in rows],
            "image": [{"bytes": r["img"], "path": None} for r in rows],
            "mask": [{"bytes": r["mask_png"], "path": None} for r in rows],
            "room": [GROUPS.index(r["room"]) for r in rows],
            "label": [r["label"] for r in rows],
        },
        features=features,
    )
    ds.to_parquet(str(root / "hf.parquet"))

    images, anns = [], []
    for i, r in enumerate(rows):
        images.append(
            {
                "id": i + 1,
                "file_name": f"images/{r['image_id']}.png",
                "height": h,
                "width": w,
                "room": r["room"],
            }
        )
        rle = coco_mask.encode(np.asfortranarray((r["mask"] > 0).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1 + i % 2,
                "segmentation": rle,
                "area": float((r["mask"] > 0).sum()),
                "bbox": [0, 0, 1, 1],
                "iscrowd": 1,
            }
        )
    cats = [
        {"id": 1, "name": "zero", "supercategory": "thing"},
        {"id": 2, "name": "one", "supercategory": "thing"},
    ]
    coco = root / "instances.json"
    coco.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))

    pattern = str(root / "wds" / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max(1, n // 2), verbose=0) as sink:
        for r in rows:
            sink.write(
                {
                    "__key__": r["image_id"],
                    "png": r["img"],
                    "mask.png": r["mask_png"],
                    "json": {"room": r["room"], "label": r["label"]},
                }
            )
    n_tars = len(list((root / "wds").glob("*.tar")))
    return {
        "table": root / "manifest.parquet",
        "table_coco": root / "manifest_coco.parquet",
        "table_folder": root / "manifest_folder.parquet",
        "hf": root / "hf.parquet",
        "coco": coco,
        "wds": str(root / "wds" / f"shard-{{000000..{n_tars - 1:06d}}}.tar"),
        "folder": root / "folder",
        "folder_masks": root / "folder_masks",
        "ids": [r["image_id"] for r in rows],
        "rows": rows,
        "coco_ids": {str(i + 1): r["image_id"] for i, r in enumerate(rows)},
    }
