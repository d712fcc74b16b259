"""A generated two-class set without masks where half of class 0 carries a corner watermark that
a small model learns, for the strategy-discovery tests.

Class 0 draws a plus, class 1 a ring, each at a random place on noise. In half of the class-0
images the plus is almost invisible and a bright square sits in the top-left corner: the only
way to recognise those is the watermark, so the trained model relies on it there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from pipeline.models.nets import SeedCNNWithGAP

SIZE = 32
MARK = (slice(1, 7), slice(1, 7))  # the watermark: top-left corner


def _image(rng: np.random.Generator, label: int, marked: bool) -> np.ndarray:
    img = rng.uniform(0.3, 0.5, (SIZE, SIZE, 3))
    y, x = rng.integers(10, SIZE - 10, size=2)
    contrast = 0.04 if marked else 0.5
    if label == 0:  # a plus
        img[y - 5 : y + 6, x - 1 : x + 2] += contrast
        img[y - 1 : y + 2, x - 5 : x + 6] += contrast
    else:  # a ring
        yy, xx = np.mgrid[:SIZE, :SIZE]
        ring = np.abs(np.hypot(yy - y, xx - x) - 4.5) < 1.2
        img[ring] += contrast
    if marked:
        img[MARK] = 0.98
    return np.clip(img, 0, 1)


def make_set(root: Path, n_per_class: int, seed: int) -> Path:
    """Write PNGs and a manifest (no mask column); returns the manifest path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label in (0, 1):
        for i in range(n_per_class):
            marked = label == 0 and i % 2 == 0
            name = f"c{label}-{i:03d}"
            arr = (_image(rng, label, marked) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "images" / f"{name}.png")
            rows.append({"image_id": name, "path": f"images/{name}.png", "label": str(label),
                         "marked": str(marked)})  # fmt: skip
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def train(root: Path, out: Path, epochs: int = 30, seed: int = 0) -> Path:
    """Train ``SeedCNNWithGAP(num_classes=2)`` on a set from :func:`make_set`."""
    table = pq.read_table(root / "manifest.parquet").to_pylist()
    arrays = [np.asarray(Image.open(root / r["path"]), dtype=np.float32) / 255 for r in table]
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])  # (N, 3, H, W)
    y = torch.tensor([int(r["label"]) for r in table])
    torch.manual_seed(seed)
    model = SeedCNNWithGAP(num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            b = perm[i : i + 32]
            opt.zero_grad()
            loss_fn(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    torch.save(model.state_dict(), out)
    assert accuracy > 0.9, f"the watermark model did not fit: accuracy {accuracy:.2f}"
    return out
