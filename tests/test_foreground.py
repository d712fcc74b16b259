"""Foreground sources against hand-computed metrics: VOC-style palette masks with an ignore
value, several boxes per image, and one static region or mask for every image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config.dataset import ColumnsConfig, DatasetConfig
from pipeline.data.detect import open_source
from pipeline.data.foreground import load_item
from pipeline.data.images import DataError
from pipeline.data.plan import plan_source
from pipeline.kernel.metrics import image_metrics

H = W = 8
ROWS = torch.arange(1, H + 1, dtype=torch.float32)[:, None].expand(H, W)  # I(y, x) = y + 1


def _image(path: Path) -> None:
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path)


def _records(tmp_path: Path, table: dict, **kw) -> tuple[list, DatasetConfig]:
    pq.write_table(pa.table(table), tmp_path / "m.parquet")
    cfg = DatasetConfig(manifest=str(tmp_path / "m.parquet"), image_size=(H, W), **kw)
    source = open_source(cfg)
    refs = plan_source(source, 100).shards
    return [r for ref in refs for r in source.read(ref)], cfg


def _voc_mask(path: Path) -> None:
    """Class 15 in rows 0-1, the 255 border in row 2, background (0) and class 7 below."""
    arr = np.zeros((H, W), np.uint8)
    arr[0:2] = 15
    arr[2] = 255
    arr[6:] = 7
    img = Image.fromarray(arr, mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)


def test_palette_mask_with_foreground_values_and_an_ignore_border(tmp_path) -> None:
    _image(tmp_path / "a.png")
    _voc_mask(tmp_path / "m.png")
    (rec,), cfg = _records(
        tmp_path,
        {"image_id": ["a"], "path": ["a.png"], "mask_path": ["m.png"]},
        foreground_values=(15,),
        ignore_value=255,
    )
    item = load_item(rec, cfg)
    assert item.fg.sum() == 16 and item.fg[:2].all()
    assert item.ignore is not None and item.ignore[2].all() and item.ignore.sum() == 8
    metrics, note = image_metrics(ROWS, item.fg, 0, item.ignore)
    # fg rows 1, 2 -> mean 1.5; bg rows 4..8 (row 3 ignored) -> mean 6
    assert note is None and metrics["fg_bg_ratio"] == pytest.approx(1.5 / 6.0)
    assert metrics["fg_share"] == pytest.approx((1 + 2) * 8 / ((1 + 2 + 4 + 5 + 6 + 7 + 8) * 8))
    assert metrics["fg_area"] == pytest.approx(16 / 64)
    # without the ignore value the border is background: bg mean (3+...+8)/6
    (rec,), cfg = _records(
        tmp_path,
        {"image_id": ["a"], "path": ["a.png"], "mask_path": ["m.png"]},
        foreground_values=(15,),
    )
    item = load_item(rec, cfg)
    assert item.ignore is None
    assert image_metrics(ROWS, item.fg)[0]["fg_bg_ratio"] == pytest.approx(1.5 / 5.5)


def test_a_value_list_that_matches_nothing_is_a_named_error(tmp_path) -> None:
    _image(tmp_path / "a.png")
    _voc_mask(tmp_path / "m.png")
    (rec,), cfg = _records(
        tmp_path,
        {"image_id": ["a"], "path": ["a.png"], "mask_path": ["m.png"]},
        foreground_values=(3, 4),
    )
    with pytest.raises(
        DataError, match=r"'a'.*values \[0, 7, 15, 255\] include none of .*\[3, 4\]"
    ):
        load_item(rec, cfg)


def test_several_boxes_per_image_are_their_union(tmp_path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    boxes = [[[0, 0, 2, 2], [6, 6, 8, 8]], []]
    (a, b), cfg = _records(
        tmp_path,
        {"image_id": ["a", "b"], "path": ["a.png", "b.png"], "boxes": boxes},
        columns=ColumnsConfig(boxes="boxes"),
    )
    fg = load_item(a, cfg).fg
    assert fg.sum() == 8 and fg[:2, :2].all() and fg[6:, 6:].all()
    metrics, note = image_metrics(ROWS, fg)
    fg_mean = (1 + 2 + 7 + 8) * 2 / 8
    bg_mean = (ROWS.sum() - (1 + 2 + 7 + 8) * 2) / 56
    assert note is None and metrics["fg_bg_ratio"] == pytest.approx(fg_mean / float(bg_mean))
    # an empty list of boxes is an empty foreground: metrics NaN with the reason
    metrics, note = image_metrics(ROWS, load_item(b, cfg).fg)
    assert note == "empty foreground mask" and math.isnan(metrics["fg_bg_ratio"])


def test_a_static_region_is_every_images_foreground(tmp_path) -> None:
    for name in ("a", "b"):
        Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / f"{name}.png")
    recs, cfg = _records(
        tmp_path,
        {"image_id": ["a", "b"], "path": ["a.png", "b.png"]},
        static_region=(0.0, 0.5, 1.0, 1.0),  # the lower half: the road ahead
    )
    plan = plan_source(open_source(cfg), 10)
    assert plan.with_fg == 2
    for rec in recs:
        fg = load_item(rec, cfg).fg
        assert fg[4:].all() and not fg[:4].any()
        metrics, _ = image_metrics(ROWS, fg)
        assert metrics["fg_bg_ratio"] == pytest.approx((5 + 6 + 7 + 8) / 4 / ((1 + 2 + 3 + 4) / 4))


def test_a_static_mask_file_is_resized_to_the_model_input(tmp_path) -> None:
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((4, 4), np.uint8)
    m[:, :2] = 255  # the left half
    Image.fromarray(m).save(tmp_path / "static.png")
    (rec,), cfg = _records(
        tmp_path, {"image_id": ["a"], "path": ["a.png"]}, static_mask=str(tmp_path / "static.png")
    )
    fg = load_item(rec, cfg).fg
    assert fg.shape == (H, W) and fg[:, :4].all() and not fg[:, 4:].any()


def test_rgb_mask_with_class_values_is_a_named_error(tmp_path) -> None:
    _image(tmp_path / "a.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "m.png")
    (rec,), cfg = _records(
        tmp_path,
        {"image_id": ["a"], "path": ["a.png"], "mask_path": ["m.png"]},
        foreground_values=(1,),
    )
    with pytest.raises(DataError, match=r"single-channel or palette mask, this one is RGB"):
        load_item(rec, cfg)
