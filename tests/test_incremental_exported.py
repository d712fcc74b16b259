"""``torch.export`` archives of convolutional nets get the incremental engine, and their maps equal
the generic kernel's: each net is exported with a dynamic batch, saved, and loaded as a user's
``model.export`` is (:func:`pipeline.models.load_model`), as exported (aten ``conv2d``,
``batch_norm``, in-place activations) and after the core aten decompositions (``convolution``,
``_native_batch_norm_legit_no_training``, ``max_pool2d_with_indices``, ``addmm``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig, NormalizeConfig
from pipeline.incremental.engine import IncrementalEngine
from pipeline.incremental.explain import module_path
from pipeline.incremental.select import select_engine
from pipeline.models import SeedCNN, load_model
from tests._zoo import SIDE, export_pt2
from tests.test_incremental import _eval
from tests.test_incremental_families import assert_maps_equal_the_generic_kernels


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


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_maps_equal_the_generic_kernel(name, tmp_path):
    build, decompose = ARCHIVES[name]
    path = export_pt2(tmp_path / "m.pt2", side=SIDE, model=build(), decompose=decompose)
    assert_maps_equal_the_generic_kernels(load_model(ModelConfig(export=str(path))), SIDE)


def test_a_normalized_archive_runs_incrementally(tmp_path):
    path = export_pt2(tmp_path / "m.pt2", side=SIDE, model=_resnet())
    norm = NormalizeConfig(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    assert_maps_equal_the_generic_kernels(
        load_model(ModelConfig(export=str(path)), normalize=norm), SIDE
    )


def test_lowered_modules_share_the_archives_weights(tmp_path):
    model = load_model(ModelConfig(export=str(export_pt2(tmp_path / "m.pt2", model=_resnet()))))
    engine, _ = select_engine("auto", model, (3, SIDE, SIDE), "cpu")
    assert isinstance(engine, IncrementalEngine)
    convs = [m for m in engine.traced.modules.values() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12  # every conv of the ResNet became a module
    weights = {p.data_ptr() for p in model.parameters()}
    assert all(c.weight.data_ptr() in weights for c in convs)
    # module paths are the exported model's, where refusals name them
    paths = {module_path(st.node) for st in engine.traced.steps[1:]}
    assert {"conv1", "layer1.0.bn2", "layer4.0.downsample.0"} <= paths, paths
