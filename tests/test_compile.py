"""``occlusion.compile``: full forward passes through ``torch.compile``, on the real inductor.

Compiled passes give the eager maps; a worker compiles while it starts, so its first shard finds
the code compiled; a machine that cannot compile (no C++ compiler) stops the worker, and the run,
with one line naming the setting.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from pipeline import ComputeOptions, attribute, load_config, read_maps, run_audit
from pipeline.config import OcclusionConfig
from pipeline.kernel.compiled import CompileError
from pipeline.models import SeedCNN, SeedCNNWithGAP
from pipeline.run.settings import worker_compute
from tests._dataset import audit_config, image_set_with_model
from tests._shared_ray import job_env_vars

KEYS = {"window": [8, 8], "stride": [4, 4], "n_baselines": 2, "seed": 3}


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return int(counters["stats"]["unique_graphs"])


def _images(n: int, size: int = 24) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(1))


def test_compiled_passes_give_the_eager_maps():
    torch.manual_seed(0)
    model = SeedCNNWithGAP(num_classes=2).eval()
    x, ids = _images(3), ["a", "b", "c"]
    eager = attribute(model, x, image_ids=ids, options=ComputeOptions(engine="generic"), **KEYS)
    before = _graphs()
    fast = attribute(
        model, x, image_ids=ids, options=ComputeOptions(engine="generic", compile=True), **KEYS
    )
    assert _graphs() > before  # the passes really went through dynamo and inductor
    torch.testing.assert_close(fast.delta, eager.delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.score, eager.score, rtol=0, atol=1e-5)
    assert torch.equal(fast.target, eager.target)


def test_compile_is_a_boolean():
    with pytest.raises(ValueError, match="compile must be True or False"):
        ComputeOptions(compile="no")  # a truthy string must not switch compiling on


def test_a_worker_compiles_before_its_first_shard():
    torch.manual_seed(0)
    model = SeedCNN(num_classes=1, input_dim=24).eval()
    # the default batches of CPU full passes: unoccluded ones of 16, occluded ones of 32
    occ = OcclusionConfig(window=(8, 8), stride=(4, 4), engine="generic", compile=True)
    before = _graphs()
    wc = worker_compute(occ, model, (3, 24, 24), torch.device("cpu"))
    assert wc.options.compile and wc.engine_name == "generic" and wc.options.max_batch == 32
    assert _graphs() > before
    # the first shard's passes (5 images: plain ones padded to 16 rows, occluded ones of 32)
    # compile nothing
    compiled_at_start = _graphs()
    res = attribute(
        model, _images(5), image_ids=list("vwxyz"), options=wc.options, task="regression", **KEYS
    )
    assert _graphs() == compiled_at_start
    assert bool(res.finite.all())


def test_a_machine_that_cannot_compile_is_named(monkeypatch, tmp_path):
    import torch._inductor.config as inductor

    # a C++ compiler that does not exist, no cached kernels to fall back on, compiled in-process
    broken = {
        "cpp.cxx": (None, str(tmp_path / "no-such-g++")),
        "fx_graph_cache": False,
        "compile_threads": 1,
    }
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.Hardswish(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(5, 2),
    ).eval()  # fmt: skip
    occ = OcclusionConfig(window=(8, 8), engine="generic", compile=True, max_batch=4)
    refused = r"occlusion\.compile: torch\.compile could not"
    try:
        with inductor.patch(broken), pytest.raises(CompileError, match=refused) as e:
            worker_compute(occ, model, (3, 16, 16), torch.device("cpu"))
        # the reason is the compiler torch could not find, not dynamo's wrapper line
        assert "no-such-g++" in str(e.value) and "InvalidCxxCompiler" in str(e.value)
    finally:
        torch._dynamo.reset()
    # the settings are torch's again: the next compile works
    assert inductor.cpp.cxx[1] != broken["cpp.cxx"][1] and inductor.compile_threads >= 1


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=8)


def _cfg(image_set, out, compile_: bool) -> dict:
    occlusion = {"engine": "generic", "compile": compile_, "max_batch": 16}
    return audit_config(image_set, out, occlusion=occlusion, cluster={"shard_size": 4})


@pytest.mark.slow
def test_a_compiled_run_stores_the_eager_maps(local_ray, image_set, tmp_path):
    for name, flag in (("eager", False), ("compiled", True)):
        res = run_audit(load_config(_cfg(image_set, tmp_path / name, flag)), progress=False)
        assert (res.exit_code, res.ok) == (0, 8)
    eager = read_maps(tmp_path / "eager").sort_values("image_id")
    fast = read_maps(tmp_path / "compiled").sort_values("image_id")
    assert list(fast["image_id"]) == list(eager["image_id"])
    np.testing.assert_allclose(
        np.stack(fast["delta"].to_list()), np.stack(eager["delta"].to_list()), rtol=0, atol=1e-5
    )
    # the setting is part of the run's identity: a resume must use it too
    record = yaml.safe_load((tmp_path / "compiled" / "run.json").read_text())
    assert record["identity"]["occlusion"]["compile"] is True


@pytest.mark.slow
def test_a_run_on_a_machine_without_a_compiler_stops_with_one_line(shared_ray, image_set, tmp_path):
    raw = _cfg(image_set, tmp_path / "run", True)
    raw["cluster"]["address"] = "auto"  # the session's Ray head; the workers get the job's env
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    tools = {
        "CXX": str(tmp_path / "no-such-g++"),  # inductor's C++ compiler, read at import
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled to reuse
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    env = shared_ray.environ(**tools, **job_env_vars(*tools, environ=tools))
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(cfg), "--no-report", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode != 0
    lines = [s for s in out.stderr.splitlines() if s.startswith("occlusion-audit run: error:")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "the workers could not start" in lines[0] and "occlusion.compile" in lines[0]
    assert "no-such-g++" in lines[0]
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "run" / "maps").glob("*.parquet"))
