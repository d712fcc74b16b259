"""A model the incremental engine refuses gets one line naming the op and its module path, on
real models: a squeeze-excitation net, TorchScript, a timm ViT, ``torch.export`` archives."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pipeline.incremental.engine import auto_engine
from pipeline.incremental.select import select_engine

SIDE = 32


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 convs -> sigmoid gate, as timm and torchvision write it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 2, 1)
        self.fc2 = nn.Conv2d(2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), SqueezeExcite(8)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _reason(model) -> str:
    engine, reason = auto_engine(model, (3, SIDE, SIDE), "cpu")
    assert engine is None
    return reason


def test_squeeze_excitation_names_the_global_pool_and_its_module():
    reason = _reason(SENet().eval())
    assert reason.startswith("incremental engine: cannot follow module AdaptiveAvgPool2d at "), (
        reason
    )
    assert "blocks.2.pool (a global op" in reason and "squeeze-excitation" in reason, reason
    assert "gates function 'mul(<tensor>)' at blocks.2" in reason, reason
    with pytest.raises(ValueError, match=r"'incremental' was asked for.*blocks\.2\.pool"):
        select_engine("incremental", SENet().eval(), (3, SIDE, SIDE), "cpu")


def test_torchscript_says_it_runs_on_the_generic_kernel_and_what_to_load_instead():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    for model in (
        torch.jit.script(net.eval()),
        torch.jit.trace(net.eval(), torch.rand(1, 3, 32, 32)),
    ):
        reason = _reason(model)
        assert "the model is TorchScript" in reason, reason
        assert "runs on the generic kernel" in reason and "model.timm" in reason, reason
        assert "model.weights" in reason, reason


def test_a_timm_vit_names_the_op_not_its_keyword_inputs():
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=SIDE, patch_size=8, depth=1, embed_dim=32, num_heads=2
    ).eval()
    reason = _reason(vit)
    assert "inputs" not in reason, reason  # attn_mask and is_causal keep their defaults
    assert re.search(
        r"cannot follow method '\.flatten\(2\)' at patch_embed: .*patch_embed\.proj", reason
    ), reason


def test_a_trace_failure_names_the_module_and_line():
    class Checks(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] != 3:  # control flow on a traced value
                raise ValueError("3 channels")
            return x

    reason = _reason(nn.Sequential(nn.Conv2d(3, 3, 1), Checks()))
    assert re.search(
        r"cannot trace Checks at 1 \(test_incremental_refusals\.py:\d+: `if x\.shape", reason
    ), reason


class _Rolled(nn.Module):
    """A conv, then a roll of its activation along the width: no local op, and no torch-level
    equivalent the engine follows in a torch.export graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shift = _Roll()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(self.conv(x)).mean(dim=(2, 3))


class _Roll(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=3)


def _archive(tmp_path, model: nn.Module | None = None):
    from pipeline.config import ModelConfig
    from pipeline.models import load_model
    from tests._zoo import export_pt2

    path = export_pt2(tmp_path / "m.pt2", model=model)
    return load_model(ModelConfig(export=str(path)))


def test_a_torch_export_archive_of_a_local_net_runs_incrementally(tmp_path):
    engine, reason = auto_engine(_archive(tmp_path), (3, SIDE, SIDE), "cpu")
    assert engine is not None, reason


def test_a_torch_export_archive_names_the_op_and_module_path_that_stop_it(tmp_path):
    reason = _reason(_archive(tmp_path, _Rolled().eval()))
    assert "cannot follow aten op 'roll.default(" in reason and "at shift:" in reason, reason
    assert "reads the activation of module Conv2d at conv" in reason, reason
    assert "runs on the generic kernel" in reason and "model.factory" in reason, reason
    # ops lowered to torch ones keep the exported model's module paths in refusals too
    reason = _reason(_archive(tmp_path, SENet().eval()))
    assert "cannot follow function 'adaptive_avg_pool2d((1, 1))' at blocks.2.pool" in reason, reason
    assert "squeeze-excitation" in reason, reason


def test_a_hugging_face_vit_names_the_check_where_tracing_stops():
    from tests._zoo import tiny_hf

    reason = _reason(tiny_hf("vit"))
    assert re.search(r"torch\.fx cannot trace \w+ at vit\b.*modeling_vit\.py:\d+: `if ", reason), (
        reason
    )
