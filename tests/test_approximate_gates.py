"""Squeeze-excitation in the approximate engine: the gates frozen at the unoccluded image's
values, the error measured against full forward passes; the exact engine still refuses them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import ComputeOptions, attribute
from pipeline.incremental import ApproximateEngine
from pipeline.incremental.approximate import FullPasses
from pipeline.incremental.select import select_engine
from tests.test_incremental import _eval
from tests.test_incremental_refusals import SENet

SIDE = 32


def _efficientnet() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _eval(timm.create_model("efficientnet_b0", pretrained=False, num_classes=3))


NETS = {"se-net": lambda: _eval(SENet()), "timm-efficientnet": _efficientnet}


def _maps(model, x, engine, **opts):
    return attribute(
        model,
        x,
        window=[8, 8],
        stride=[8, 8],
        baseline="zero",
        n_baselines=1,
        target="predicted",
        image_ids=["a", "b"],
        options=ComputeOptions(engine=engine, max_batch=37, **opts),
    )


@pytest.mark.parametrize("name", sorted(NETS))
def test_frozen_gates_error_is_measured_against_full_passes(name):
    model = NETS[name]()
    x = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="squeeze-excitation"):
        select_engine("incremental", model, x.shape[1:], "cpu")
    engine, note = select_engine("approximate", model, x.shape[1:], "cpu", threshold=1.0)
    assert isinstance(engine, ApproximateEngine) and engine.frozen_gates
    assert isinstance(engine.exact, FullPasses) and "gates frozen" in note
    generic = _maps(model, x, "generic")
    # 16 windows, all of them checked: approx_error is each image's largest error
    approx = _maps(model, x, engine, approx_check_windows=16)
    largest = (approx.delta - generic.delta).abs().flatten(1).amax(dim=1)
    assert approx.approx_error is not None
    # the check windows' full passes and the generic kernel's agree to float rounding
    torch.testing.assert_close(approx.approx_error, largest, atol=1e-6, rtol=1e-3)
    assert float(largest.max()) > 0  # a frozen gate is an approximation
