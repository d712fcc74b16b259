"""Whole audits whose manifest, images and masks live on S3 or GCS (emulators on loopback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from pipeline import load_config, read_maps, run_audit
from pipeline.storage.read import read_bytes
from tests._data_helpers import gcs_put, gcs_server, moto_server, s3_put, use_s3
from tests._dataset import audit_config, make_image_set, save_gap_model


def _dataset_files(root: Path) -> dict[str, bytes]:
    make_image_set(root, n=8)
    save_gap_model(root / "model.pt")
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".png", ".parquet")
    }


def _same_maps_as_local(tmp_path: Path, root: Path, remote_root: str) -> None:
    """Audit the dataset at ``remote_root`` and its local copy ``root``; the maps must be equal.
    The store's environment must be set already: Ray's workers inherit it at ``ray.init``."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        remote = audit_config(root, tmp_path / "remote-run")
        remote["dataset"] = {
            **remote["dataset"],
            "manifest": f"{remote_root}/manifest.parquet",
            "root": remote_root,
        }
        res = run_audit(load_config(remote), progress=False)
        local = run_audit(load_config(audit_config(root, tmp_path / "local")), progress=False)
    finally:
        ray.shutdown()
    assert (res.ok, res.errors) == (8, 0)
    a = read_maps(res.run_dir).set_index("image_id").sort_index()
    b = read_maps(local.run_dir).set_index("image_id").sort_index()
    assert np.array_equal(np.stack(a["delta"].to_list()), np.stack(b["delta"].to_list()))
    assert np.array_equal(a["fg_bg_ratio"], b["fg_bg_ratio"])


@pytest.mark.slow
def test_an_s3_dataset_gives_the_same_maps_as_its_local_copy(tmp_path: Path, monkeypatch) -> None:
    files = _dataset_files(tmp_path / "data")
    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)
        s3_put(endpoint, "audit-data", {f"val/{k}": v for k, v in files.items()})
        _same_maps_as_local(tmp_path, tmp_path / "data", "s3://audit-data/val")


def test_gs_uris_read_from_the_storage_emulator_host(monkeypatch) -> None:
    with gcs_server("audit-data") as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        gcs_put(endpoint, "audit-data", {"val/a.bin": b"\x00occlusion\xff"})
        assert read_bytes("gs://audit-data/val/a.bin") == b"\x00occlusion\xff"
        with pytest.raises(FileNotFoundError):
            read_bytes("gs://audit-data/val/missing.bin")


@pytest.mark.slow
def test_a_gcs_dataset_gives_the_same_maps_as_its_local_copy(tmp_path: Path, monkeypatch) -> None:
    files = _dataset_files(tmp_path / "data")
    with gcs_server("audit-data") as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        gcs_put(endpoint, "audit-data", {f"val/{k}": v for k, v in files.items()})
        _same_maps_as_local(tmp_path, tmp_path / "data", "gs://audit-data/val")
