"""Test-suite wide settings: one torch thread in the test process, GPU tests need CUDA."""

from __future__ import annotations

from tests._torchvision_ops import allow_torchvision_without_its_extension

# before anything imports torchvision (timm and transformers do): see tests/_torchvision_ops.py
allow_torchvision_without_its_extension()

import os  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

# The test process shares two cores with Ray workers and Chromium; a second intra-op thread
# mostly spins waiting for a busy core (the many small ops of the incremental engine suffer most).
torch.set_num_threads(1)


# Under pytest-xdist (TEST_WORKERS=2 bash scripts/test.sh: --dist loadgroup) every module is a
# group of its own, so its module fixtures are built once, except these: the modules that share
# the session's quick demo, and those that start multi-node Ray clusters, the fake autoscaler or
# Ray's job server (their heads' dashboards want the same port), which run one after another.
_SHARED_GROUPS = {
    "quick-demo": ("test_compare", "test_demo"),
    "ray-clusters": (
        "test_autoscaling",
        "test_cluster_faults",
        "test_runner_remote",
        "test_runs_in_buckets",
        "test_submit",
    ),
}
_GROUP_OF = {m: g for g, modules in _SHARED_GROUPS.items() for m in modules}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
        item.add_marker(pytest.mark.xdist_group(_GROUP_OF.get(module, module)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# One authentication mode for every Ray the tests start, embedded, head or subprocess. Unset,
# the first embedded ray.init() turns token mode on in this process's environment (and writes
# ~/.ray/auth_token on a fresh machine), while the heads run with it disabled; a process whose
# mode changes under it starts a GCS its own client cannot talk to. Tests of token
# authentication (test_submit.py) give their processes the mode explicitly.
os.environ["RAY_AUTH_MODE"] = "disabled"

# A Ray head's address or a job's runtime env in this process's environment would follow every
# later embedded Ray it starts (their workers inherit it): an in-process run then waits out
# cluster.startup_timeout_s for actors that never come up. Only CLI subprocesses get them.
_HEAD_ONLY = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_AUTH_MODE")
_AT_START = {k: os.environ.get(k) for k in _HEAD_ONLY}


@pytest.fixture(autouse=True)
def _the_head_stays_out_of_this_process():
    yield
    leaked = [k for k in _HEAD_ONLY if os.environ.get(k) != _AT_START[k]]
    assert not leaked, f"this test left {leaked} in the test process's environment"


@pytest.fixture(scope="module")
def local_ray():
    """A fresh embedded 2-CPU Ray in this process for one test module (never one another
    process advertised): in-process runs use it whatever their ``cluster.address``."""
    if ray.is_initialized():  # a Ray left by another module may have other resources
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory):
    """``occlusion-audit demo --quick`` once for the session: its data, planted-shortcut model,
    run ``runs/demo`` and report. Tests read it, or add runs of their own beside it."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("quick-demo")
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out


@pytest.fixture(scope="session")
def shared_ray():
    """A 2-CPU Ray head for the session that CLI runs join (``cluster.address: auto`` and
    ``shared_ray.environ()``) when their test is not about the embedded start: see
    tests/_shared_ray.py."""
    from tests._shared_ray import shared_ray_head

    with shared_ray_head() as head:
        yield head
