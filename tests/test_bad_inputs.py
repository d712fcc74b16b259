"""Bad items in one run: every one becomes an ``error`` row naming it; the run and the rest go on.

One manifest mixes good images with each kind of bad item (corrupt, truncated PNG and JPEG,
missing image, missing mask, mask of the wrong size, a model that returns NaN) and an empty mask,
which is not an error but a NaN metric with a reason. Bad items sit in different shards between
good ones, so a bad item must not take its shard's good images down with it.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import load_config, read_maps, run_audit
from tests._dataset import audit_config, make_image_set
from tests._faults import (
    cli,
    save_nan_model,
    write_png,
    write_random_bytes,
    write_truncated,
)

N_GOOD = 7  # img000..img006 from make_image_set; the bad items reuse some of their files
SIZE = (24, 24)

# id -> (image path, mask path, what the error message must name besides the id)
BAD = {
    "corrupt": ("images/corrupt.png", "masks/img000.png", "images/corrupt.png"),
    "trunc_png": ("images/trunc_png.png", "masks/img000.png", "images/trunc_png.png"),
    "trunc_jpg": ("images/trunc_jpg.jpg", "masks/img000.png", "images/trunc_jpg.jpg"),
    "no_image": ("images/missing.png", "masks/img000.png", "images/missing.png"),
    "no_mask": ("images/img001.png", "masks/missing.png", "masks/missing.png"),
    "small_mask": ("images/img002.png", "masks/small.png", "masks/small.png"),
    "black": ("images/black.png", "masks/img000.png", "NaN"),
}
EMPTY = ("empty_mask", "images/img003.png", "masks/empty.png")


def _build(root: Path) -> list[str]:
    """Write the data set and the NaN model under ``root``; return the manifest's ids in order."""
    make_image_set(root, n=N_GOOD, size=SIZE)
    write_random_bytes(root / "images" / "corrupt.png")
    write_truncated(root / "images" / "trunc_png.png", SIZE)
    write_truncated(root / "images" / "trunc_jpg.jpg", SIZE)
    write_png(root / "images" / "black.png", np.zeros((*SIZE, 3), np.uint8))
    small = np.zeros((12, 12), np.uint8)
    small[2:8, 2:8] = 255
    write_png(root / "masks" / "small.png", small)
    write_png(root / "masks" / "empty.png", np.zeros(SIZE, np.uint8))
    save_nan_model(root / "model.ts")

    good = pq.read_table(root / "manifest.parquet").to_pylist()
    extra = [(k, p, m) for k, (p, m, _) in BAD.items()] + [EMPTY]
    rows = []
    for i, row in enumerate(good):  # interleave: bad items land in every shard, beside good ones
        rows.append(row)
        if i < len(extra):
            image_id, path, mask = extra[i]
            rows.append({**row, "image_id": image_id, "path": path, "mask_path": mask})
    rows += [
        {**good[0], "image_id": i, "path": p, "mask_path": m} for i, p, m in extra[len(good) :]
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return [r["image_id"] for r in rows]


def _config(root: Path, out: Path) -> dict:
    cfg = audit_config(
        root,
        out,
        occlusion={"window": [8, 8], "stride": [4, 4], "n_baselines": 2, "max_batch": 32},
        cluster={"shard_size": 5, "actors": 1},
    )
    cfg["model"] = {"torchscript": str(root / "model.ts")}
    return cfg


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, _build(root)


@pytest.fixture(scope="module")
def api_run(local_ray, bad_set, tmp_path_factory):
    root, ids = bad_set
    out = tmp_path_factory.mktemp("api") / "run"
    return run_audit(load_config(_config(root, out)), progress=False), ids


def test_every_bad_item_is_an_error_row_naming_it(api_run):
    res, ids = api_run
    maps = read_maps(res.run_dir)
    assert sorted(maps["image_id"]) == sorted(ids)  # one row per manifest image
    assert maps["image_id"].is_unique
    rows = maps.set_index("image_id")
    for image_id, (_, _, named) in BAD.items():
        row = rows.loc[image_id]
        assert row["status"] == "error", image_id
        assert repr(image_id) in row["error"], row["error"]
        assert named in row["error"], row["error"]
        assert math.isnan(row["fg_bg_ratio"])
    good = [i for i in ids if i not in BAD]
    assert (rows.loc[good, "status"] == "ok").all()
    assert rows.loc[good, "error"].isna().all()


def test_file_problems_say_what_is_wrong(api_run):
    res, _ = api_run
    err = read_maps(res.run_dir).set_index("image_id")["error"]
    assert "cannot decode image" in err["corrupt"]
    assert "cannot decode image" in err["trunc_png"]
    assert "cannot decode image" in err["trunc_jpg"]
    assert "image file not found" in err["no_image"]
    assert "mask file not found" in err["no_mask"]
    assert "12x12 does not match image 24x24" in err["small_mask"]


def test_an_empty_mask_is_ok_with_a_nan_ratio_and_a_reason(api_run):
    res, _ = api_run
    row = read_maps(res.run_dir).set_index("image_id").loc[EMPTY[0]]
    assert row["status"] == "ok" and pd.isna(row["error"])
    assert math.isnan(row["fg_bg_ratio"]) and math.isnan(row["fg_share"])
    assert row["fg_area"] == 0.0
    assert row["metric_note"] == "empty foreground mask"
    assert np.isfinite(np.asarray(row["delta"])).all()  # the map itself is fine


def test_good_images_beside_a_nan_image_keep_finite_maps(api_run):
    res, ids = api_run
    rows = read_maps(res.run_dir).set_index("image_id")
    good = rows.loc[[i for i in ids if i not in BAD]]
    assert all(np.isfinite(np.asarray(d)).all() for d in good["delta"])
    assert np.isfinite(good["score"]).all()
    masked = good.drop(index=EMPTY[0])
    assert np.isfinite(masked["fg_bg_ratio"]).all()


def test_result_and_run_json_count_and_list_the_failures(api_run):
    res, ids = api_run
    assert (res.images, res.ok, res.errors) == (len(ids), len(ids) - len(BAD), len(BAD))
    assert res.exit_code == 1  # max_failures defaults to 0
    assert sorted(f["image_id"] for f in res.failures) == sorted(BAD)
    facts = json.loads((res.run_dir / "run.json").read_text())
    assert facts["counts"] == {"images": len(ids), "ok": len(ids) - len(BAD), "error": len(BAD)}
    listed = {f["image_id"]: f["error"] for f in facts["failures"]}
    assert sorted(listed) == sorted(BAD)
    assert all(repr(i) in listed[i] for i in BAD)
    # bad items are data problems, not worker faults: no shard was retried
    assert facts["retried_shards"] == {}


def _cli(cfg_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``run CFG --no-report --quiet EXTRA`` in this process, on the module's Ray."""
    return cli("run", str(cfg_path), "--no-report", "--quiet", *extra)


def test_cli_exit_code_is_1_with_failures_and_0_within_max_failures(local_ray, bad_set, tmp_path):
    root, ids = bad_set
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, tmp_path / "strict")))

    strict = _cli(cfg_path)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert f"{len(BAD)} failed of {len(ids)} images" in strict.stdout
    for image_id in BAD:  # the first failures are printed, each naming its image
        assert f"error {image_id}:" in strict.stderr

    lenient = _cli(
        cfg_path,
        "--set",
        f"cluster.max_failures={len(BAD)}",
        "--set",
        f"output.dir={tmp_path / 'lenient'}",
    )
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    facts = json.loads((tmp_path / "lenient" / "run.json").read_text())
    assert sorted(f["image_id"] for f in facts["failures"]) == sorted(BAD)
    assert facts["config"]["cluster"]["max_failures"] == len(BAD)


def test_a_mistyped_override_key_exits_2_before_any_output(bad_set, tmp_path):
    root, _ = bad_set
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, tmp_path / "run")))
    proc = _cli(cfg_path, "--set", "occlusion.windw=[8,8]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "occlusion.windw" in proc.stderr
    assert "window" in proc.stderr  # the allowed key (closest match) is suggested
    assert not (tmp_path / "run").exists()
    assert "Traceback" not in proc.stderr
