"""Hostile inputs without Ray: YAML bombs, special files, pixel bombs, spreadsheet formulas,
odd model outputs, failure-heavy groups, and reading a folder that holds no run."""

from __future__ import annotations

import csv
import io
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import aggregate, attribute, load_config, write_report
from pipeline.config import ConfigError
from pipeline.config.yaml_safe import MAX_NODES
from pipeline.data.images import DataError, load_image
from pipeline.report.build import escape_formula
from tests._runfixtures import make_row, standard_rows, write_run

MINIMAL = "dataset: {manifest: m.csv}\nmodel: {torchscript: m.pt}\n"


def _config_error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return err.value


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    # 9 levels of 10 aliases: 10^9 values from a few hundred bytes
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    text = MINIMAL.replace("model: {torchscript: m.pt}", "model:\n  torchscript: m.pt")
    bomb = "\n".join(lines) + "\n" + text
    assert len(bomb.encode()) < 1000
    t0 = time.perf_counter()
    err = _config_error(tmp_path, bomb)
    assert f"more than {MAX_NODES} values" in str(err)
    assert time.perf_counter() - t0 < 5  # refused while counting, never expanded
    assert len(str(err)) < 300  # a short line, not the expansion


def test_duplicate_keys_are_an_error_naming_the_key(tmp_path):
    err = _config_error(tmp_path, MINIMAL + "occlusion:\n  window: [8, 8]\n  window: [16, 16]\n")
    assert err.key == "window" and "duplicate key" in str(err) and "line 5" in str(err)
    err = _config_error(tmp_path, MINIMAL + "dataset: {manifest: other.csv}\n")
    assert err.key == "dataset"


def test_deep_and_large_configs_are_refused(tmp_path):
    deep = MINIMAL + "audit: " + "[" * 200 + "]" * 200 + "\n"
    assert "deeper than" in str(_config_error(tmp_path, deep))
    big = tmp_path / "big.yaml"
    big.write_text(MINIMAL + "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="limit is"):
        load_config(big)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _in_thread(fn, timeout: float = 10.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "the read blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_special_files_are_refused_by_name_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(DataError, match=r"'x'.*FIFO"):
        _in_thread(lambda: load_image("fifo.png", str(tmp_path), (8, 8), image_id="x"))
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # would read forever
    with pytest.raises(DataError, match="character device"):
        _in_thread(lambda: load_image("zero.png", str(tmp_path), (8, 8), max_bytes=1 << 20))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match=r"dir\.png"):
        load_image("dir.png", str(tmp_path), (8, 8))


def test_file_size_and_pixel_bombs_are_refused_before_decoding(tmp_path):
    # 8000x8000 16-bit gray of zeros: ~80 KB of PNG, 128 MB of pixels once decoded
    bomb = Image.new("I;16", (8000, 8000))
    bomb.save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 500_000
    with pytest.raises(DataError, match=r"64000000 pixels.*dataset\.max_pixels"):
        load_image("bomb.png", str(tmp_path), (8, 8), max_pixels=25_000_000)
    noise = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    (tmp_path / "ok.png").write_bytes(_png_bytes(noise))  # ~800 bytes: noise does not compress
    with pytest.raises(DataError, match=r"dataset\.max_file_bytes"):
        load_image("ok.png", str(tmp_path), (8, 8), max_bytes=100)
    x, size = load_image("ok.png", str(tmp_path), (8, 8), max_bytes=10_000, max_pixels=256)
    assert x.shape == (3, 8, 8) and size == (16, 16)


def test_spreadsheet_formulas_are_escaped_in_every_csv(tmp_path):
    evil_group = '=HYPERLINK("http://x","click")'
    rows = standard_rows()
    rows += [make_row(f"+evil{i}", {"room": evil_group}, 0.2 + 0.01 * i) for i in range(25)]
    rows.append(make_row("@bad", {"room": "-cmd"}, math.nan, error="=1+1 broke"))
    run = write_run(tmp_path / "run", rows, ["room"])
    out = write_report(run, tmp_path / "report").parent
    cells = []
    for name in ("summary.csv", "flags.csv", "curation.csv"):
        with open(out / name, newline="", encoding="utf-8") as f:
            cells += [c for row in csv.reader(f) for c in row]
    text_cells = [c for c in cells if c[:1] in ("=", "+", "@") or c.startswith("-c")]
    assert not text_cells, text_cells  # nothing a spreadsheet would run
    assert "'" + evil_group in cells and "'+evil0" in cells and "'-cmd" in cells
    assert escape_formula(-0.5) == -0.5 and escape_formula("-0.5") == "'-0.5"
    assert escape_formula("kitchen") == "kitchen"


def test_a_group_with_many_failures_is_unreliable(tmp_path):
    rows = [make_row(f"a{i}", {"room": "attic"}, 0.5) for i in range(27)]
    rows += [make_row(f"e{i}", {"room": "attic"}, math.nan, error="broken") for i in range(23)]
    rows += [make_row(f"b{i}", {"room": "bath"}, 0.5) for i in range(47)]
    rows += [make_row(f"f{i}", {"room": "bath"}, math.nan, error="broken") for i in range(3)]
    summary = aggregate(write_run(tmp_path / "run", rows, ["room"]), write=False)
    status = dict(zip(summary["room"], summary["status"], strict=True))
    assert status == {"attic": "unreliable", "bath": "flagged"}  # 46% vs 6% failed
    loose = aggregate(tmp_path / "run", write=False, max_error_share=0.5)
    assert set(loose["status"]) == {"flagged"}


def test_model_outputs_of_other_shapes_are_named():
    class Grid(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))[:, :2, None].expand(-1, 2, 3)  # (B, 2, 3)

    with pytest.raises(ValueError, match=r"shape \(2, 2, 3\).*expected \(B,\) scores or \(B, O\)"):
        attribute(Grid(), torch.rand(2, 3, 8, 8), window=[4, 4])


def test_aggregate_on_a_folder_without_maps_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no maps/part-.*not a run folder"):
        aggregate(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no maps/part-"):
        aggregate(tmp_path / "empty")
