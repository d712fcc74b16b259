"""The Kubernetes manifests in jobs/ run our CLI on a valid job config, on cluster.yaml's nodes."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml
from ray.runtime_env import RuntimeEnv

from pipeline.cluster.cli import add_submit_parser
from pipeline.cluster.submit import SCHEDULE_TIME_ENV, UPLOAD_EXCLUDES
from pipeline.config import Device, load_config
from pipeline.run.offer import ClusterOffer, actor_threads, node_types_from_file
from pipeline.run.pool import UNKNOWN_CAPACITY_ACTORS, plan_pool
from tests.test_cluster import CLUSTER_YAML, uncommented_keys

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
APP_DIR = "/home/ray/occlusion-audit"  # where jobs/Dockerfile puts the project in the image
DAY = "2025-03-01"  # stands in for $(date -u +%F), which a shell expands at submission

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("dow", 0, 7))
_CRON_ITEM = re.compile(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?")


def check_cron(expr: str) -> None:
    """Raise ValueError unless ``expr`` is a strict 5-field numeric cron expression."""
    fields = expr.split(" ")
    if len(fields) != 5:
        raise ValueError(f"{expr!r}: want 5 space-separated fields, got {len(fields)}")
    for text, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            match = _CRON_ITEM.fullmatch(item)
            if match is None:
                raise ValueError(f"{expr!r}: {name} item {item!r} is not *, N, N-M or .../S")
            span, step = match.groups()
            bounds = [low, high] if span == "*" else [int(v) for v in span.split("-")]
            if not low <= bounds[0] <= bounds[-1] <= high:
                raise ValueError(f"{expr!r}: {name} {span!r} is outside {low}-{high} or reversed")
            if step is not None and int(step) < 1:
                raise ValueError(f"{expr!r}: {name} step must be >= 1")


def _load(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((JOBS / name).read_text()))


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    (doc,) = _load("rayjob.yaml")
    return doc


@pytest.fixture(scope="module")
def raycronjob() -> dict[str, Any]:
    (doc,) = _load("raycronjob.yaml")
    return doc


@pytest.fixture(scope="module")
def fallback() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in _load("cronjob.yaml")}


def _run_argv(entrypoint: str) -> list[str]:
    return shlex.split(entrypoint.replace("$(date -u +%F)", DAY))


def _overrides(argv: list[str]) -> list[str]:
    return [b for a, b in itertools.pairwise(argv) if a == "--set"]


def _submitter(fallback: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod = fallback["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def _submit_args(container: dict[str, Any]) -> argparse.Namespace:
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    argv = _run_argv(script)
    assert argv[:3] == ["exec", "occlusion-audit", "submit"]
    parser = argparse.ArgumentParser(prog="occlusion-audit")
    add_submit_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv[2:])  # the real submit parser accepts every flag


def test_rayjob_entrypoint_is_our_cli_on_a_config_in_jobs(rayjob: dict[str, Any]) -> None:
    argv = _run_argv(rayjob["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipeline", "run"]  # pipeline/__main__.py -> cli.main
    assert argv[4].startswith(f"{APP_DIR}/jobs/")
    assert (ROOT / argv[4].removeprefix(f"{APP_DIR}/")).is_file()
    assert set(argv[5::2]) == {"--set"}
    dockerfile = (JOBS / "Dockerfile").read_text()
    assert f"WORKDIR {APP_DIR}" in dockerfile and "COPY --chown=ray:users jobs ./jobs" in dockerfile


def test_the_entrypoint_command_line_is_accepted_by_the_cli() -> None:
    assert find_spec("pipeline.__main__") is not None
    argv = [sys.executable, "-m", "pipeline", "run", "--help"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--set" in out.stdout


def test_job_config_and_overrides_pass_load_config(rayjob: dict[str, Any]) -> None:
    if find_spec("pipeline.config.load") is None:
        pytest.skip("pipeline.config.load (load_config) is not in this tree yet")
    from pipeline.config.load import load_config

    argv = _run_argv(rayjob["spec"]["entrypoint"])
    config = ROOT / argv[4].removeprefix(f"{APP_DIR}/")
    raw = yaml.safe_load(config.read_text())
    cfg = load_config(config, overrides=_overrides(argv))
    assert cfg.cluster.address == "auto"  # the job's own cluster, not an embedded one
    assert cfg.output.dir == f"{raw['output']['dir']}/{DAY}"  # a folder per day under the config's
    assert cfg.output.report_dir == f"{raw['output']['report_dir']}/{DAY}"


def test_raycronjob_schedules_exactly_the_rayjob(
    rayjob: dict[str, Any], raycronjob: dict[str, Any]
) -> None:
    assert (raycronjob["apiVersion"], raycronjob["kind"]) == ("ray.io/v1", "RayCronJob")
    assert raycronjob["spec"]["jobTemplate"] == rayjob["spec"]
    assert raycronjob["spec"]["suspend"] is False
    check_cron(raycronjob["spec"]["schedule"])
    assert "RayCronJob=true" in (JOBS / "raycronjob.yaml").read_text()  # the alpha gate is named


def test_fallback_cronjob_submits_the_same_config_and_waits(
    rayjob: dict[str, Any], raycronjob: dict[str, Any], fallback: dict[str, dict[str, Any]]
) -> None:
    cron = fallback["CronJob"]
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert cron["spec"]["schedule"] == raycronjob["spec"]["schedule"]
    check_cron(cron["spec"]["schedule"])
    container = _submitter(fallback)
    args = _submit_args(container)
    run_argv = _run_argv(rayjob["spec"]["entrypoint"])
    assert container["workingDir"] == APP_DIR
    assert f"{APP_DIR}/{args.config}" == run_argv[4]
    assert args.set == _overrides(run_argv)
    assert args.wait
    assert (ROOT / args.runtime_env).is_file()
    head_svc = f"http://{fallback['RayCluster']['metadata']['name']}-head-svc:8265"
    assert args.address == head_svc


def test_fallback_pod_passes_the_scheduled_time_and_the_token(
    rayjob: dict[str, Any], fallback: dict[str, dict[str, Any]]
) -> None:
    env = {e["name"]: e for e in _submitter(fallback)["env"]}
    label = "metadata.labels['batch.kubernetes.io/job-name']"
    assert env[SCHEDULE_TIME_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == label
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {
        "name": rayjob["spec"]["rayClusterSpec"]["authOptions"]["secretName"],
        "key": "auth_token",
    }


def _ray_clusters(
    rayjob: dict[str, Any], raycronjob: dict[str, Any], fallback: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    return {
        "rayjob": rayjob["spec"]["rayClusterSpec"],
        "raycronjob": raycronjob["spec"]["jobTemplate"]["rayClusterSpec"],
        "cronjob": fallback["RayCluster"]["spec"],
    }


def test_ray_clusters_match_cluster_yaml_node_types(
    cluster: dict[str, Any], rayjob: dict[str, Any], raycronjob: dict[str, Any], fallback: Any
) -> None:
    image = cluster["docker"]["image"]
    types = cluster["available_node_types"]
    head_type = types[cluster["head_node_type"]]
    for where, spec in _ray_clusters(rayjob, raycronjob, fallback).items():
        assert spec["rayVersion"] == ray.__version__, where
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == str(head_type["resources"]["CPU"]), where
        head_pod = head["template"]["spec"]
        assert head_pod["containers"][0]["image"] == image, where
        assert (
            head_pod["nodeSelector"]["node.kubernetes.io/instance-type"]
            == (head_type["node_config"]["InstanceType"])
        )
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == set(types) - {cluster["head_node_type"]}, where
        for name, group in groups.items():
            node, pod = types[name], group["template"]["spec"]
            (container,) = pod["containers"]
            limits = container["resources"]["limits"]
            assert container["image"] == image, (where, name)
            assert limits["nvidia.com/gpu"] == node["resources"]["GPU"], (where, name)
            assert 0 < int(limits["cpu"]) <= node["resources"]["CPU"], (where, name)
            assert container["resources"]["requests"] == limits, (where, name)
            assert (group["minReplicas"], group["maxReplicas"]) == (
                node["min_workers"],
                node["max_workers"],
            ), (where, name)
            selector = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
            assert selector == node["node_config"]["InstanceType"], (where, name)
    assert _submitter(fallback)["image"] == image


def test_image_pins_this_package_ray_and_torch(cluster: dict[str, Any]) -> None:
    tag = cluster["docker"]["image"].rsplit(":", 1)[1]
    assert tag.startswith(f"{version('occlusion-audit')}-ray{ray.__version__}-")
    dockerfile = (JOBS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert f'"torch=={torch.__version__.split("+")[0]}"' in dockerfile


def test_token_auth_is_on_everywhere(
    rayjob: dict[str, Any], raycronjob: dict[str, Any], fallback: Any
) -> None:
    clusters = _ray_clusters(rayjob, raycronjob, fallback)
    assert clusters["rayjob"]["authOptions"]["mode"] == "token"
    assert clusters["raycronjob"]["authOptions"]["mode"] == "token"
    manual = clusters["cronjob"]  # no authOptions before KubeRay 1.5.1: env on every container
    pods = [manual["headGroupSpec"]] + manual["workerGroupSpecs"]
    envs = [pod["template"]["spec"]["containers"][0]["env"] for pod in pods]
    envs.append(manual["autoscalerOptions"]["env"])
    for env in envs:
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
        assert "RAY_AUTH_TOKEN" in {e["name"] for e in env}
    for path in JOBS.glob("*.yaml"):
        assert "RAY_AUTH_MODE=disabled" not in path.read_text(), path.name
        assert "value: disabled" not in path.read_text(), path.name


def test_runtime_env_is_valid_and_embedded_in_the_rayjob(rayjob: dict[str, Any]) -> None:
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of field types
    assert set(env["excludes"]) <= set(UPLOAD_EXCLUDES)
    embedded = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert embedded == {"env_vars": env["env_vars"]}  # the image holds code and config


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_is_commented(path: Path) -> None:
    assert uncommented_keys(path) == []


@pytest.mark.parametrize("expr", ["0 2 * * *", "*/15 0-6 1,15 * 1-5", "59 23 31 12 7"])
def test_cron_checker_accepts(expr: str) -> None:
    check_cron(expr)


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("0 2 * *", "want 5 space-separated fields, got 4"),
        ("0 2 * * * *", "want 5 space-separated fields, got 6"),
        ("60 2 * * *", "minute '60' is outside 0-59"),
        ("0 24 * * *", "hour '24' is outside 0-23"),
        ("0 2 0 * *", "day '0' is outside 1-31"),
        ("@daily", "want 5 space-separated fields, got 1"),
        ("0 2 * * MON", "dow item 'MON' is not"),
        ("5-1 * * * *", "minute '5-1' is outside 0-59 or reversed"),
        ("*/0 * * * *", "minute step must be >= 1"),
        ("0  2 * * *", "want 5 space-separated fields, got 6"),
    ],
)
def test_cron_checker_rejects(expr: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_cron(expr)


DEPLOYMENTS = [CLUSTER_YAML, JOBS / "rayjob.yaml", JOBS / "raycronjob.yaml", JOBS / "cronjob.yaml"]


@pytest.mark.parametrize("device", ["cuda", "auto"])
@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda p: p.name)
def test_the_nightly_pool_on_a_cold_deployment_asks_for_every_gpu(
    deployment: Path, device: str
) -> None:
    """Only the CPU-less head is up; the node types are those the deployment's autoscaler
    reads. The nightly config's pool asks for one GPU actor per GPU the types can start."""
    cfg = load_config(JOBS / "nightly-audit.yaml", [f"cluster.device={device}"])
    cold = ClusterOffer(({"CPU": 0.0},), node_types_from_file(str(deployment)), deployment.name)
    plan = plan_pool(cfg.cluster, 10_000, cold)
    assert (plan.device, plan.num_gpus, plan.actors) == ("cuda", 1.0, 8 * 1 + 2 * 8), plan
    # each GPU actor asks for one CPU (both node types have at least 7 per GPU); its threads
    # are its node's CPUs per GPU, decided where it lands
    assert plan.num_cpus == 1.0 and plan.threads is None
    assert actor_threads(plan.num_gpus, plan.num_cpus, {"CPU": 7.0, "GPU": 1.0}) == 7
    if device == "auto":
        assert plan.why.startswith("the autoscaler can start GPU nodes: worker-gpu1 (up to 8")


def test_the_nightly_config_asks_for_gpus_where_ray_hides_the_node_types() -> None:
    """KubeRay's autoscaler on Ray 2.60 does not report its worker groups: ``auto`` cannot
    see that GPUs can come, which is why the nightly config says ``cuda``."""
    cfg = load_config(JOBS / "nightly-audit.yaml")
    hidden = ClusterOffer(({"CPU": 0.0},), None, "an autoscaler runs, but Ray does not say")
    plan = plan_pool(cfg.cluster, 10_000, hidden)
    assert (plan.device, plan.num_gpus, plan.actors) == ("cuda", 1.0, UNKNOWN_CAPACITY_ACTORS)
    auto = plan_pool(replace(cfg.cluster, device=Device.AUTO), 10_000, hidden)
    assert auto.device == "cpu" and "set cluster.device: cuda" in auto.why
