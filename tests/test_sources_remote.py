"""Every format read from object storage and the Hub as it is read from disk: S3 (moto on
loopback), the GCS emulator, and an ``hf://`` hub cache built on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config.dataset import ColumnsConfig, DatasetConfig
from pipeline.data.detect import open_source
from pipeline.data.foreground import load_item
from pipeline.data.plan import plan_source
from tests._data_helpers import (
    gcs_put,
    gcs_server,
    make_hf_cache,
    moto_server,
    s3_put,
    use_hf_cache,
    use_s3,
)
from tests._formats import write_all_formats

SIZE = (24, 24)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_all_formats(tmp_path_factory.mktemp("remote-formats"))


def _objects(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".png", ".parquet", ".json", ".tar")
    }


def _items(cfg: DatasetConfig, key=lambda i: i) -> dict[str, Any]:
    source = open_source(cfg)
    plan = plan_source(source, 3)
    out = {}
    for ref in plan.shards:
        for rec in source.read(ref):
            item = load_item(rec, source.cfg)
            out[key(rec.image_id)] = (item.image, item.fg, rec.groups)
    return out


def _local(files: dict[str, Any]) -> dict[str, Any]:
    return _items(DatasetConfig(manifest=str(files["table"]), image_size=SIZE, group_by=("room",)))


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert sorted(got) == sorted(want)
    for k, (image, fg, groups) in got.items():
        assert torch.equal(image, want[k][0]) and torch.equal(fg, want[k][1]), k
        assert groups == want[k][2], k


def _remote_configs(base: str, files: dict[str, Any]) -> dict[str, DatasetConfig]:
    n_tars = len(list(Path(files["wds"]).parent.glob("*.tar")))
    common = {"image_size": SIZE, "group_by": ("room",)}
    return {
        "huggingface": DatasetConfig(
            manifest=f"{base}/hf.parquet", columns=ColumnsConfig(mask="mask"), **common
        ),
        "coco": DatasetConfig(manifest=f"{base}/instances.json", root=base, **common),
        "webdataset": DatasetConfig(
            manifest=f"{base}/wds/shard-{{000000..{n_tars - 1:06d}}}.tar",
            columns=ColumnsConfig(mask="mask.png"),
            **common,
        ),
        "table": DatasetConfig(manifest=f"{base}/manifest.parquet", **common),
    }


def _check_all(base: str, files: dict[str, Any]) -> None:
    want = _local(files)
    for fmt, cfg in _remote_configs(base, files).items():
        source = open_source(cfg)
        assert source.format == fmt, fmt
        key = files["coco_ids"].get if fmt == "coco" else (lambda i: i)
        _assert_same(_items(cfg, key), want)


@pytest.mark.slow
def test_every_format_reads_from_s3(files, monkeypatch) -> None:
    root = Path(files["table"]).parent
    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)
        s3_put(endpoint, "audit-data", {f"val/{k}": v for k, v in _objects(root).items()})
        _check_all("s3://audit-data/val", files)


@pytest.mark.slow
def test_every_format_reads_from_gcs(files, monkeypatch) -> None:
    root = Path(files["table"]).parent
    with gcs_server("audit-data") as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        gcs_put(endpoint, "audit-data", {f"val/{k}": v for k, v in _objects(root).items()})
        _check_all("gs://audit-data/val", files)


def test_huggingface_parquet_and_tars_read_from_the_hub_cache(files, tmp_path, monkeypatch) -> None:
    root = Path(files["table"]).parent
    cache = tmp_path / "hub"
    wanted = {k: v for k, v in _objects(root).items() if k.endswith((".parquet", ".tar"))}
    make_hf_cache(cache, "acme/val-set", wanted)
    use_hf_cache(monkeypatch, cache)
    base = "hf://datasets/acme/val-set"
    want = _local(files)
    hf = DatasetConfig(
        manifest=f"{base}/hf.parquet",
        columns=ColumnsConfig(mask="mask"),
        image_size=SIZE,
        group_by=("room",),
    )
    _assert_same(_items(hf), want)
    tars = sorted(k for k in wanted if k.endswith(".tar"))
    wds = DatasetConfig(
        manifest="::".join(f"{base}/{t}" for t in tars),
        columns=ColumnsConfig(mask="mask.png"),
        image_size=SIZE,
        group_by=("room",),
    )
    assert open_source(wds).format == "webdataset"
    _assert_same(_items(wds), want)
