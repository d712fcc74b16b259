"""The pre-run check calls the model as the workers will: archives exported for one image or
another size, outputs without a score tensor and out-of-range targets are one line each, with
the fix, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import load_config
from pipeline.run.preflight import ModelCheckError, check_model
from tests._zoo import SIDE, export_onnx, export_pt2, gap_net, hf_folder


def _cfg(model: dict, **sections: dict):
    raw = {
        "dataset": {"manifest": "m.parquet", "image_size": [SIDE, SIDE]},
        "model": model,
        "cluster": {"device": "cpu"},
        **sections,
    }
    return load_config(raw)


def _refusal(model: dict, **sections: dict) -> str:
    with pytest.raises(ModelCheckError) as info:
        check_model(_cfg(model, **sections))
    message = str(info.value)
    assert "\n" not in message
    return message


class Boxes(nn.Module):
    """Returns ``(N, 2, 3)``: a detector-like output that is no score vector."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, None, :].expand(-1, 2, -1)


class OnlyFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"features": None}


def test_an_archive_for_one_image_names_the_dynamic_batch_fix(tmp_path):
    message = _refusal({"export": str(export_pt2(tmp_path / "b1.pt2", dynamic=False, batch=1))})
    assert "fixed batch of 1 image(s)" in message and "batches of 2 to 32" in message
    assert "torch.export.export(model, args, dynamic_shapes=" in message
    onnx = export_onnx(tmp_path / "b1.onnx", dynamic=False)
    message = _refusal({"onnx": str(onnx)})
    assert "model.onnx b1.onnx was exported for a fixed batch of 1" in message
    assert "dynamic_axes={'x': {0: 'batch'}}" in message


def test_an_archive_for_another_size_names_it(tmp_path):
    pt2 = export_pt2(tmp_path / "s16.pt2", side=16)
    message = _refusal({"export": str(pt2)})
    assert "exported for 3x16x16 images, the images are 3x32x32" in message
    assert "set dataset.image_size: [16, 16]" in message


def test_a_bounded_batch_names_max_batch(tmp_path):
    net, x = gap_net(), torch.rand(2, 3, SIDE, SIDE)
    shapes = ({0: torch.export.Dim("batch", max=8)},)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=shapes), tmp_path / "b8.pt2")
    message = _refusal({"export": str(tmp_path / "b8.pt2")})
    assert "at most 8, the workers pass up to 32: set occlusion.max_batch: 8" in message
    ok = _cfg({"export": str(tmp_path / "b8.pt2")}, occlusion={"max_batch": 8})
    assert check_model(ok)[0] == str(tmp_path / "b8.pt2")


def test_a_dynamic_archive_passes_and_is_hashed(tmp_path):
    path, sha = check_model(_cfg({"export": str(export_pt2(tmp_path / "ok.pt2"))}))
    assert path == str(tmp_path / "ok.pt2") and len(sha or "") == 64


def test_hugging_face_outputs_pass_and_a_wrong_output_key_is_named(tmp_path):
    folder = str(hf_folder("vit", tmp_path / "vit"))
    path, sha = check_model(_cfg({"transformers": folder}))  # ModelOutput: logits
    assert path == folder and sha
    message = _refusal({"transformers": folder, "output": "probs"})
    assert message.startswith(f"model transformers:{folder} failed on 2 images of 3x32x32")
    assert "model.output 'probs'" in message and "keys ['logits']" in message
    message = _refusal({"transformers": folder, "target": 7})
    assert "target index out of range [0, 3)" in message


def test_outputs_that_hold_no_scores_are_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    message = _refusal({"factory": "test_model_check:Boxes"})
    assert "shape (2, 2, 3)" in message and "expected (B,) scores or (B, O)" in message
    message = _refusal({"factory": "test_model_check:OnlyFeatures"})
    assert "a dict with keys ['features'] without a tensor" in message
    assert "set model.output" in message
    gap = {"factory": "pipeline.models:SeedCNNWithGAP", "kwargs": {"num_classes": 3}}
    message = _refusal({**gap, "task": "regression"})
    assert "a regression model with 3 outputs needs an explicit target" in message
    assert check_model(_cfg({**gap, "task": "regression", "target": 2})) == (None, None)
