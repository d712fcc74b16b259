"""``torch.export`` archives of convolutional nets get the incremental engine, and their maps equal
the generic kernel's: each net is exported with a dynamic batch, saved, and loaded as a user's
``model.export`` is (:func:`pipeline.models.load_model`), as exported (aten ``conv2d``,
``batch_norm``, in-place activations) and after the core aten decompositions (``convolution``,
``_native_batch_norm_legit_no_training``, ``max_pool2d_with_indices``, ``addmm``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig, NormalizeConfig
from pipeline.incremental.engine import IncrementalEngine
from pipeline.incremental.explain import module_path
from pipeline.incremental.select import select_engine
from pipeline.models import SeedCNN, load_model
from tests.test_incremental import _eval, _maps
from tests.test_incremental_families import SETTINGS

SIDE = 32


def _resnet() -> nn.Module:
    """torchvision's ResNet: BN, max pool, residual adds (``add_``), GAP + Linear."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return _eval(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3))


def _mobilenet() -> nn.Module:
    """torchvision's MobileNetV2: depthwise convs, ReLU6 (``hardtanh_``), inverted residuals,
    dropout before the Linear."""
    from torchvision.models import MobileNetV2

    torch.manual_seed(0)
    return _eval(MobileNetV2(num_classes=3, width_mult=0.25))


def _convnext() -> nn.Module:
    """torchvision's ConvNeXt: permutes, LayerNorm and Linear over the channels, GELU, layer
    scale."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    blocks = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return _eval(ConvNeXt(blocks, layer_scale=1.0, num_classes=3))


def _seed_cnn() -> nn.Module:
    """Max pools, then flatten into an MLP: a flatten + Linear head."""
    torch.manual_seed(0)
    return _eval(SeedCNN(num_classes=3, input_dim=SIDE))


# name -> (net, decompose to core aten before saving)
ARCHIVES = {
    "torchvision-resnet": (_resnet, False),
    "torchvision-resnet-core-aten": (_resnet, True),
    "torchvision-mobilenetv2": (_mobilenet, False),
    "torchvision-convnext": (_convnext, False),
    "seedcnn-core-aten": (_seed_cnn, True),
}


def export(model: nn.Module, path: Path, decompose: bool = False) -> Path:
    """``model`` saved as a ``torch.export`` archive with a dynamic batch dimension."""
    x = torch.rand(2, 3, SIDE, SIDE)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program.run_decompositions() if decompose else program, path)
    return path


def _check_maps(model: nn.Module) -> None:
    x = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    engine, note = select_engine("auto", model, x.shape[1:], "cpu")
    assert isinstance(engine, IncrementalEngine), note
    for window, stride, baseline, k in SETTINGS:
        ref = _maps(model, x, None, window, stride, baseline, k)
        inc = _maps(model, x, engine, window, stride, baseline, k)
        scale = float(ref.delta.abs().max())
        assert scale > 1e-3  # the maps are not trivially zero
        tol = 1e-4 * max(1.0, scale)
        torch.testing.assert_close(inc.delta, ref.delta, atol=tol, rtol=1e-4)
        torch.testing.assert_close(inc.delta_std, ref.delta_std, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_maps_equal_the_generic_kernel(name, tmp_path):
    build, decompose = ARCHIVES[name]
    path = export(build(), tmp_path / "m.pt2", decompose)
    _check_maps(load_model(ModelConfig(export=str(path))))


def test_a_normalized_archive_runs_incrementally(tmp_path):
    path = export(_resnet(), tmp_path / "m.pt2")
    norm = NormalizeConfig(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    _check_maps(load_model(ModelConfig(export=str(path)), normalize=norm))


def test_lowered_modules_share_the_archives_weights(tmp_path):
    model = load_model(ModelConfig(export=str(export(_resnet(), tmp_path / "m.pt2"))))
    engine, _ = select_engine("auto", model, (3, SIDE, SIDE), "cpu")
    assert isinstance(engine, IncrementalEngine)
    convs = [m for m in engine.traced.modules.values() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12  # every conv of the ResNet became a module
    weights = {p.data_ptr() for p in model.parameters()}
    assert all(c.weight.data_ptr() in weights for c in convs)
    # module paths are the exported model's, where refusals name them
    paths = {module_path(st.node) for st in engine.traced.steps[1:]}
    assert {"conv1", "layer1.0.bn2", "layer4.0.downsample.0"} <= paths, paths
