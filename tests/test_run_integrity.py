"""Nothing lost, nothing mixed: a run on a real local Ray under hostile files, failing models,
refused folders, changed settings and a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline import load_config, read_maps, run_audit
from tests._dataset import audit_config, image_set_with_model, save_gap_model
from tests._faults import Background, cli, save_picky_model

# Every run here is in this process, on the module's embedded Ray: what is tested is
# what a run writes, refuses and resumes, not how it starts Ray.
pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=12)


def _copy(image_set: Path, dest: Path) -> Path:
    shutil.copytree(image_set, dest)
    return dest


def _cli(
    config: dict, tmp_path: Path, *args: str, name: str = "cfg"
) -> subprocess.CompletedProcess:
    """``run CONFIG --quiet --no-report ARGS`` in this process, on the module's Ray."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli("run", str(path), "--quiet", "--no-report", *args)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [s for s in proc.stderr.splitlines() if "occlusion-audit run: error:" in s]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_hostile_files_are_one_error_row_each(local_ray, image_set, tmp_path):
    root = _copy(image_set, tmp_path / "data")
    images = root / "images"
    for name in ("img005", "img006", "img007"):
        (images / f"{name}.png").unlink()
    os.mkfifo(images / "img005.png")  # opening it for reading would wait forever
    (images / "img006.png").symlink_to("/dev/zero")  # reading it would never end
    Image.new("I;16", (8000, 8000)).save(images / "img007.png")  # ~100 KB, 64 MP decoded
    raw = audit_config(root, tmp_path / "run", cluster={"shard_size": 4})
    raw["dataset"]["max_pixels"] = 10_000_000
    result = Background(lambda: run_audit(load_config(raw), progress=False)).join(timeout=120)
    maps = read_maps(tmp_path / "run")
    errors = dict(zip(maps["image_id"], maps["error"], strict=True))
    bad = sorted(k for k, s in zip(maps["image_id"], maps["status"], strict=True) if s != "ok")
    assert bad == ["img005", "img006", "img007"]
    assert "FIFO" in errors["img005"] and "character device" in errors["img006"]
    assert "64000000 pixels" in errors["img007"]
    assert (result.ok, result.errors, result.exit_code) == (9, 3, 1)


def test_a_model_failing_on_one_image_fails_only_that_image(local_ray, image_set, tmp_path):
    root = _copy(image_set, tmp_path / "data")
    marked = np.asarray(Image.open(root / "images" / "img003.png")).copy()
    marked[0, 0] = (255, 0, 255)
    Image.fromarray(marked).save(root / "images" / "img003.png")
    model = {"torchscript": str(save_picky_model(tmp_path / "picky.pt"))}
    # max_batch 64 with 12 windows: every batch is padded, which once meant blank images
    occlusion = {"window": [8, 8], "stride": [8, 8], "n_baselines": 2, "max_batch": 64}
    raw = audit_config(root, tmp_path / "run", occlusion=occlusion, cluster={"shard_size": 6})
    raw["model"] = model
    result = run_audit(load_config(raw), progress=False)
    maps = read_maps(tmp_path / "run")
    bad = maps[maps["status"] != "ok"]
    assert bad["image_id"].tolist() == ["img003"], bad[["image_id", "error"]]
    assert "the marked image" in bad["error"].iloc[0] and "\n" not in bad["error"].iloc[0]
    assert (result.ok, result.errors) == (11, 1)


def _write_pickle_bomb(path: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    import pickle

    path.write_bytes(pickle.dumps({"w": Evil()}))
    return path


@pytest.mark.parametrize("case", ["missing", "not-a-model", "pickle", "kwargs", "factory"])
def test_a_broken_model_exits_2_in_one_line_before_any_run_folder(image_set, tmp_path, case):
    raw = audit_config(image_set, tmp_path / "run")
    if case == "missing":
        raw["model"]["weights"] = str(tmp_path / "nope.pth")
    elif case == "not-a-model":
        (tmp_path / "m.pt").write_bytes(os.urandom(2000))
        raw["model"] = {"torchscript": str(tmp_path / "m.pt")}
    elif case == "pickle":
        raw["model"]["weights"] = str(_write_pickle_bomb(tmp_path / "evil.pth"))
    elif case == "kwargs":
        raw["model"]["kwargs"] = {"num_classes": 2, "width": 3}
    else:
        raw["model"]["factory"] = "pipeline.models:NoSuchNet"
    proc = _cli(raw, tmp_path)
    _one_line_error(proc, 2, "model cannot be loaded")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "pwned").exists()


def test_a_model_the_workers_cannot_run_ends_in_one_line(image_set, tmp_path):
    # loads in the driver, but a scripted model cannot be traced for the incremental engine
    raw = audit_config(image_set, tmp_path / "run", occlusion={"engine": "incremental"})
    raw["model"] = {"torchscript": str(save_picky_model(tmp_path / "picky.pt"))}
    _one_line_error(_cli(raw, tmp_path), 2, "the workers could not start", "incremental")


def test_a_hostile_config_is_refused_in_one_line(image_set, tmp_path):
    raw = audit_config(image_set, tmp_path / "run")
    text = yaml.safe_dump(raw)
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    cases = {
        "bomb": "\n".join(bomb) + "\n" + text,
        "duplicate": text + "name: again\n",
    }
    for name, body in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(body)
        proc = cli("run", str(path))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert ("more than" if name == "bomb" else "duplicate key") in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_refused(image_set, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = _cli(audit_config(image_set, out), tmp_path)
    _one_line_error(proc, 2, "not a run folder", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


@contextlib.contextmanager
def _mount(target: Path, *options: str):
    target.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", *options, str(target)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount here (needs root): {e}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def test_a_read_only_output_folder_exits_2_in_one_line(image_set, tmp_path):
    ro = tmp_path / "ro"
    with _mount(ro, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"):
        proc = _cli(audit_config(image_set, ro / "run"), tmp_path)
        _one_line_error(proc, 2, "cannot write the output folder", "Read-only")


def test_resume_refuses_other_settings_and_shards_without_a_record(image_set, tmp_path):
    root = _copy(image_set, tmp_path / "data")
    raw = audit_config(root, tmp_path / "run", cluster={"shard_size": 4})
    assert _cli(raw, tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "maps").iterdir()}

    other_model = tmp_path / "other.pt"
    save_gap_model(other_model, seed=1)
    changes = {
        "cluster.shard_size": {"cluster": {**raw["cluster"], "shard_size": 5}},
        "occlusion.stride": {"occlusion": {**raw["occlusion"], "stride": [2, 2]}},
        "model_sha256": {"model": {**raw["model"], "weights": str(other_model)}},
    }
    for key, change in changes.items():
        proc = _cli({**raw, **change}, tmp_path, "--resume", name=key)
        _one_line_error(proc, 2, "cannot resume", key)
    # a run recorded before occlusion.compile and occlusion.mode existed resumes with them off
    # (compile false, mode fill), not with compile on
    record_path = tmp_path / "run" / "run.json"
    record = json.loads(record_path.read_text())
    del record["identity"]["occlusion"]["compile"], record["identity"]["occlusion"]["mode"]
    record_path.write_text(json.dumps(record))
    on = {"occlusion": {**raw["occlusion"], "compile": True}}
    _one_line_error(_cli({**raw, **on}, tmp_path, "--resume"), 2, "cannot resume", "compile")
    assert _cli(raw, tmp_path, "--resume").returncode == 0
    # the same manifest path with other rows (an image swapped in place)
    table = pq.read_table(root / "manifest.parquet").to_pylist()
    table[0]["path"], table[1]["path"] = table[1]["path"], table[0]["path"]
    pq.write_table(pa.Table.from_pylist(table), root / "manifest.parquet")
    _one_line_error(_cli(raw, tmp_path, "--resume"), 2, "cannot resume", "manifest_sha256")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "maps").iterdir()} == before

    (tmp_path / "run" / "run.json").unlink()
    _one_line_error(_cli(raw, tmp_path, "--resume"), 2, "no record of the settings")


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_resume_finishes_it(image_set, tmp_path):
    occlusion = {"window": [8, 8], "stride": [4, 4], "n_baselines": 2, "max_batch": 64}
    ref_raw = audit_config(image_set, tmp_path / "ref", occlusion=occlusion)
    ref_raw["cluster"] = {"shard_size": 2, "actors": 1}
    assert _cli(ref_raw, tmp_path, name="ref").returncode == 0
    pages_of = lambda p: -(-p.stat().st_size // 4096)  # noqa: E731 (tmpfs counts whole pages)
    shards = [pages_of(p) for p in (tmp_path / "ref" / "maps").glob("part-*.parquet")]
    record = pages_of(tmp_path / "ref" / "run.json")
    # room for the run record and about half of the shards: tmpfs counts whole 4 KiB pages
    pages = record + sum(shards[: len(shards) // 2])
    disk = tmp_path / "disk"
    with _mount(disk, "-t", "tmpfs", "-o", f"size={pages * 4}k", "tmpfs"):
        raw = {**ref_raw, "output": {"dir": str(disk / "run")}}
        proc = _cli(raw, tmp_path)
        line = _one_line_error(proc, 4, "not stored", "--resume")
        assert "No space left" in line, line
        stored = read_maps(disk / "run")
        assert 0 < len(stored) < 12 and stored["status"].eq("ok").all()  # no error rows
        assert not [p for p in (disk / "run" / "maps").iterdir() if p.name.endswith(".tmp")]
        record = json.loads((disk / "run" / "run.json").read_text())
        assert record["status"] in ("running", "stopped")

        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        resumed = _cli(raw, tmp_path, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        maps = read_maps(disk / "run").sort_values("image_id")
        ref = read_maps(tmp_path / "ref").sort_values("image_id")
        assert maps["status"].eq("ok").all() and len(maps) == 12
        np.testing.assert_array_equal(np.stack(maps["delta"]), np.stack(ref["delta"]))
