"""cluster.yaml passes Ray's own cluster-launcher validation, with no cloud access."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

_KEY = re.compile(r"^\s*(?:-\s+)?[\w./-]+\s*:(?:\s|$)")  # a mapping key opens the line
_BLOCK_SCALAR = re.compile(r"[|>][-+]?$")  # a value continued on the next, deeper lines


def uncommented_keys(path: Path) -> list[str]:
    """Lines of a YAML file that hold a key without a ``# comment``, block scalars skipped."""
    missing, block_indent = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue  # inside a | or > scalar: text, not keys
            block_indent = None
        code = line.split(" #", 1)[0].rstrip()
        if _KEY.match(code) and " #" not in line:
            missing.append(f"{path.name}:{number}: {line.strip()}")
        if _BLOCK_SCALAR.search(code):
            block_indent = indent
    return missing


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    config = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults, as `ray up` does
    validate_config(config)  # Ray's JSON schema plus its cross-field checks
    return config


def _workers(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = raw["available_node_types"]
    return {name: t for name, t in types.items() if name != raw["head_node_type"]}


def test_ray_validates_the_prepared_config(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_advertises_no_cpu_so_no_work_lands_there(
    raw: dict[str, Any], prepared: dict[str, Any]
) -> None:
    head = raw["head_node_type"]
    assert raw["available_node_types"][head]["resources"] == {"CPU": 0}
    assert "GPU" not in raw["available_node_types"][head]["resources"]
    assert prepared["available_node_types"][head]["max_workers"] == 0  # never launched as a worker


def test_worker_types_offer_one_and_eight_gpus(raw: dict[str, Any]) -> None:
    workers = _workers(raw)
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]
    for name, t in workers.items():
        assert t["resources"]["CPU"] >= t["resources"]["GPU"], name  # a CPU share per GPU actor
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= raw["max_workers"]


def test_launcher_defaults_do_not_leak_into_the_commands(
    raw: dict[str, Any], prepared: dict[str, Any]
) -> None:
    # Ray's AWS defaults install a nightly Ray wheel in setup_commands: ours must replace them.
    commands = [c for key, value in prepared.items() if key.endswith("_commands") for c in value]
    assert not [c for c in commands if "ray-wheels" in c or "pip install -U" in c]
    assert prepared["docker"]["image"] == raw["docker"]["image"]


def test_every_ray_start_keeps_token_auth_on(raw: dict[str, Any]) -> None:
    starts = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in raw[key]
        if "ray start" in c
    ]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "disabled" not in CLUSTER_YAML.read_text()
    assert "~/.ray" in raw["file_mounts"].values()  # the token reaches every node


def test_every_key_is_commented() -> None:
    assert uncommented_keys(CLUSTER_YAML) == []
