"""Malformed COCO files through the CLI: entries that are no objects, ids of the wrong type,
non-finite or absurd sizes, boxes and areas. Each is one line naming the file and the entry,
exit 2, for ``inspect`` and ``run`` alike; never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from tests._dataset import save_gap_model

REPO = Path(__file__).resolve().parents[1]


def _base() -> dict[str, Any]:
    """A valid instances file: three 16x16 images, one box each, two categories."""
    return {
        "images": [
            {"id": i, "file_name": f"im{i}.png", "height": 16, "width": 16, "room": "ab"[i % 2]}
            for i in range(1, 4)
        ],
        "annotations": [
            {"id": 10 + i, "image_id": i, "category_id": 1 + i % 2, "bbox": [2, 2, 8, 8]}
            for i in range(1, 4)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that puts ``value`` at ``path`` (``annotations.3`` or ``images.0.height``)."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list) and int(last) == len(node):
            node.append(value)
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


# name -> (edit of the valid file, what the one line must say)
MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "number-annotation": (_set("annotations.3", 7), "annotations[3] is 7; each entry"),
    "infinite-height": (_set("images.0.height", "<1e400>"), "images[0].height is Infinity"),
    "negative-width": (_set("images.2.width", -3), "images[2].width is -3"),
    "absurd-width": (_set("images.1.width", 1e20), "images[1].width is 1e+20"),
    "fractional-height": (_set("images.1.height", 15.5), "images[1].height is 15.5"),
    "text-image": (_set("images.1", "im2.png"), 'images[1] is "im2.png"'),
    "null-category": (_set("categories.0", None), "categories[0] is null"),
    "list-image-id": (_set("images.0.id", [1]), "images[0].id is [1]"),
    "float-image-id": (_set("images.2.id", 2.5), "images[2].id is 2.5"),
    "bool-category-id": (_set("annotations.1.category_id", True), "category_id is true"),
    "missing-image-id": (lambda d: d["annotations"][2].pop("image_id"), "image_id is null"),
    "text-in-bbox": (_set("annotations.0.bbox", [0, 0, "2", 2]), "annotations[0].bbox is"),
    "infinite-bbox": (_set("annotations.2.bbox", [0, 0, 1e400, 2]), "annotations[2].bbox is"),
    "short-bbox": (_set("annotations.1.bbox", [1, 2, 3]), "annotations[1].bbox is [1, 2, 3]"),
    "nan-area": (_set("annotations.1.area", float("nan")), "annotations[1].area is NaN"),
    "negative-area": (_set("annotations.0.area", -1), "annotations[0].area is -1"),
    "huge-integer-area": (_set("annotations.0.area", 10**400), "annotations[0].area is 1000"),
    "bad-polygon": (_set("annotations.0.segmentation", [[1, 2, "x"]]), "segmentation[0] is"),
    "bad-rle": (_set("annotations.2.segmentation", {"counts": 5}), "segmentation.size is null"),
    "number-file-name": (_set("images.0.file_name", 5), "images[0].file_name is 5"),
    "dict-annotations": (_set("annotations", {"1": {}}), "annotations is {"),
    "number-category-name": (_set("categories.1.name", 2), "categories[1].name is 2"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    for i in range(1, 4):
        arr = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"im{i}.png")
    save_gap_model(root / "model.pt")
    return root


def _config(root: Path, name: str, edit: Callable[[dict[str, Any]], None] | None) -> Path:
    data = _base()
    if edit is not None:
        edit(data)
    # json.dumps writes inf and nan as Infinity and NaN, as Python's reader takes them; "<1e400>"
    # stands for the number 1e400, which the reader turns into infinity
    (root / f"{name}.json").write_text(json.dumps(data).replace('"<1e400>"', "1e400"))
    cfg = {
        "name": name,
        "dataset": {
            "manifest": str(root / f"{name}.json"),
            "root": str(root),
            "group_by": ["room"],
            "image_size": [16, 16],
        },
        "model": {
            "factory": "pipeline.models:SeedCNNWithGAP",
            "kwargs": {"num_classes": 2},
            "weights": str(root / "model.pt"),
        },
        "occlusion": {"window": [8, 8], "stride": [8, 8], "baseline": "mean"},
        "output": {"dir": str(root / "runs" / name), "report_dir": str(root / "reports" / name)},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line(err: str, command: str, *words: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"occlusion-audit {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_the_valid_file_inspects(root, capsys) -> None:
    assert main(["inspect", str(_config(root, "valid", None)), "--calibrate", "1"]) == 0
    assert "images: 3 in 1 shard(s)" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("command", ["inspect", "run"])
def test_a_malformed_file_is_one_line_naming_the_entry(root, capsys, name, command) -> None:
    edit, words = MALFORMED[name]
    cfg = _config(root, f"{name}-{command}", edit)
    assert main([command, str(cfg)]) == 2
    _one_line(capsys.readouterr().err, command, f"{name}-{command}.json: ", words)
    assert not (root / "runs" / f"{name}-{command}").exists()  # refused before any compute


def test_nesting_too_deep_for_the_parser_is_one_line(root, capsys) -> None:
    cfg = _config(root, "deep", None)
    (root / "deep.json").write_text('{"images": [], "annotations": ' + "[" * 100_000 + "]}")
    assert main(["inspect", str(cfg)]) == 2
    _one_line(capsys.readouterr().err, "inspect", "deep.json", "nested too deeply")


@pytest.mark.parametrize("name", ["number-annotation", "infinite-height"])
def test_the_console_command_exits_2_without_a_traceback(root, name) -> None:
    """The two reported crashes, as a user meets them: ``python -m pipeline run`` in a shell."""
    cfg = _config(root, f"{name}-process", MALFORMED[name][0])
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    _one_line(done.stderr, "run", f"{name}-process.json: ", MALFORMED[name][1])
