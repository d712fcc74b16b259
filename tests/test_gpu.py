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


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_incremental_engine_on_cuda_agrees_with_full_passes(precision):
    from pipeline.incremental import auto_engine

    model, x, kw = _setup()
    model, x = model.cuda(), x.cuda()
    engine, why = auto_engine(model, x.shape[1:], "cuda")
    assert engine is not None, why
    full = attribute(model, x, options=ComputeOptions(engine="generic", precision=precision), **kw)
    inc = attribute(model, x, options=ComputeOptions(engine=engine, precision=precision), **kw)
    scale = max(full.score.abs().max().item(), 1.0)
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert (inc.delta - full.delta).abs().max().item() <= tol * scale


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_passes_on_cuda_give_the_eager_maps(precision):
    """occlusion.compile on CUDA (inductor with Triton), compiled as a worker does at start-up."""
    from pipeline.config import OcclusionConfig
    from pipeline.run.settings import worker_compute

    model, x, kw = _setup()
    model, x = model.cuda(), x.cuda()
    occ = OcclusionConfig(window=(16, 16), engine="generic", compile=True, precision=precision)
    wc = worker_compute(occ, model, (3, 64, 64), torch.device("cuda"))
    assert wc.options.compile
    eager = attribute(model, x, options=ComputeOptions(engine="generic", precision=precision), **kw)
    fast = attribute(model, x, options=wc.options, **kw)
    tol = (1e-4 if precision == "fp32" else 2e-2) * max(eager.score.abs().max().item(), 1.0)
    assert (fast.delta - eager.delta).abs().max().item() <= tol


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_approximate_engine_on_cuda_reports_the_error_the_exact_engine_shows(precision):
    """On CUDA, as on the CPU: tau=1 is the exact engine, and the measured error is the gap to
    the exact engine at the check windows (K=1, so the gap of the map itself)."""
    from pipeline.kernel.occlusion import check_windows

    model, x, kw = _setup()
    model, x = model.cuda(), x.cuda()
    kw = {**kw, "n_baselines": 1, "baseline": "blur"}

    def run(engine: str, tau: float = 1.0):
        opts = ComputeOptions(
            engine=engine, precision=precision, approx_threshold=tau, approx_check_windows=4
        )
        return attribute(model, x, options=opts, **kw)

    exact, one, approx = run("incremental"), run("approximate", 1.0), run("approximate", 0.5)
    tol = (1e-4 if precision == "fp32" else 2e-2) * max(exact.score.abs().max().item(), 1.0)
    assert (one.delta - exact.delta).abs().max().item() <= tol
    wins = check_windows(exact.grid.n_windows, 4, kw["image_ids"], 0).to(x.device)  # (N, 4)
    diff = (approx.delta - exact.delta).flatten(2).abs()  # (N, T, P)
    at_checks = diff.gather(2, wins[:, None, :].expand(-1, diff.shape[1], -1))
    expected = at_checks.flatten(1).amax(dim=1)  # (N,)
    assert approx.approx_error is not None
    assert (approx.approx_error.float() - expected.float()).abs().max().item() <= tol


def test_a_run_on_gpu_actors_with_half_a_gpu_each(tmp_path):
    import json

    import numpy as np
    import ray

    from pipeline import load_config, read_maps, run_audit
    from tests._dataset import audit_config, image_set_with_model

    root = image_set_with_model(tmp_path / "data", n=12)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
    try:
        cluster = {"gpus_per_actor": 0.5, "shard_size": 3, "actors": "auto"}
        gpu = run_audit(load_config(audit_config(root, tmp_path / "gpu", cluster=cluster)),
                        progress=False)  # fmt: skip
        assert gpu.exit_code == 0
    finally:
        ray.shutdown()
    facts = json.loads((tmp_path / "gpu" / "run.json").read_text())
    assert facts["pool"]["actors"] == 2 and facts["pool"]["num_gpus"] == 0.5
    assert {a["device"] for a in facts["actors"]} == {"cuda"}
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, configure_logging=False)
    try:
        cpu = run_audit(load_config(audit_config(root, tmp_path / "cpu")), progress=False)
        assert cpu.exit_code == 0
    finally:
        ray.shutdown()
    a = read_maps(tmp_path / "gpu").sort_values("image_id")
    b = read_maps(tmp_path / "cpu").sort_values("image_id")
    np.testing.assert_allclose(np.stack(a["delta"]), np.stack(b["delta"]), atol=1e-4, rtol=1e-4)
