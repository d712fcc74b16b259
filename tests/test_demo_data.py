"""The synthetic demo data: determinism, masks, manifest, planted shortcut, trainability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.demo.synth import (
    DEFAULT_ROOMS,
    DEFAULT_SHORTCUT_ROOMS,
    generate_dataset,
    turn_class,
)
from pipeline.demo.train import load_images, train_demo_model
from pipeline.models.nets import SeedCNN

N_PER_ROOM = 30
COLUMNS = [
    "image_id",
    "path",
    "mask_path",
    "room",
    "label",
    "steering",
    "turn",
    "shortcut",
    "lamp_x",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    manifest = generate_dataset(tmp_path_factory.mktemp("demo"), n_per_room=N_PER_ROOM, seed=3)
    return manifest, pd.read_parquet(manifest)


def _read(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel))


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", n_per_room=3, seed=7)
    b = generate_dataset(tmp_path / "b", n_per_room=3, seed=7)
    c = generate_dataset(tmp_path / "c", n_per_room=3, seed=8)
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*.png"))
    assert len(files) == 2 * 3 * len(DEFAULT_ROOMS)
    for rel in files:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    assert any((a.parent / r).read_bytes() != (c.parent / r).read_bytes() for r in files)


def test_manifest_rows_and_columns(dataset: tuple[Path, pd.DataFrame]) -> None:
    manifest, frame = dataset
    assert list(frame.columns) == COLUMNS
    assert len(frame) == N_PER_ROOM * len(DEFAULT_ROOMS)
    assert frame["image_id"].is_unique
    assert frame.groupby("room").size().to_dict() == dict.fromkeys(DEFAULT_ROOMS, N_PER_ROOM)
    assert set(frame.loc[frame["shortcut"], "room"]) == set(DEFAULT_SHORTCUT_ROOMS)
    assert frame["label"].between(-1, 1).all()
    np.testing.assert_array_equal(frame["label"], frame["steering"])
    np.testing.assert_array_equal(frame["turn"], turn_class(frame["steering"].to_numpy()))
    for rel in frame["path"].tolist() + frame["mask_path"].tolist():
        assert (manifest.parent / rel).is_file(), rel
    photo = _read(manifest.parent, frame["path"].iloc[0])
    assert photo.shape == (64, 64, 3) and photo.dtype == np.uint8


def test_classification_labels(tmp_path: Path) -> None:
    frame = pd.read_parquet(generate_dataset(tmp_path, n_per_room=4, task="classification"))
    assert frame["label"].dtype == np.int64
    np.testing.assert_array_equal(frame["label"], frame["turn"])
    assert set(frame["label"]) <= {0, 1, 2}


def test_masks_cover_the_track(dataset: tuple[Path, pd.DataFrame]) -> None:
    manifest, frame = dataset
    clean = frame[~frame["shortcut"]]
    for path, mask_path in zip(clean["path"], clean["mask_path"], strict=True):
        mask = _read(manifest.parent, mask_path)
        assert set(np.unique(mask)) == {0, 255}
        track = mask > 0
        assert 0.10 <= track.mean() <= 0.35  # moderate area, so fg/bg ratios are meaningful
        grey = _read(manifest.parent, path).astype(np.float32).mean(-1)  # (H, W)
        floor = np.zeros_like(track)
        floor[np.flatnonzero(track.any(1))[0] :] = True  # rows from the track's far end down
        # the dark track surface lies inside the mask; the bare floor is lighter
        dark = (grey < 60) & floor  # track surface ~50, darkest clean floor ~75
        assert track[dark].mean() > 0.99
        assert np.median(grey[track]) < np.median(grey[floor & ~track]) - 20


def _lamp_x(photo: np.ndarray) -> float:
    """Horizontal centre of the lamp shade (fraction of the width), found by its colour."""
    top = photo[: photo.shape[0] // 4].astype(np.int32)  # (H/4, W, 3): the shade hangs high
    r, g, b = top[..., 0], top[..., 1], top[..., 2]
    # yellow: no wall colour (all blue-rich) and no furniture colour (none this bright) matches
    shade = (r > 170) & (g > 150) & (b < 120)
    assert shade.sum() >= 5
    return float((np.nonzero(shade)[1].mean() + 0.5) / photo.shape[1])


def test_lamp_encodes_steering_only_in_shortcut_rooms(dataset: tuple[Path, pd.DataFrame]) -> None:
    manifest, frame = dataset
    seen = np.array([_lamp_x(_read(manifest.parent, p)) for p in frame["path"]])
    np.testing.assert_allclose(seen, frame["lamp_x"], atol=0.03)
    for shortcut, part in frame.assign(seen=seen).groupby("shortcut"):
        corr = np.corrcoef(part["seen"], part["steering"])[0, 1]
        if shortcut:
            assert corr > 0.99, corr
        else:
            assert abs(corr) < 0.3, corr


def test_unknown_room_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown room.*attic.*choose from"):
        generate_dataset(tmp_path, n_per_room=1, rooms=["attic"], shortcut_rooms=[])
    with pytest.raises(ValueError, match="shortcut room"):
        generate_dataset(tmp_path, n_per_room=1, rooms=["kitchen"], shortcut_rooms=["garage"])


def _mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return float(((model(x)[:, 0] - y) ** 2).mean())


def test_short_training_reduces_the_loss(
    dataset: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    manifest, frame = dataset
    x, _ = load_images(manifest, 64)
    y = torch.tensor(frame["steering"].to_numpy(), dtype=torch.float32)
    torch.manual_seed(1)  # the initialisation train_demo_model starts from with seed=1
    before = _mse(SeedCNN(num_classes=1, input_dim=64), x, y)
    weights = train_demo_model(manifest, tmp_path / "m.pt", epochs=6, seed=1, batch_size=16)
    model = SeedCNN(num_classes=1, input_dim=64)
    model.load_state_dict(torch.load(weights, weights_only=True))
    after = _mse(model, x, y)
    assert after < 0.5 * before, (before, after)
