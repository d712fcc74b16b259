"""Whole audits on the embedded Ray from every source format: the same per-image maps and
metrics as the plain manifest run; ``inspect`` counts each format right and its ETA is near a
real run's time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import load_config, read_maps, run_audit
from pipeline.run.folder import RunFolder
from pipeline.run.inspect import inspect_audit
from pipeline.schema import IMAGE_METRICS
from tests._dataset import audit_config, save_gap_model
from tests._formats import write_all_formats

pytestmark = pytest.mark.slow

COLUMNS = ["image_id", "status", "delta", *IMAGE_METRICS]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fmt-run")
    files = write_all_formats(root)
    save_gap_model(root / "model.pt")
    files["root"] = root
    return files


def _datasets(files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    root = str(files["root"])
    return {
        "table": {"manifest": str(files["table"])},
        "huggingface": {"manifest": str(files["hf"]), "columns": {"mask": "mask"}},
        "coco": {"manifest": str(files["coco"]), "root": root},
        "webdataset": {"manifest": files["wds"], "columns": {"mask": "mask.png"}},
        "imagefolder": {
            "manifest": str(files["folder"]),
            "root": root,
            "masks_dir": str(files["folder_masks"]),
            "group_by": [],
        },
    }


def _config(files: dict[str, Any], fmt: str, out: Path, manifest: str | None = None) -> Any:
    # shards of 4 rows: the same batches as the 4-sample tar shards, so maps agree bit for bit
    base = audit_config(files["root"], out, cluster={"shard_size": 4, "actors": 1})
    dataset = {**base["dataset"], **_datasets(files)[fmt]}
    if manifest is not None:
        dataset["manifest"] = manifest
    if fmt in ("coco", "imagefolder"):
        dataset["group_by"] = ["room"] if fmt == "coco" else []
    return load_config({**base, "dataset": dataset})


def _maps(cfg: Any, out: Path) -> Any:
    result = run_audit(cfg, progress=False)
    assert (result.images, result.ok) == (8, 8), cfg.dataset.format
    return read_maps(out, columns=COLUMNS).set_index("image_id").sort_index()


def test_every_format_audits_to_the_manifest_runs_maps(local_ray, data, tmp_path) -> None:
    """Random baselines are seeded by image id, so each format is compared with a plain
    manifest run of the same images under the ids that format gives them."""
    plain = {}
    for ids in ("table", "table_coco", "table_folder"):
        cfg = _config(data, "table", tmp_path / ids, manifest=str(data[ids]))
        plain[ids] = _maps(cfg, tmp_path / ids)
    assert plain["table"]["fg_bg_ratio"].notna().all()
    same_ids = {"coco": "table_coco", "imagefolder": "table_folder"}
    for fmt in ("huggingface", "coco", "webdataset", "imagefolder"):
        frame = _maps(_config(data, fmt, tmp_path / fmt), tmp_path / fmt)
        base = plain[same_ids.get(fmt, "table")]
        assert list(frame.index) == list(base.index), fmt
        np.testing.assert_array_equal(
            np.stack(frame["delta"].to_numpy()), np.stack(base["delta"].to_numpy()), err_msg=fmt
        )
        for col in IMAGE_METRICS:
            np.testing.assert_array_equal(frame[col], base[col], err_msg=f"{fmt}: {col}")
        # the run records the class names its source knows, keyed by the stored label
        names = {"coco": {"1": "zero", "2": "one"}, "imagefolder": {"0": "a", "1": "b"}}
        assert RunFolder(tmp_path / fmt).read_record().class_names == names.get(fmt, {}), fmt


@pytest.mark.parametrize("fmt", ["table", "huggingface", "coco", "webdataset", "imagefolder"])
def test_inspect_counts_each_format(data, tmp_path, fmt) -> None:
    found = inspect_audit(_config(data, fmt, tmp_path / "x"), sample=8, calibrate=2)
    assert found.format == fmt and found.images == 8 and found.with_fg == 8
    assert sum(found.groups.values()) == 8 and len(found.groups) == 2
    assert found.sampled == 8 and found.sample_errors == []
    assert found.mean_fg_area == pytest.approx(64 / 576)  # an 8x8 box in a 24x24 image
    assert found.windows == 25 and found.forward_passes == 8 * (25 * 2 + 1)
    text = found.text(found.group_by)
    assert f"format: {fmt}" in text and "images: 8 in 2 shard(s)" in text


def test_inspect_eta_is_within_2x_of_a_real_run(data, tmp_path) -> None:
    """Both as a user meets them: ``inspect``, then ``run`` in a fresh process (Ray included)."""
    plain = audit_config(data["root"], tmp_path / "eta", cluster={"shard_size": 3, "actors": 1})
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(plain))
    found = inspect_audit(load_config(tmp_path / "a.yaml"), sample=8, calibrate=3)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(tmp_path / "a.yaml"),
            "--no-report",
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    real = time.perf_counter() - t0
    assert real / 2 <= found.eta_s <= real * 2, (found.eta_s, real)


def test_inspect_plans_the_pool_of_a_cold_deployment(data, tmp_path) -> None:
    """``inspect --cluster cluster.yaml``: the pool the shipped launcher config leads to, and
    no ETA for GPUs this machine does not have (rather than a CPU time passed off as one)."""
    cfg = audit_config(
        data["root"], tmp_path / "x", cluster={"device": "cuda", "actors": "auto", "shard_size": 1}
    )
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "inspect", str(tmp_path / "a.yaml"), "--sample", "4",
         "--calibrate", "2", "--cluster", str(root / "cluster.yaml")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    pool = next(s for s in lines if s.startswith("pool on "))
    # 8 images in 8 shards; the node types could hold 24 GPU actors
    assert "cluster.yaml, cold: cuda (cluster.device is cuda), up to 8 actor(s)" in pool, pool
    assert "{GPU: 1, CPU: 1}" in pool
    if not torch.cuda.is_available():
        assert "ETA: unknown (this machine has no cuda; run inspect on the cluster" in proc.stdout
    found = inspect_audit(load_config(tmp_path / "a.yaml"), sample=4, calibrate=2,
                          cluster_file=str(root / "jobs" / "rayjob.yaml"))  # fmt: skip
    assert found.actors == 8 and "rayjob.yaml, cold" in found.target
