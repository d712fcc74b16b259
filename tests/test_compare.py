"""Runs against runs on the demo: a model with the planted shortcut against one trained without
it, the trend over three runs, and a scheduled-style run that posts to a webhook."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.demo import DEFAULT_SHORTCUT_ROOMS
from pipeline.demo.synth import generate_dataset
from pipeline.demo.train import train_demo_model
from tests._browser import chromium, probe_page
from tests._faults import cli

pytestmark = pytest.mark.slow
CLEAN_ROOMS = {"kitchen", "hallway", "bedroom", "living-room"}


@pytest.fixture(scope="module")
def demo(quick_demo: Path, local_ray) -> Path:
    """The quick demo (planted shortcut model, run ``runs/demo``) plus a model trained without
    the shortcut on as many views, audited on the same images into ``runs/clean``. The module's
    runs are in this process, on the module's embedded Ray."""
    out = quick_demo
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    train = generate_dataset(
        out / "data" / "clean-train", 120, shortcut_rooms=(), image_size=(64, 64)
    )
    weights = train_demo_model(train, out / "model" / "clean.pt", epochs=10, image_size=64)
    torch.set_num_threads(threads)
    overrides = ["--set", f"model.weights={weights}", "--set", f"output.dir={out / 'runs/clean'}"]
    overrides += ["--set", f"output.report_dir={out / 'report-clean'}"]
    assert main(["run", str(out / "demo.yaml"), "--quiet", *overrides]) == 0
    return out


def test_the_planted_rooms_improve_and_the_others_do_not_change(demo: Path):
    runs = demo / "runs"
    assert main(["compare", str(runs / "demo"), str(runs / "clean")]) == 0
    table = pd.read_parquet(runs / "clean" / "compare" / "compare.parquet")
    verdict = dict(zip(table["room"], table["verdict"], strict=True))
    assert {verdict[r] for r in DEFAULT_SHORTCUT_ROOMS} <= {"cleared", "improved"}
    assert {verdict[r] for r in CLEAN_ROOMS} == {"unchanged"}
    assert table["paired"].all()  # the same images in both runs
    planted = table[table["room"].isin(DEFAULT_SHORTCUT_ROOMS)]
    assert (planted["change_low"] > 1.5).all()
    summary = json.loads((runs / "clean" / "compare" / "compare.json").read_text())
    assert summary["counts"]["unchanged"] == 4 and summary["bad"] == 0


def test_the_gate_fails_the_other_way_round(demo: Path, tmp_path: Path):
    runs = demo / "runs"
    args = ["compare", str(runs / "clean"), str(runs / "demo"), "--out", str(tmp_path / "c")]
    assert main([*args, "--fail-on", "new-flag,regressed"]) == 1
    table = pd.read_parquet(tmp_path / "c" / "compare.parquet")
    # the clean model flags neither planted room, the shortcut model both: new flags
    assert set(table.loc[table["verdict"] == "new-flag", "room"]) == set(DEFAULT_SHORTCUT_ROOMS)
    assert set(table.loc[table["verdict"] != "new-flag", "verdict"]) == {"unchanged"}
    assert main([*args, "--fail-on", "regressed"]) == 0  # nothing regressed: they are new flags


def test_runs_with_other_occlusion_settings_are_refused_unless_forced(demo: Path, tmp_path: Path):
    other = tmp_path / "stride16"
    # a coarser grid: a quarter of the windows, so the second run is cheap
    overrides = ["--set", "occlusion.stride=[16,16]", "--set", f"output.dir={other}"]
    overrides += ["--no-report"]
    assert main(["run", str(demo / "demo.yaml"), "--quiet", *overrides]) == 0
    proc = cli("compare", str(demo / "runs" / "demo"), str(other))
    assert proc.returncode == 2 and "occlusion.stride ([8, 8] -> [16, 16])" in proc.stderr
    assert main(["compare", str(demo / "runs" / "demo"), str(other), "--force"]) == 0


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed")
def test_the_compare_and_history_pages_render(demo: Path, tmp_path: Path):
    runs = demo / "runs"
    assert main(["compare", str(runs / "demo"), str(runs / "clean")]) == 0
    attrs, dom = probe_page(runs / "clean" / "compare" / "compare.html", tmp_path)
    assert attrs["data-problems"] == "[]" and attrs["data-broken"] == "[]"
    assert int(attrs["data-images"]) >= 1 + 2 * 4  # the chart and both maps of moved images
    assert "room=garage: flagged in A, not in B" in dom  # cleared, in words

    trio = tmp_path / "trio"
    for name in ("demo", "clean"):
        shutil.copytree(runs / name, trio / name, ignore=shutil.ignore_patterns("compare"))
    overrides = ["--set", f"output.dir={trio / 'again'}", "--no-report"]
    assert main(["run", str(demo / "demo.yaml"), "--quiet", *overrides]) == 0
    assert main(["history", str(trio), "--out", str(tmp_path / "h")]) == 0
    history = pd.read_parquet(tmp_path / "h" / "history.parquet")
    assert history["run"].tolist()[:: len(history) // 3] == ["demo", "clean", "again"]
    flagged = history[history["status"] == "flagged"]
    assert set(flagged["room"]) == set(DEFAULT_SHORTCUT_ROOMS)
    attrs, dom = probe_page(tmp_path / "h" / "history.html", tmp_path)
    assert attrs["data-problems"] == "[]" and attrs["data-broken"] == "[]"
    # the chart, and a row per room (a room whose verdict changed is marked data-changed)
    assert int(attrs["data-images"]) == 1 and dom.count("<tr") == 1 + 6


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # keep the test output quiet
        pass


def test_a_scheduled_run_compares_with_the_last_night_and_posts_the_summary(
    demo: Path, tmp_path: Path
):
    nights = tmp_path / "runs"
    shutil.copytree(demo / "runs" / "clean", nights / "2026-12-01",
                    ignore=shutil.ignore_patterns("compare"))  # fmt: skip
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = yaml.safe_load((demo / "demo.yaml").read_text())
        cfg["trend"] = {"runs_dir": str(nights)}
        cfg["notify"] = {"webhook": f"http://127.0.0.1:{server.server_port}/audit"}
        path = demo / "nightly.yaml"  # beside the demo data: its relative paths resolve
        path.write_text(yaml.safe_dump(cfg))
        tonight = ["--set", f"output.dir={nights / '2026-12-02'}"]
        tonight += ["--set", f"output.report_dir={tmp_path / 'reports' / '2026-12-02'}"]
        proc = cli("run", str(path), "--quiet", *tonight)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.shutdown()
    assert len(_Hook.received) == 1
    doc = _Hook.received[0]
    assert doc["name"] == "demo" and sorted(doc["flagged"]) == ["room=garage", "room=office"]
    assert doc["compare"]["previous"].endswith("2026-12-01")
    assert sorted(doc["compare"]["new_flags"]) == ["room=garage", "room=office"]
    assert doc["compare"]["regressions"] == [] and doc["compare"]["counts"]["unchanged"] == 4
    assert doc["history"]["runs"] == 2
    report = tmp_path / "reports" / "2026-12-02"
    assert (report / "compare" / "compare.html").exists()
    assert (report / "history" / "history.html").exists()
