"""Manifest: CSV/Parquet from local disk, S3 (moto on loopback) and an offline hub cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import ColumnsConfig, DatasetConfig
from pipeline.data.manifest import (
    ImageRecord,
    ManifestError,
    build_manifest,
    read_manifest,
    records,
)
from pipeline.data.records import Boxes, MaskFile
from pipeline.storage.hub import HubFile
from tests._data_helpers import (
    COMMIT,
    make_hf_cache,
    moto_server,
    s3_put,
    save_image,
    use_hf_cache,
    use_s3,
)


def _dataset(manifest: str | Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(manifest=str(manifest), **kw)  # type: ignore[arg-type]


def _rows(n: int = 4) -> dict[str, list]:
    return {
        "image_id": [f"{i:03d}" for i in range(n)],
        "path": [f"room{i % 2}/{i:03d}.png" for i in range(n)],
        "room": [i % 2 for i in range(n)],  # numbers: must come back as text
        "label": [str(i % 3) for i in range(n)],
        "mask_path": [f"masks/{i:03d}.png" if i else "" for i in range(n)],
    }


def _write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_reads_csv_and_parquet_as_text_in_order(tmp_path: Path, suffix: str) -> None:
    path = _write(pa.table(_rows()), tmp_path / f"manifest{suffix}")
    cfg = _dataset(path, group_by=("room",))
    table = read_manifest(cfg)
    assert table.column("image_id").to_pylist() == ["000", "001", "002", "003"]  # "007" stays
    assert table.column("room").type == pa.string()
    recs = records(table, cfg)
    assert recs[1] == ImageRecord(
        image_id="001",
        path="room1/001.png",
        groups={"room": "1"},
        label="1",
        fg=MaskFile("masks/001.png"),
    )
    assert recs[0].mask is None  # an empty cell is no mask
    assert [r.image_id for r in records(table, cfg, 1, 3)] == ["001", "002"]
    assert [r.image_id for r in records(table, cfg, 3, 99)] == ["003"]
    assert records(table, cfg, 4, 8) == []


def test_integer_ids_and_missing_label_column(tmp_path: Path) -> None:
    table = pa.table({"id": [7, 8], "file": ["a.png", "b.png"], "mask_path": ["m", None]})
    cfg = _dataset(
        _write(table, tmp_path / "m.parquet"), columns=ColumnsConfig(id="id", path="file")
    )
    recs = records(read_manifest(cfg), cfg)
    assert [(r.image_id, r.label, r.mask) for r in recs] == [("7", None, "m"), ("8", None, None)]


def test_missing_columns_are_named_with_those_present(tmp_path: Path) -> None:
    path = _write(
        pa.table({"id": ["a"], "path": ["a.png"], "mask_path": ["m"]}), tmp_path / "m.csv"
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(_dataset(path))
    msg = str(info.value)
    assert "['image_id']" in msg and "present: ['id', 'path', 'mask_path']" in msg
    assert "dataset.columns" in msg
    with pytest.raises(ManifestError, match=r"\['room'\].*dataset\.group_by"):
        read_manifest(_dataset(path, columns=ColumnsConfig(id="id"), group_by=("room",)))


def test_a_manifest_without_masks_gives_records_without_a_foreground(tmp_path: Path) -> None:
    path = _write(pa.table({"image_id": ["a"], "path": ["a.png"]}), tmp_path / "m.csv")
    cfg = _dataset(path)
    (rec,) = records(read_manifest(cfg), cfg)
    assert rec.mask is None and rec.fg is None


def test_box_columns_become_float_boxes(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image_id": ["a", "b", "c"],
            "path": ["a.png", "b.png", "c.png"],
            "x0": [1, 2, None],
            "y0": [2, 3, 0],
            "x1": [10, 20.5, 5],
            "y1": [20, math.nan, 5],
        }
    )
    cols = ColumnsConfig(box=("x0", "y0", "x1", "y1"))
    cfg = _dataset(_write(table, tmp_path / "m.parquet"), columns=cols)
    boxes = [r.fg for r in records(read_manifest(cfg), cfg)]
    assert boxes == [Boxes(((1.0, 2.0, 10.0, 20.0),)), None, None]  # NaN or null: no box
    with pytest.raises(ManifestError, match=r"\['y1'\]"):
        read_manifest(_dataset(_write(table.drop(["y1"]), tmp_path / "n.parquet"), columns=cols))


def test_duplicate_ids_are_listed(tmp_path: Path) -> None:
    rows = _rows(8)
    rows["image_id"] = ["a", "b", "a", "c", "d", "b", "a", "e"]
    with pytest.raises(ManifestError) as info:
        read_manifest(_dataset(_write(pa.table(rows), tmp_path / "m.parquet")))
    assert "2 duplicate id(s)" in str(info.value) and "['a', 'b']" in str(info.value)


@pytest.mark.parametrize("column", ["image_id", "path"])
def test_null_or_empty_ids_and_paths(tmp_path: Path, column: str) -> None:
    rows = _rows(5)
    rows[column][1], rows[column][3] = None, ""
    with pytest.raises(
        ManifestError, match=rf"{column!r} is null or empty in 2 row\(s\).*\[1, 3\]"
    ):
        read_manifest(_dataset(_write(pa.table(rows), tmp_path / "m.parquet")))


def test_unreadable_manifests(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(_dataset(tmp_path / "nope.parquet"))
    with pytest.raises(ManifestError, match=r"unknown format '\.json'"):
        read_manifest(_dataset(tmp_path / "m.json"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="cannot read it as parquet"):
        read_manifest(_dataset(tmp_path / "bad.parquet"))
    empty = pa.table({k: pa.array([], pa.string()) for k in ("image_id", "path", "mask_path")})
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(_dataset(_write(empty, tmp_path / "e.parquet")))


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "val" / "images", tmp_path / "val" / "masks"
    pixels = np.zeros((6, 5, 3), np.uint8)
    for rel in ("kitchen/1.jpg", "kitchen/2.png", "bath/1.png", "bath/deep/3.jpeg"):
        save_image(images / rel, pixels)
    for rel in ("kitchen/1.png", "bath/deep/3.png"):  # masks: png for any image type
        save_image(masks / rel, pixels[:, :, 0])
    (images / ".hidden").mkdir()
    save_image(images / ".hidden" / "x.png", pixels)
    (images / "kitchen" / "notes.txt").write_text("not an image")
    return images, masks


@pytest.mark.parametrize("name", ["manifest.parquet", "manifest.csv"])
def test_build_manifest_from_a_tree_with_masks(tmp_path: Path, name: str) -> None:
    images, masks = _tree(tmp_path)
    out = tmp_path / "val" / name
    table = build_manifest(images, out, masks_dir=masks, group_column="room")
    assert table.column_names == ["image_id", "path", "room", "mask_path"]
    assert table.to_pylist() == [
        {"image_id": "bath/1", "path": "images/bath/1.png", "room": "bath", "mask_path": None},
        {
            "image_id": "bath/deep/3",
            "path": "images/bath/deep/3.jpeg",
            "room": "bath",
            "mask_path": "masks/bath/deep/3.png",
        },
        {
            "image_id": "kitchen/1",
            "path": "images/kitchen/1.jpg",
            "room": "kitchen",
            "mask_path": "masks/kitchen/1.png",
        },
        {
            "image_id": "kitchen/2",
            "path": "images/kitchen/2.png",
            "room": "kitchen",
            "mask_path": None,
        },
    ]
    # readable with the default root (the manifest's folder), and the paths exist there
    cfg = _dataset(out, group_by=("room",))
    recs = records(read_manifest(cfg), cfg)
    assert [r.image_id for r in recs] == table.column("image_id").to_pylist()
    for r in recs:
        assert (Path(cfg.root) / r.path).is_file()  # type: ignore[arg-type]
        assert r.mask is None or (Path(cfg.root) / r.mask).is_file()  # type: ignore[arg-type]
    assert not list(out.parent.glob(".*tmp"))  # no temporary file left behind


def test_build_manifest_elsewhere_uses_the_common_folder(tmp_path: Path) -> None:
    images, masks = _tree(tmp_path)
    table = build_manifest(images, tmp_path / "other" / "m.parquet", masks_dir=masks)
    assert table.column("path")[0].as_py() == "images/bath/1.png"  # relative to val/
    plain = build_manifest(images, tmp_path / "other" / "n.csv")
    assert plain.column_names == ["image_id", "path", "group"]
    assert plain.column("path")[0].as_py() == "bath/1.png"


def test_build_manifest_errors(tmp_path: Path) -> None:
    images, _ = _tree(tmp_path)
    with pytest.raises(ManifestError, match="unknown format"):
        build_manifest(images, tmp_path / "m.txt")
    save_image(images / "kitchen" / "2.jpg", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ManifestError, match="share the image id 'kitchen/2'"):
        build_manifest(images, tmp_path / "m.parquet")
    loose = tmp_path / "loose"
    save_image(loose / "top.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ManifestError, match="not in a group folder"):
        build_manifest(loose, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="no images"):
        build_manifest(tmp_path / "val" / "masks" / "nothing", tmp_path / "m.parquet")


# -- remote manifests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as url:
        yield url


def test_reads_a_parquet_manifest_from_s3(s3_endpoint: str, monkeypatch, tmp_path: Path) -> None:
    use_s3(monkeypatch, s3_endpoint)
    local = _write(pa.table(_rows()), tmp_path / "m.parquet")
    s3_put(s3_endpoint, "audit-data", {"val/manifest.parquet": local.read_bytes()})
    cfg = _dataset("s3://audit-data/val/manifest.parquet", group_by=("room",))
    assert cfg.root == "s3://audit-data/val"
    table = read_manifest(cfg)
    assert table.equals(read_manifest(_dataset(local, group_by=("room",))))
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(_dataset("s3://audit-data/val/missing.parquet"))


def test_reads_a_manifest_from_an_offline_hub_cache(tmp_path: Path, monkeypatch) -> None:
    local = _write(pa.table(_rows()), tmp_path / "m.parquet")
    cache = tmp_path / "hub"
    make_hf_cache(cache, "owner/rooms", {"val/manifest.parquet": local.read_bytes()})
    use_hf_cache(monkeypatch, cache)
    expected = read_manifest(_dataset(local))
    for rev in (COMMIT, "main"):
        uri = f"hf://datasets/owner/rooms@{rev}/val/manifest.parquet"
        assert read_manifest(_dataset(uri)).equals(expected)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(_dataset(f"hf://datasets/owner/rooms@{COMMIT}/val/other.parquet"))


def test_parse_hf_uris() -> None:
    ref = HubFile.parse("hf://datasets/owner/rooms@refs%2Fpr%2F1/val/m.parquet")
    assert (ref.repo_type, ref.repo_id, ref.revision, ref.filename) == (
        "dataset",
        "owner/rooms",
        "refs/pr/1",
        "val/m.parquet",
    )
    model = HubFile.parse("hf://owner/net/weights/model.pth")
    assert (model.repo_type, model.repo_id, model.revision) == ("model", "owner/net", None)
    with pytest.raises(ValueError, match="malformed"):
        HubFile.parse("hf://datasets/owner")
