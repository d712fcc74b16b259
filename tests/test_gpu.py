"""On a CUDA device: the kernel agrees with the CPU, and half precision stays within tolerance."""

from __future__ import annotations

import pytest
import torch

from pipeline import ComputeOptions, attribute
from pipeline.models.nets import SeedCNN

pytestmark = pytest.mark.gpu


def _setup():
    torch.manual_seed(0)
    model = SeedCNN(num_classes=3, input_dim=64).eval()
    x = torch.rand(4, 3, 64, 64)
    kw = dict(window=[16, 16], stride=[8, 8], n_baselines=3, image_ids=list("abcd"), target=1)
    return model, x, kw


def test_cuda_fp32_matches_cpu():
    model, x, kw = _setup()
    cpu = attribute(model, x, **kw)
    gpu = attribute(model.cuda(), x.cuda(), **kw)
    torch.testing.assert_close(gpu.delta.cpu(), cpu.delta, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_within_stated_tolerance(precision):
    model, x, kw = _setup()
    model, x = model.cuda(), x.cuda()
    ref = attribute(model, x, **kw)
    half = attribute(model, x, options=ComputeOptions(precision=precision), **kw)
    scale = ref.score.abs().max().item()
    # the documented tolerance: about 1e-2 of the score scale
    assert (half.delta - ref.delta).abs().max().item() <= 2e-2 * max(scale, 1.0)
