"""Escape sequences in image ids and group names never reach the terminal raw: a real run through
``python -m pipeline run`` whose ids and groups set the window title (``ESC ] 0 ; ... BEL``) and
clear the screen (``ESC [ 2 J``), some of them failing, then every other subcommand on it. The
output shows them escaped (``\\x1b``), with printable Unicode kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.terminal import printable
from tests._dataset import audit_config, image_set_with_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TITLE = "\x1b]0;pwned\x07"  # sets the terminal window's title
CLEAR = "\x1b[2J"  # clears the screen
N = 12
IDS = [f"img{TITLE}-{i:02d}" if i % 2 else f"ü{CLEAR}-{i:02d}" for i in range(N)]
GROUPS = [f"kitchen{TITLE}", f"hall{CLEAR}\u202e"]
MISSING = 2  # rows whose image file is missing: their failure lines name the id


def _raw(output: bytes | str) -> list[str]:
    """The terminal commands found in ``output``: ESC, BEL, CSI (C1), a bidi override."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    return [ch for ch in ("\x1b", "\x07", "\x9b", "\u202e") if ch in text]


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory, shared_ray) -> dict[str, object]:
    """The run, made by the CLI in a fresh process as a user would (joining the session's Ray
    head, as a job on a cluster does)."""
    root = image_set_with_model(tmp_path_factory.mktemp("escapes"), n=N)
    rows = pq.read_table(root / "manifest.parquet").to_pylist()
    for i, row in enumerate(rows):
        row.update(image_id=IDS[i], room=GROUPS[i % 2])
    for row in rows[:MISSING]:
        row["path"] = f"images/{row['image_id']}.png"  # no such file: an error row naming it
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    cfg = audit_config(
        root,
        root / "run",
        occlusion={"window": [8, 8], "stride": [8, 8], "n_baselines": 1, "baseline": "mean"},
        counterfactual={"enabled": False},
        cluster={"shard_size": 6, "actors": 1, "max_failures": MISSING, "address": "auto"},
        audit={"min_images": 2},
        output={"report_dir": str(root / "report")},
    )
    (root / "audit.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(root / "audit.yaml")],
        capture_output=True,
        cwd=REPO,
        env=shared_ray.environ(PYTHONPATH=str(REPO)),
        timeout=600,
    )
    return {"root": root, "run": root / "run", "done": done}


def test_the_run_prints_ids_and_groups_escaped(audit) -> None:
    done = audit["done"]
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    out, err = done.stdout.decode(), done.stderr.decode()
    assert _raw(out) == [] and _raw(err) == [], (out[-2000:], err[-2000:])
    failures = [line for line in err.splitlines() if line.startswith("  error ")]
    assert len(failures) == MISSING  # the failure lines: the id, escaped, once per line
    assert f"  error {printable(IDS[0])}: " in failures[0] and "\\x1b[2J" in failures[0]
    assert "ü" in failures[0]  # printable Unicode stays as it is
    assert printable(GROUPS[0]) in out and printable(GROUPS[1]) in out  # the summary table
    assert "kitchen\\x1b]0;pwned\\x07" in out and "hall\\x1b[2J\\u202e" in out


def test_every_other_subcommand_prints_them_escaped(audit, tmp_path, capfd) -> None:
    root, run = audit["root"], str(audit["run"])
    assert audit["done"].returncode == 0
    # the same maps judged with a threshold every group falls below: compare lists each group
    # as a new flag, by its label
    flagging = tmp_path / "flagging"
    shutil.copytree(run, flagging)
    record = json.loads((flagging / "run.json").read_text())
    record["config"]["audit"].update(threshold=1e9, fdr=None, max_error_share=0.5)
    (flagging / "run.json").write_text(json.dumps(record))
    commands = [
        ["inspect", str(root / "audit.yaml"), "--sample", "4", "--calibrate", "1"],
        ["aggregate", run, "--min-images", "2"],
        ["report", run, "--out", str(tmp_path / "report")],
        ["compare", run, str(flagging), "--out", str(tmp_path / "compare")],
        ["history", run, "--out", str(tmp_path / "history")],
        ["discover", run, "--group-by", "room"],
        ["export", run, "--to", "csv", "--out", str(tmp_path / "e.csv")],
    ]
    printed = {}
    for argv in commands:
        assert main(argv) == 0, argv
        printed[argv[0]] = capfd.readouterr()
    for name, (out, err) in printed.items():
        assert _raw(out) == [] and _raw(err) == [], (name, out[-2000:], err[-2000:])
    assert printable(GROUPS[0]) in printed["inspect"].out  # inspect's group list
    assert printable(GROUPS[1]) in printed["aggregate"].out  # the summary table
    assert f"new-flag   room={printable(GROUPS[0])}" in printed["compare"].out  # by verdict


def test_a_one_line_error_quotes_paths_and_ids_escaped(audit, tmp_path, capfd) -> None:
    """A manifest in a folder named from the data (``set<ESC>]0;pwned<BEL>``) repeats an id:
    the refusal names both."""
    root = audit["root"]
    rows = pq.read_table(root / "manifest.parquet").to_pylist()
    manifest = tmp_path / f"set{TITLE}" / "dup.parquet"
    manifest.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([*rows, rows[3]]), manifest)
    cfg = yaml.safe_load((root / "audit.yaml").read_text())
    cfg["dataset"]["manifest"] = str(manifest)
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["inspect", str(tmp_path / "dup.yaml")]) == 2
    out, err = capfd.readouterr()
    assert _raw(out) == [] and _raw(err) == [], err
    assert len(err.splitlines()) == 1 and "duplicate image id" in err
    assert printable(str(manifest)) in err and printable(IDS[3]) in err
