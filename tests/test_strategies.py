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
