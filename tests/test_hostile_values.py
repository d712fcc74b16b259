"""Values the contract forbids are refused where the setting is defined, before any work, with
one line naming the key: the window grid at config load, the aggregation flags through the
audit settings' own validation, the blur sigma in the kernel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline import attribute
from pipeline.audit.aggregate import aggregate
from pipeline.config import ConfigError
from tests._dataset import audit_config, image_set_with_model
from tests._faults import cli
from tests._runfixtures import standard_rows, write_run


def _one_line(proc: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [s for s in proc.stderr.splitlines() if f"occlusion-audit {command}: error:" in s]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("hostile") / "run", standard_rows(), ["room"])


@pytest.mark.parametrize(
    ("flags", "key", "shown"),
    [
        (["--threshold", "0"], "audit.threshold", "got 0.0"),
        (["--threshold", "nan"], "audit.threshold", "got nan"),
        (["--min-images", "0", "--fdr", "sometimes"], "audit.", ""),
    ],
)
def test_aggregate_refuses_values_the_audit_settings_refuse(run_dir, flags, key, shown) -> None:
    before = sorted(p.name for p in run_dir.iterdir())
    line = _one_line(cli("aggregate", str(run_dir), *flags), "aggregate", key, shown)
    assert "math domain" not in line
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no summary written


@pytest.mark.parametrize(
    ("given", "key", "shown"),
    [
        ({"threshold": 0.0}, "audit.threshold", "got 0.0"),
        ({"threshold": -1.0}, "audit.threshold", "got -1.0"),
        ({"threshold": float("nan")}, "audit.threshold", "got nan"),
        ({"min_images": 0}, "audit.min_images", "got 0"),
        ({"confidence": 1.0}, "audit.confidence", "got 1.0"),
        ({"max_error_share": float("nan")}, "audit.max_error_share", "got nan"),
        ({"fdr": "2"}, "audit.fdr", "got 2.0"),
        ({"fdr": "sometimes"}, "audit.fdr", "'sometimes'"),
        ({"bootstrap": 0}, "audit.bootstrap", "got 0"),
    ],
)
def test_the_api_refuses_them_alike(run_dir, given, key, shown) -> None:
    with pytest.raises(ConfigError) as e:
        aggregate(run_dir, write=False, **given)
    assert e.value.key == key and shown in str(e.value)


def test_values_in_range_still_aggregate(run_dir) -> None:
    summary = aggregate(run_dir, threshold=0.5, fdr="off", min_images=1, write=False)
    assert summary.attrs["audit"]["threshold"] == 0.5 and summary.attrs["audit"]["fdr"] is None


def test_a_stride_beyond_the_window_is_refused_before_anything_runs(tmp_path) -> None:
    root = image_set_with_model(tmp_path / "data", n=4)
    cfg = audit_config(root, tmp_path / "run", occlusion={"window": [4, 4], "stride": [8, 8]})
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("run", "inspect"):
        _one_line(cli(command, str(path)), command, "occlusion.stride", "stride 8 is larger")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_attribute_refuses_a_blur_sigma_that_is_no_length(sigma) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval()
    with pytest.raises(ValueError, match="blur_sigma must be a finite number of pixels > 0"):
        attribute(model, torch.rand(1, 3, 8, 8), window=[4, 4], baseline="blur", blur_sigma=sigma)


@pytest.mark.parametrize("key", ["dir", "report_dir"])
def test_an_output_folder_inside_a_folder_dataset_is_refused(tmp_path, key) -> None:
    """An image folder lists its files to find classes and images: a run folder (Parquet) or a
    report (PNGs) inside it would be read as data by the next run, resume or inspect."""
    folder = tmp_path / "data" / "val"
    for i, group in enumerate(["cat", "dog"]):
        (folder / group).mkdir(parents=True)
        Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(folder / group / f"img{i}.png")
    cfg = {
        "dataset": {"manifest": str(folder), "image_size": [24, 24]},
        "model": {"torchscript": str(tmp_path / "m.pt")},
        "output": {key: str(Path(folder) / "audit-run")},
    }
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = sorted(p.relative_to(folder) for p in Path(folder).rglob("*"))
    _one_line(cli("run", str(path)), "run", f"output.{key}", "lies inside the dataset")
    # the refused attempt left nothing there: no run folder, no lock
    assert sorted(p.relative_to(folder) for p in Path(folder).rglob("*")) == before
