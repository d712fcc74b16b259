"""Every model family a user brings, through the whole pipeline as a user runs it: ``python -m
pipeline run CFG``, then ``aggregate`` and ``report`` (the CLI's ``main``).

Tiny random models at 32 px, each loaded from a YAML file, one per model source and engine
path: timm ResNet and ViT, a Hugging Face ViT (a folder written by ``save_pretrained``), a
torchvision ResNet, a ``.pt2`` archive with a dynamic batch, and a factory module beside the
YAML (every other family is loaded and resolved in-process by ``tests/test_model_zoo.py``).
``run.json`` records the source and the engine the workers
picked (``occlusion.engine: auto``), which must be the one expected for the family
(``tests/test_model_zoo.py`` checks that ``auto`` resolves to it). The drivers join one Ray
of the session (``RAY_ADDRESS``), two at a time, so the matrix does not pay for Ray's start and one
driver's start-up overlaps another's workers. Archives and outputs that cannot work are refused
before Ray starts. A timm ViT also runs with ``occlusion.mode: token-drop``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import attribute, load_config, read_maps
from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.data.images import load_image
from pipeline.models import load_model
from pipeline.run.settings import kernel_keywords, worker_compute
from tests._dataset import make_image_set
from tests._shared_ray import STARTUP  # tests/_torchvision_ops.py in subprocesses
from tests._zoo import FAMILIES, SIDE, export_pt2, hf_folder, model_section

pytestmark = pytest.mark.slow

# One family per model source and engine path through the whole CLI: each costs a driver, a
# worker and the library's import (about 25 s here). Every family of tests/_zoo.py is loaded,
# checked and resolved to its engine in-process by tests/test_model_zoo.py.
RUN_FAMILIES = (
    "timm-resnet",  # timm, incremental
    "timm-vit",  # timm, generic (a ViT)
    "hf-vit",  # transformers save_pretrained folder, generic
    "hf-convnext",  # transformers, incremental (traced with the input's shape known)
    "torchvision-resnet18",  # torchvision, incremental
    "export-pt2",  # torch.export archive, incremental (aten ops lowered to torch ones)
    "factory-beside-yaml",  # a factory module found beside the YAML
)
N_IMAGES = 4


def _write_config(
    data: Path, folder: Path, model: dict[str, Any], address: str, **occlusion: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": folder.name,
        "dataset": {
            "manifest": str(data / "manifest.parquet"),
            "root": str(data),
            "group_by": ["room"],
            "image_size": [SIDE, SIDE],
        },
        "model": model,
        # 4 windows and one fixed baseline: the model's cost, not the kernel's, is measured
        "occlusion": {
            "window": [16, 16],
            "stride": [16, 16],
            "baseline": "zero",
            "max_batch": 8,
            **occlusion,
        },
        "counterfactual": {"enabled": False},
        "cluster": {"address": address, "actors": 1, "shard_size": N_IMAGES},
        "audit": {"min_images": 2, "bootstrap": 200},
        "output": {"dir": "run", "report_dir": "report"},
    }
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (STARTUP, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo-data")
    make_image_set(root, n=N_IMAGES, size=(40, 40))
    return root


@pytest.fixture(scope="module")
def zoo_ray(shared_ray) -> dict[str, str]:
    """The environment that joins the session's Ray head, whose workers import tests/_startup
    (tests/_shared_ray.py)."""
    return shared_ray.env


@pytest.fixture(scope="module")
def runs(data, zoo_ray, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """``run CFG --no-report`` of every family, each config in its own folder; the drivers run
    from another folder (a factory beside the YAML must not need the working directory)."""
    top = tmp_path_factory.mktemp("zoo-runs")

    def one(family: str) -> tuple[Path, subprocess.CompletedProcess]:
        folder = top / family
        folder.mkdir()
        cfg = _write_config(data, folder, model_section(family, folder), "auto")
        env = _env(**zoo_ray)
        return folder, _cli("run", str(cfg), "--no-report", "--quiet", cwd=top, env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(RUN_FAMILIES, pool.map(one, RUN_FAMILIES), strict=True))


@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_every_family_runs_aggregates_and_reports(family, runs, capsys):
    folder, proc = runs[family]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((folder / "run" / "run.json").read_text())
    assert record["status"] == "finished" and record["counts"]["ok"] == N_IMAGES
    kind, expected = FAMILIES[family]
    assert record["model_source"].startswith(f"{kind}:")
    assert record["engine"]["path"] == expected, record["engine"]
    if expected == "generic":  # the incremental engine's refusal is recorded, and says why
        assert len(record["engine"]["notes"]) == 1 and record["engine"]["notes"][0]
    assert main(["aggregate", str(folder / "run")]) == 0
    assert "room" in capsys.readouterr().out and (folder / "run" / "summary.parquet").is_file()
    assert main(["report", str(folder / "run"), "--out", str(folder / "report")]) == 0
    assert (folder / "report" / "index.html").is_file()


@pytest.mark.parametrize("case", ["batch-1 export", "wrong model.output"])
def test_unusable_models_are_refused_before_ray(case, data, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    if case == "batch-1 export":
        model = {"export": str(export_pt2(folder / "b1.pt2", dynamic=False, batch=1))}
        words = ["fixed batch of 1", "dynamic_shapes="]
    else:
        model = {"transformers": str(hf_folder("vit", folder / "vit")), "output": "probs"}
        words = ["model.output 'probs'", "keys ['logits']"]
    cfg_path = _write_config(data, folder, model, "local")
    proc = _cli("run", str(cfg_path), cwd=tmp_path, env=_env(RAY_ADDRESS="local"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("occlusion-audit run: error:"), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Ray" not in proc.stderr + proc.stdout  # no Ray was started
    assert not (folder / "run").exists()


def test_token_drop_through_the_cli_on_a_timm_vit(data, zoo_ray, tmp_path, capsys):
    """``occlusion.mode: token-drop`` as a user runs it: the maps record their mode, equal the
    API's bit for bit, and ``run.json`` and the report say which mode made them."""
    folder = tmp_path / "vit"
    section = model_section("timm-vit", folder)
    # random weights, saved: the workers and this test must load the same ones
    torch.save(load_model(ModelConfig(**section)).state_dict(), tmp_path / "vit.pth")
    section["weights"] = str(tmp_path / "vit.pth")
    # 9 windows of 2x2 of the 4x4 tokens: 9 passes per image instead of fill's 27 at K=3
    cfg_path = _write_config(data, folder, section, "auto", mode="token-drop", stride=[8, 8])
    proc = _cli("run", str(cfg_path), "--no-report", "--quiet", cwd=tmp_path,
                env=_env(**zoo_ray))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((folder / "run" / "run.json").read_text())
    assert record["identity"]["occlusion"]["mode"] == "token-drop"
    assert record["identity"]["occlusion"]["n_baselines"] == 1
    assert record["engine"]["path"] == "token-drop", record["engine"]
    assert "timm VisionTransformer, 8x8 patches" in record["engine"]["notes"][0]
    maps = read_maps(folder / "run").sort_values("image_id")
    assert set(maps["mode"]) == {"token-drop"} and set(maps["status"]) == {"ok"}

    cfg = load_config(cfg_path)
    ids = list(maps["image_id"])
    paths = zip(maps["path"], ids, strict=True)
    images = torch.stack([load_image(p, str(data), (SIDE, SIDE), image_id=i)[0] for p, i in paths])
    model = load_model(cfg.model, cfg.dataset.normalize, "cpu")
    wc = worker_compute(cfg.occlusion, model, (3, SIDE, SIDE), torch.device("cpu"))
    api = attribute(model, images, image_ids=ids, options=wc.options, **kernel_keywords(cfg))
    stored = np.stack(maps["delta"].to_list())
    np.testing.assert_array_equal(stored, api.delta[:, 0].flatten(1).numpy())

    assert main(["aggregate", str(folder / "run")]) == 0
    assert main(["report", str(folder / "run"), "--out", str(folder / "report")]) == 0
    capsys.readouterr()
    page = (folder / "report" / "index.html").read_text()
    assert "mode: token-drop" in page and "baseline:" not in page
