"""``occlusion-audit export`` on a real run: CSV cells a spreadsheet would run are escaped, a run
folder in a bucket (moto on loopback) exports to every target, and FiftyOne datasets hold one
sample per image however many exports write into them, at once or one after another."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import aggregate, load_config, read_maps, run_audit
from pipeline.cli import main
from tests._data_helpers import mongod_server, moto_server, use_s3
from tests._dataset import audit_config, image_set_with_model

pytestmark = pytest.mark.slow

N = 24
REPO = Path(__file__).resolve().parents[1]
# what a spreadsheet runs as a formula when a cell starts with it (OWASP, "CSV Injection")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
IDS = ['=HYPERLINK("http://x.example","open")', "+1", "-2+3", "@SUM(1)", "\tid", "\rid"]
GROUPS = ['=HYPERLINK("http://x.example","room")', "+room", "-room", "@room", "\troom", "\rroom"]
LABELS = ["=1+1", "-2+3", "@SUM(1)", "+4", "\t5", "\r6"]


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run over 24 images whose ids, groups and labels start like formulas."""
    root = image_set_with_model(tmp_path_factory.mktemp("export-run"), n=N)
    table = pq.read_table(root / "manifest.parquet")
    ids = [f"{IDS[i % 6]}-{i:02d}" for i in range(N)]
    groups = [GROUPS[i % 6] for i in range(N)]
    labels = [LABELS[i % 6] for i in range(N)]
    for name, values in (("image_id", ids), ("room", groups), ("label", labels)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(table, root / "manifest.parquet")
    cfg = audit_config(
        root,
        root / "run",
        occlusion={"window": [8, 8], "stride": [8, 8], "n_baselines": 1, "baseline": "mean"},
        counterfactual={"enabled": False},
        cluster={"shard_size": 12, "actors": 1},
    )
    result = run_audit(load_config(cfg), progress=False)
    assert (result.images, result.ok) == (N, N)
    aggregate(root / "run")
    return root / "run"


def _cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def test_csv_export_escapes_every_cell_a_spreadsheet_would_run(run, tmp_path, capsys) -> None:
    out = tmp_path / "export.csv"
    assert main(["export", str(run), "--to", "csv", "--out", str(out)]) == 0
    rows = _cells(out)
    assert len(rows) == N + 1
    formulas = [c for row in rows for c in row if c.startswith(FORMULA_START) and not _is_number(c)]
    assert formulas == []  # numbers (a negative score) stay numbers; no text runs as a formula
    header, body = rows[0], rows[1:]
    column = {name: [r[header.index(name)] for r in body] for name in ("image_id", "room", "label")}
    maps = read_maps(run, columns=["image_id", "room", "label"])
    for name, values in column.items():
        assert values == ["'" + v for v in maps[name]], name  # one leading ' and nothing else
    # the same escaping as the report's own CSV files (one function)
    report = tmp_path / "report"
    assert main(["report", str(run), "--out", str(report)]) == 0
    curation = {r[0] for r in _cells(report / "curation.csv")[1:]}
    assert curation and curation <= set(column["image_id"])


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MongoDB (FiftyOne's bundled ``mongod``) that every export process connects to."""
    with mongod_server(tmp_path_factory.mktemp("mongo")) as uri:
        yield uri


def _fiftyone_env(database: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FIFTYONE_DATABASE_URI": database,
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }


_READ_BACK = """
import json, sys
import fiftyone as fo
ds = fo.load_dataset(sys.argv[1])
print(json.dumps([{"image_id": s["image_id"], "tags": sorted(s.tags), "score": s["score"],
                   "map": s["occlusion"] is not None} for s in ds]))
"""


def _read_back(env: dict[str, str], name: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", _READ_BACK, name], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(run_dir: Path | str, env: dict[str, str], name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline", "export", str(run_dir), "--to", "fiftyone"]
    return subprocess.Popen(
        [*cmd, "--dataset", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def test_fiftyone_exports_at_once_and_again_leave_one_sample_per_image(run, database) -> None:
    env = _fiftyone_env(database)
    both = [_export(run, env, "twice") for _ in range(2)]  # two exports into one new dataset
    for proc in both:
        _wait(proc)
    samples = _read_back(env, "twice")
    ids = sorted(s["image_id"] for s in samples)
    assert ids == sorted(read_maps(run, columns=["image_id"])["image_id"])  # once each
    assert all(s["map"] for s in samples)
    _wait(_export(run, env, "twice"))  # again, nothing changed: the same samples
    again = _read_back(env, "twice")
    assert sorted(s["image_id"] for s in again) == ids
    assert {s["image_id"]: s["score"] for s in again} == {
        s["image_id"]: s["score"] for s in samples
    }


def test_fiftyone_reexport_takes_the_latest_values(run, database, tmp_path) -> None:
    """A group's verdict changes between two exports: the tags are replaced, not merged."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    env = _fiftyone_env(database)
    aggregate(copy, threshold=1e9, min_images=1, fdr="off")  # every group flagged
    _wait(_export(copy, env, "latest"))
    first = _read_back(env, "latest")
    assert all("audit:flagged" in s["tags"] for s in first)
    aggregate(copy, threshold=1e-9, min_images=1, fdr="off")  # no group flagged
    _wait(_export(copy, env, "latest"))
    second = _read_back(env, "latest")
    assert len(second) == N and not any(t.startswith("audit:") for s in second for t in s["tags"])


def test_export_of_a_run_folder_in_a_bucket(run, database, tmp_path, monkeypatch) -> None:
    """Every ``--to`` target from ``s3://``; files land in the run folder, as for a local one."""
    import boto3

    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="audits")
        for f in sorted(p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")):
            client.upload_file(str(f), "audits", f"runs/night/{f.relative_to(run).as_posix()}")
        url = "s3://audits/runs/night"
        for to in ("csv", "parquet"):
            assert main(["export", url, "--to", to]) == 0
        assert main(["export", url, "--to", "csv", "--out", f"{url}/copies/e.csv"]) == 0
        local = {to: tmp_path / f"local.{to}" for to in ("csv", "parquet")}
        for to, path in local.items():
            assert main(["export", str(run), "--to", to, "--out", str(path)]) == 0

        def body(key: str) -> bytes:
            return client.get_object(Bucket="audits", Key=key)["Body"].read()

        assert body("runs/night/export.csv") == local["csv"].read_bytes()
        assert body("runs/night/copies/e.csv") == body("runs/night/export.csv")
        (tmp_path / "b.parquet").write_bytes(body("runs/night/export.parquet"))
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "b.parquet"), pd.read_parquet(local["parquet"])
        )
        env = _fiftyone_env(database)  # the environment now points at the bucket
        _wait(_export(url, env, "from-bucket"))
        samples = _read_back(env, "from-bucket")
    assert sorted(s["image_id"] for s in samples) == sorted(read_maps(run)["image_id"])
