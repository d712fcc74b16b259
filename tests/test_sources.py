"""Every source format, read from files written by the libraries that define them, gives the
same images, foregrounds, groups and labels as the plain manifest; bad items are named errors."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config.dataset import CocoConfig, ColumnsConfig, DataFormat, DatasetConfig
from pipeline.data.detect import open_source
from pipeline.data.foreground import load_item
from pipeline.data.images import DataError
from pipeline.data.plan import check_stored_ids, plan_source
from pipeline.data.source import SourceError
from tests._formats import write_all_formats

SIZE = (24, 24)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_all_formats(tmp_path_factory.mktemp("formats"))


def _cfg(manifest: Any, **kw: Any) -> DatasetConfig:
    return DatasetConfig(manifest=str(manifest), image_size=SIZE, **kw)


def _by_id(source: Any, key=lambda i: i) -> dict[str, Any]:
    plan = plan_source(source, 3)
    out = {}
    for ref in plan.shards:
        for rec in source.read(ref):
            out[key(rec.image_id)] = rec
    return out


def _same_items(a: dict[str, Any], b: dict[str, Any], cfg_a, cfg_b) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = load_item(a[k], cfg_a), load_item(b[k], cfg_b)
        assert torch.equal(x.image, y.image), k
        assert torch.equal(x.fg, y.fg), k


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("table", DataFormat.TABLE),
        ("hf", DataFormat.HUGGINGFACE),
        ("coco", DataFormat.COCO),
        ("wds", DataFormat.WEBDATASET),
        ("folder", DataFormat.IMAGEFOLDER),
    ],
)
def test_auto_detects_each_format_and_says_why(files, kind, expected) -> None:
    source = open_source(_cfg(files[kind], root=str(files["table"].parent)))
    assert source.format == str(expected)
    assert "auto" in source.detected and source.found


def test_huggingface_parquet_equals_the_manifest(files) -> None:
    root = str(files["table"].parent)
    table_cfg = _cfg(files["table"], group_by=("room",))
    hf_cfg = _cfg(files["hf"], group_by=("room",), columns=ColumnsConfig(mask="mask"))
    table, hf = _by_id(open_source(table_cfg)), _by_id(open_source(hf_cfg))
    _same_items(table, hf, table_cfg, hf_cfg)
    # the ClassLabel group shows its class names; the label column is read as text
    assert {k: (r.groups, r.label) for k, r in hf.items()} == {
        k: (r.groups, r.label) for k, r in table.items()
    }
    assert all(r.data is not None and r.path.startswith("hf.parquet#") for r in hf.values())
    assert root


def test_huggingface_without_id_column_uses_row_numbers(files, tmp_path) -> None:
    t = pq.read_table(files["hf"]).drop(["image_id"])
    pq.write_table(t, tmp_path / "noid.parquet")
    source = open_source(_cfg(tmp_path / "noid.parquet"))
    assert sorted(_by_id(source)) == [str(i) for i in range(8)]


def test_huggingface_files_name_each_row_by_its_file_and_row(files, tmp_path) -> None:
    t = pq.read_table(files["hf"])  # 8 rows, image bytes inline
    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    parts = [t.slice(0, 3), t.slice(3, 0), t.slice(3, 5)]  # the middle file has no rows
    for k, part in enumerate(parts):
        pq.write_table(part, folder / f"validation-{k:05d}-of-00003.parquet")
    source = open_source(_cfg(tmp_path / "hf", format="huggingface"))
    recs = _by_id(source)
    ids = t.column("image_id").to_pylist()
    assert sorted(recs) == sorted(ids)
    for row, image_id in enumerate(ids):
        file, at = (0, row) if row < 3 else (2, row - 3)
        rec = recs[image_id]
        assert rec.path.endswith(f"validation-{file:05d}-of-00003.parquet#{at}"), rec.path
        # the locator is what the report uses to read the image back
        assert source.fetch(image_id, rec.path, None).data == rec.data


def test_coco_rle_equals_the_manifest_and_groups_from_images_and_largest_instance(files) -> None:
    root = str(files["table"].parent)
    table_cfg = _cfg(files["table"], group_by=("room",))
    coco_cfg = _cfg(files["coco"], root=root, group_by=("room", "category"))
    coco = _by_id(open_source(coco_cfg), key=files["coco_ids"].get)
    table = _by_id(open_source(table_cfg))
    _same_items(table, coco, table_cfg, coco_cfg)
    for k, rec in coco.items():
        i = files["ids"].index(k)
        assert rec.groups == {"room": table[k].groups["room"], "category": ["zero", "one"][i % 2]}
        assert rec.label == str(1 + i % 2)  # the largest instance's category id


def test_webdataset_tars_equal_the_manifest_and_shards_stay_inside_tars(files) -> None:
    table_cfg = _cfg(files["table"], group_by=("room",))
    wds_cfg = _cfg(files["wds"], group_by=("room",), columns=ColumnsConfig(mask="mask.png"))
    source = open_source(wds_cfg)
    plan = plan_source(source, 3)
    assert {ref.part for ref in plan.shards} == {
        files["wds"].replace("{000000..000001}", f"{i:06d}") for i in range(2)
    }
    assert all(len(ref) <= 3 for ref in plan.shards)
    wds, table = _by_id(source), _by_id(open_source(table_cfg))
    _same_items(table, wds, table_cfg, wds_cfg)
    assert {k: (r.groups, r.label) for k, r in wds.items()} == {
        k: (r.groups, r.label) for k, r in table.items()
    }


def test_imagefolder_groups_by_class_with_parallel_masks(files) -> None:
    table_cfg = _cfg(files["table"], group_by=("room",))
    folder_cfg = _cfg(files["folder"], format="imagefolder", masks_dir=str(files["folder_masks"]))
    source = open_source(folder_cfg)
    assert source.cfg.group_by == ("class",)
    folder = _by_id(source, key=lambda i: i.split("/")[1])
    table = _by_id(open_source(table_cfg))
    _same_items(table, folder, table_cfg, source.cfg)
    assert {k: r.groups["class"] for k, r in folder.items()} == {
        k: r.groups["room"] for k, r in table.items()
    }
    assert {r.label for r in folder.values()} == {"0", "1"}  # class index, sorted names


def test_plan_counts_groups_and_foregrounds_and_checks_stored_ids(files) -> None:
    plan = plan_source(open_source(_cfg(files["table"], group_by=("room",))), 3)
    assert plan.images == 8 and plan.groups == {("a",): 4, ("b",): 4} and plan.with_fg == 8
    assert [len(r) for r in plan.shards] == [3, 3, 2]
    check_stored_ids(files["ids"], plan)
    with pytest.raises(RuntimeError, match=r"1 missing.*1 duplicated \['img001'\]"):
        check_stored_ids([*files["ids"][:-1], "img001"], plan)


def test_duplicate_and_empty_ids_are_refused_before_any_work(tmp_path) -> None:
    t = pa.table({"image_id": ["a", "b", "a"], "path": ["x.png"] * 3})
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(SourceError, match=r"duplicate image id.*\['a'\]"):
        plan_source(open_source(_cfg(tmp_path / "dup.parquet")), 2)
    pq.write_table(t.set_column(0, "image_id", pa.array(["a", "", "c"])), tmp_path / "e.parquet")
    with pytest.raises(SourceError, match=r"null or empty in 1 row.*\[1\]"):
        plan_source(open_source(_cfg(tmp_path / "e.parquet")), 2)


def test_coco_bad_items_are_named_errors_and_unknown_categories_refused(tmp_path) -> None:
    from pycocotools import mask as coco_mask

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    rle = coco_mask.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))  # 4x4 for an 8x8 image
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 8, "width": 8},
            {"id": 2, "file_name": "a.png", "height": 8, "width": 8},
            {"id": 3, "file_name": "a.png", "height": 8, "width": 8},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": rle},
            {"id": 11, "image_id": 2, "category_id": 99, "bbox": [0, 0, 2, 2]},
            {
                "id": 12,
                "image_id": 3,
                "category_id": 1,
                "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
                "bbox": [1, 1, 4, 4],
            },
        ],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    cfg = DatasetConfig(manifest=str(tmp_path / "c.json"), image_size=(8, 8))
    recs = _by_id(open_source(cfg))
    with pytest.raises(DataError, match=r"'1'.*RLE of size \[4, 4\] for a 8x8 image"):
        load_item(recs["1"], cfg)
    assert "unknown category_id 99" in recs["2"].error and "'2'" in recs["2"].error
    fg = load_item(recs["3"], cfg).fg  # a polygon
    assert fg[2:5, 2:5].all() and not fg[0].any() and not fg[:, 7].any()
    with pytest.raises(SourceError, match=r"unknown categories \['dog'\]"):
        open_source(
            DatasetConfig(manifest=str(tmp_path / "c.json"), coco=CocoConfig(categories=("dog",)))
        )


def test_bbox_only_annotation_is_its_box(tmp_path) -> None:
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "a.png")
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 3, 4, 5]}],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    cfg = DatasetConfig(manifest=str(tmp_path / "c.json"), image_size=(10, 10))
    fg = load_item(_by_id(open_source(cfg))["7"], cfg).fg
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[3:8, 2:6] = True
    assert torch.equal(fg, expected)


def test_webdataset_sample_without_image_and_hf_row_without_bytes_are_errors(tmp_path) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("k1.json", b'{"room": "a"}'), ("k1.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    recs = _by_id(open_source(DatasetConfig(manifest=str(tmp_path / "s.tar"))))
    assert "no image member" in recs["k1"].error
    import datasets

    feats = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [None]}, features=feats).to_parquet(
        str(tmp_path / "h.parquet")
    )
    recs = _by_id(open_source(DatasetConfig(manifest=str(tmp_path / "h.parquet"))))
    assert "no image bytes and no path" in recs["0"].error


def test_sources_name_the_classes_of_their_labels(files, tmp_path) -> None:
    """What a run records as ``class_names``: each stored label text -> its class name, where
    the format knows the names; nothing where it does not."""
    root = str(files["table"].parent)
    coco = open_source(_cfg(files["coco"], root=root))
    assert coco.class_names() == {"1": "zero", "2": "one"}  # label: the category id
    folder = open_source(_cfg(files["folder"], format="imagefolder"))
    assert folder.class_names() == {"0": "a", "1": "b"}  # label: the sorted folder's index
    assert open_source(_cfg(files["table"])).class_names() == {}
    assert open_source(_cfg(files["wds"])).class_names() == {}
    # the HF fixture's label column is text: no names; a ClassLabel label has them
    assert open_source(_cfg(files["hf"])).class_names() == {}
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["tench", "goldfish"])}
    )
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png.getvalue(), "path": None}] * 2, "label": [1, 0]},
        features=features,
    )
    ds.to_parquet(str(tmp_path / "labels.parquet"))
    source = open_source(_cfg(tmp_path / "labels.parquet"))
    assert source.class_names() == {"0": "tench", "1": "goldfish"}
    assert [r.label for r in _by_id(source).values()] == ["1", "0"]  # the index stays the label
