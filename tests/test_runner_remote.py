"""A whole audit whose manifest, images and masks live on S3 (a moto server on loopback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from pipeline import load_config, read_maps, run_audit
from tests._data_helpers import moto_server, s3_put, use_s3
from tests._dataset import audit_config, make_image_set, save_gap_model


@pytest.mark.slow
def test_an_s3_dataset_gives_the_same_maps_as_its_local_copy(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    make_image_set(root, n=8)
    save_gap_model(root / "model.pt")
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".png", ".parquet")
    }
    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)  # before ray.init: workers inherit the environment
        s3_put(endpoint, "audit-data", {f"val/{k}": v for k, v in files.items()})
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            remote = audit_config(root, tmp_path / "s3-run")
            remote["dataset"] = {
                **remote["dataset"],
                "manifest": "s3://audit-data/val/manifest.parquet",
                "root": "s3://audit-data/val",
            }
            res = run_audit(load_config(remote), progress=False)
            local = run_audit(load_config(audit_config(root, tmp_path / "local")), progress=False)
        finally:
            ray.shutdown()
    assert (res.ok, res.errors) == (8, 0)
    a = read_maps(tmp_path / "s3-run").set_index("image_id").sort_index()
    b = read_maps(local.run_dir).set_index("image_id").sort_index()
    assert np.array_equal(np.stack(a["delta"].to_list()), np.stack(b["delta"].to_list()))
    assert np.array_equal(a["fg_bg_ratio"], b["fg_bg_ratio"])
