"""Strategy discovery end to end: a generated set without masks where half of one class carries
a corner watermark that the model learned; a real local run; discover; export."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import load_config, run_audit
from pipeline.audit.strategies import discover
from pipeline.cli import main
from tests._browser import chromium, probe_page
from tests._watermark import make_set, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("watermark")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    make_set(d / "train", 200, seed=0)
    weights = train(d / "train", d / "model.pt")
    torch.set_num_threads(threads)
    make_set(d / "audit", 40, seed=1)
    cfg = load_config(
        {
            "name": "watermark",
            "dataset": {
                "manifest": str(d / "audit" / "manifest.parquet"),
                "group_by": ["label"],
                "image_size": [32, 32],
            },
            "model": {
                "factory": "pipeline.models:SeedCNNWithGAP",
                "kwargs": {"num_classes": 2},
                "weights": str(weights),
            },
            "occlusion": {"window": [8, 8], "stride": [4, 4], "baseline": "mean"},
            "output": {"dir": str(d / "run"), "report_dir": str(d / "report")},
        }
    )
    assert run_audit(cfg, progress=False).exit_code == 0
    return d


def _corner(s: pd.DataFrame) -> pd.DataFrame:
    return s[(s["peak_row"] <= 1) & (s["peak_col"] <= 1) & s["fixed_place"]]


def test_the_watermarked_half_is_a_corner_strategy_and_the_clean_class_has_none(run: Path):
    s = discover(run / "run", ["label"])
    marked = pd.read_parquet(run / "audit" / "manifest.parquet").set_index("image_id")["marked"]
    corner = _corner(s)
    assert set(corner["label"]) == {"0"}  # only the watermarked class
    members = {i for m in corner["members"] for i in m}
    assert members == set(marked[marked == "True"].index)  # exactly the watermarked half
    assert corner["share"].sum() == pytest.approx(0.5)
    assert (run / "run" / "strategies.parquet").exists()
    again = discover(run / "run", ["label"], write=False)  # deterministic for a fixed seed
    pd.testing.assert_frame_equal(s, again)
    # with a fixed number of clusters, the watermark still stands out as its own cluster
    fixed = discover(run / "run", ["label"], clusters=2, write=False)
    assert set(_corner(fixed)["label"]) == {"0"}


def test_the_cli_and_the_report_section(run: Path, tmp_path: Path):
    assert main(["discover", str(run / "run"), "--group-by", "label"]) == 0
    assert main(["report", str(run / "run"), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert 'id="strategies"' in page and "fixed place" in page
    assert "No image has a usable foreground" in page
    if chromium() is not None:
        attrs, dom = probe_page(tmp_path / "r" / "index.html", tmp_path)
        assert attrs["data-problems"] == "[]" and attrs["data-broken"] == "[]"
        assert dom.count('class="item strategy"') >= 3


def test_export_to_parquet_and_csv(run: Path, tmp_path: Path):
    assert main(["discover", str(run / "run")]) == 0
    out = tmp_path / "e.parquet"
    assert main(["export", str(run / "run"), "--to", "parquet", "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 80 and table["filepath"].map(lambda p: Path(p).exists()).all()
    tagged = table[table["tags"].map(lambda t: any(x.startswith("strategy:0#") for x in t))]
    assert len(tagged) == 80 // 2  # every class-0 image carries its cluster's tag
    assert main(["export", str(run / "run"), "--to", "csv", "--out", str(tmp_path / "e.csv")]) == 0
    csv = pd.read_csv(tmp_path / "e.csv")
    assert list(csv["image_id"]) == list(table["image_id"])


# In one process of its own (FiftyOne's database is set by the environment before its import,
# and starting it costs about 10 s): the CLI's export, the samples read back, the export again
# (it must update the same samples), and the samples read back again, one JSON line each.
_EXPORT_TWICE = """
import json, sys
import fiftyone as fo
from pipeline.cli import main

def samples(name):
    ds = fo.load_dataset(name)
    return {s["image_id"]: {"tags": list(s.tags), "status": s["status"],
            "map": s["occlusion"].map.tolist() if s["occlusion"] is not None else None,
            "score": s["score"]} for s in ds}

run, name = sys.argv[1:]
for _ in range(2):
    code = main(["export", run, "--to", "fiftyone", "--dataset", name])
    print(json.dumps({"exit": code, "samples": samples(name)}))
"""


def test_export_to_fiftyone_and_read_it_back(run: Path, tmp_path: Path):
    pytest.importorskip("fiftyone")
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    from pipeline import expand_map, read_maps

    env = {
        **os.environ,
        "FIFTYONE_DATABASE_DIR": str(tmp_path / "db"),  # its own mongod, on loopback
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }
    assert main(["discover", str(run / "run")]) == 0
    argv = [sys.executable, "-c", _EXPORT_TWICE, str(run / "run"), "wm"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # the CLI prints its own line ("export: wm") before each of the script's JSON lines
    first, again = (json.loads(s) for s in done.stdout.splitlines() if s.startswith("{"))
    assert first["exit"] == again["exit"] == 0
    samples = first["samples"]
    maps = read_maps(run / "run")
    ok = maps[maps["status"] == "ok"]
    assert set(samples) == set(ok["image_id"])  # one sample per ok image
    for _, row in ok.head(5).iterrows():
        np.testing.assert_allclose(np.array(samples[row["image_id"]]["map"]), expand_map(row),
                                   rtol=0, atol=1e-6)  # fmt: skip
    strategies = pd.read_parquet(run / "run" / "strategies.parquet")
    corner = _corner(strategies).iloc[0]
    tag = f"strategy:0#{corner['cluster']}"
    assert all(tag in samples[i]["tags"] for i in corner["members"])
    # exporting again updates the same samples instead of adding new ones
    assert again["samples"] == samples
