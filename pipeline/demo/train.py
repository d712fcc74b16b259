"""Train the demo model: a small ``SeedCNN`` steering regressor on the synthetic dataset.

``prepare_demo(out_dir)`` writes everything the demo audit needs, in the layout that
``pipeline/demo/demo.yaml`` refers to::

    out_dir/data/train/   manifest.parquet, images/, masks/   (training views, seed)
    out_dir/data/audit/   manifest.parquet, images/, masks/   (held-out views, seed + 1)
    out_dir/model/seed_cnn_demo.pt                           (SeedCNN state_dict)

``python -m pipeline.demo.train --out model.pt`` generates the default training data in a
temporary folder and trains the same weights (about 30 s on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from pipeline.demo.synth import generate_dataset
from pipeline.models.nets import SeedCNN

__all__ = ["DemoFiles", "load_images", "main", "prepare_demo", "train_demo_model"]

#: Defaults of the demo: 64x64 views, 200 training and 40 audited views per room.
IMAGE_SIZE = 64
N_TRAIN_PER_ROOM = 200
N_AUDIT_PER_ROOM = 40
EPOCHS = 12


def load_images(
    manifest: str | Path, image_size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, pd.DataFrame]:
    """Read every image of a demo manifest.

    Returns:
        ``(x, frame)``: ``x`` is ``(N, 3, image_size, image_size)`` float32 in [0, 1], in
        manifest order; ``frame`` is the manifest.
    """
    manifest = Path(manifest)
    frame = pd.read_parquet(manifest)
    root = manifest.parent
    arrays = []
    for rel in frame["path"]:
        img = Image.open(root / rel).convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return x.float().div_(255.0), frame


def _targets(frame: pd.DataFrame, task: str) -> torch.Tensor:
    if task == "regression":
        return torch.tensor(frame["steering"].to_numpy(), dtype=torch.float32)[:, None]  # (N, 1)
    if task == "classification":
        return torch.tensor(frame["turn"].to_numpy(), dtype=torch.int64)  # (N,)
    raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")


def train_demo_model(
    manifest: str | Path,
    out_path: str | Path,
    *,
    epochs: int = EPOCHS,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    task: str = "regression",
    batch_size: int = 32,
    lr: float = 1e-3,
    log: bool = False,
    net: nn.Module | None = None,
) -> Path:
    """Train ``SeedCNN`` (or ``net``) on a demo manifest and save its ``state_dict``.

    Args:
        manifest: ``manifest.parquet`` written by ``generate_dataset``.
        out_path: where to write the weights (``torch.save(model.state_dict(), out_path)``).
        epochs: passes over the data; the default converges in well under a minute for 1,200
            64x64 images on 2 CPU threads.
        seed: seeds initialisation, dropout and batch order.
        image_size: input side in pixels (divisible by 8); images are resized if needed.
        task: ``"regression"`` (``SeedCNN(num_classes=1)``, MSE on the steering) or
            ``"classification"`` (``num_classes=3``, cross-entropy on ``turn``).
        batch_size: images per optimiser step.
        lr: Adam learning rate.
        log: print the mean training loss of each epoch.
        net: the network to train instead of ``SeedCNN``, freshly initialised, with one output
            for ``regression`` or three for ``classification``; trained in place.

    Returns:
        ``out_path`` as a ``Path``.

    Example:
        >>> train_demo_model("demo-data/manifest.parquet", "demo.pt", epochs=2)  # doctest: +SKIP
    """
    x, frame = load_images(manifest, image_size)
    y = _targets(frame, task)
    torch.manual_seed(seed)
    classes = 1 if task == "regression" else 3
    model = SeedCNN(num_classes=classes, input_dim=image_size) if net is None else net
    loss_fn: nn.Module = nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            # Mirroring flips the track, the lamp and the sign of the steering together, so it
            # keeps the planted shortcut intact while doubling the data.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            if task == "regression":
                yb = torch.where(flip[:, None], -yb, yb)
            else:
                yb = torch.where(flip, 2 - yb, yb)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if log:
            print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


@dataclass(frozen=True)
class DemoFiles:
    """What ``prepare_demo`` wrote (absolute paths)."""

    train_manifest: Path  # training views
    audit_manifest: Path  # held-out views to audit
    weights: Path  # SeedCNN state_dict


def prepare_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train_per_room: int = N_TRAIN_PER_ROOM,
    n_audit_per_room: int = N_AUDIT_PER_ROOM,
    epochs: int = EPOCHS,
    image_size: int = IMAGE_SIZE,
    log: bool = False,
) -> DemoFiles:
    """Generate the demo's training and audit data and train the demo model under ``out_dir``.

    The audited views come from a different seed than the training views, so the audit sees
    images the model was not fitted to. Call ``torch.set_num_threads`` first to bound CPU use.

    Returns:
        The three paths, in the layout described in this module's docstring.

    Example:
        >>> files = prepare_demo("demo-out")  # doctest: +SKIP
        >>> files.weights.name  # doctest: +SKIP
        'seed_cnn_demo.pt'
    """
    out = Path(out_dir).resolve()
    size = (image_size, image_size)
    train = generate_dataset(out / "data" / "train", n_train_per_room, image_size=size, seed=seed)
    audit = generate_dataset(
        out / "data" / "audit", n_audit_per_room, image_size=size, seed=seed + 1
    )
    weights = train_demo_model(
        train,
        out / "model" / "seed_cnn_demo.pt",
        epochs=epochs,
        seed=seed,
        image_size=image_size,
        log=log,
    )
    return DemoFiles(train_manifest=train, audit_manifest=audit, weights=weights)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the default training data and train the demo weights into ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo.train", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("seed_cnn_demo.pt"), help="weights file")
    parser.add_argument("--data", type=Path, default=None, help="keep the training data here")
    parser.add_argument("--n-per-room", type=int, default=N_TRAIN_PER_ROOM)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["regression", "classification"], default="regression")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    # the thread count changes the float summation order, hence the exact weights
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        size = (args.image_size, args.image_size)
        manifest = generate_dataset(
            data, n_per_room=args.n_per_room, image_size=size, seed=args.seed, task=args.task
        )
        start = time.perf_counter()
        out = train_demo_model(
            manifest,
            args.out,
            epochs=args.epochs,
            seed=args.seed,
            image_size=args.image_size,
            task=args.task,
            log=True,
        )
        print(f"trained in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
