"""The batch audit on a real local Ray: exactly once, same answer as the kernel, faults, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import attribute, load_config, read_maps, run_audit
from pipeline.audit.aggregate import aggregate
from pipeline.config import ModelConfig
from pipeline.data.images import load_image
from pipeline.kernel.options import ComputeOptions
from pipeline.models import load_model
from pipeline.run.folder import RunLock, RunLockedError
from pipeline.run.preflight import RunFolderError
from pipeline.run.settings import worker_compute
from tests._dataset import audit_config, image_set_with_model, save_gap_model
from tests._faults import cli, run_cli


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=20)


def _cfg(root: Path, out: Path, **sections):
    return load_config(audit_config(root, out, **sections))


def _by_id(run_dir: Path):
    return read_maps(run_dir).set_index("image_id").sort_index()


def test_every_image_exactly_once_and_equal_to_the_kernel(local_ray, image_set, tmp_path):
    res = run_audit(_cfg(image_set, tmp_path / "run"), progress=False)
    assert (res.images, res.ok, res.errors, res.exit_code) == (20, 20, 0, 0)
    maps = read_maps(tmp_path / "run")
    assert sorted(maps["image_id"]) == [f"img{i:03d}" for i in range(20)]
    assert len(list((tmp_path / "run" / "maps").glob("part-*.parquet"))) == 3  # ceil(20 / 7)

    # the same answer two ways: the kernel called directly on the same decoded images
    ids = list(maps["image_id"])
    images = torch.stack(
        [load_image(f"images/{i}.png", str(image_set), (24, 24), image_id=i)[0] for i in ids]
    )
    model = load_model(
        ModelConfig(
            factory="pipeline.models:SeedCNNWithGAP",
            kwargs={"num_classes": 2},
            weights=str(image_set / "model.pt"),
        )
    )
    kw = dict(window=[8, 8], stride=[4, 4], n_baselines=2, image_ids=ids)
    # with the worker's own settings (the same code path builds them), the maps are identical
    occ = load_config(json.loads((tmp_path / "run" / "run.json").read_text())["config"]).occlusion
    wc = worker_compute(occ, model, (3, 24, 24), torch.device("cpu"))
    assert wc.engine_name == "incremental"  # the workers choose the same way
    stored = np.stack(maps["delta"].to_list())
    direct = attribute(model, images, options=wc.options, **kw)
    np.testing.assert_array_equal(stored, direct.delta[:, 0].flatten(1).numpy())
    generic_opts = ComputeOptions(engine="generic", max_batch=64)
    generic = attribute(model, images, options=generic_opts, **kw)  # full passes agree too
    np.testing.assert_allclose(stored, generic.delta[:, 0].flatten(1).numpy(), atol=1e-5, rtol=0)
    assert maps["grid_h"].unique().tolist() == [5] and maps["status"].eq("ok").all()
    assert np.isfinite(maps["fg_bg_ratio"]).all()

    facts = json.loads((tmp_path / "run" / "run.json").read_text())
    assert facts["counts"] == {"images": 20, "ok": 20, "error": 0}
    assert len(facts["model_hash"]) == 64 and facts["versions"]["torch"]
    assert facts["config"]["occlusion"]["window"] == [8, 8]
    assert facts["engine"]["path"] == "incremental"
    for actor in facts["actors"]:  # CPU workers keep freed activation buffers for reuse
        assert actor["heap_tuned"] is True and actor["max_batch"] == 64, actor


def test_group_by_the_manifest_label_groups_by_class(local_ray, image_set, tmp_path):
    cfg = _cfg(image_set, tmp_path / "run")
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, group_by=("label",)))
    assert run_audit(cfg, progress=False).ok == 20
    maps = read_maps(tmp_path / "run")
    assert sorted(maps["label"].unique()) == ["0", "1"]  # stored once, as the label column
    summary = aggregate(tmp_path / "run")
    assert list(summary["label"]) == ["0", "1"] and list(summary["n"]) == [10, 10]


def test_maps_do_not_depend_on_actor_count_or_shard_size(local_ray, image_set, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    run_audit(_cfg(image_set, a, cluster={"actors": 1, "shard_size": 20}), progress=False)
    run_audit(_cfg(image_set, b, cluster={"actors": 2, "shard_size": 3}), progress=False)
    ma, mb = _by_id(a), _by_id(b)
    assert len(list((b / "maps").glob("part-*"))) == 7
    # bitwise: every forward pass has the same batch size, whatever the sharding
    assert np.array_equal(np.stack(ma["delta"].to_list()), np.stack(mb["delta"].to_list()))
    assert np.array_equal(ma["fg_bg_ratio"], mb["fg_bg_ratio"])


def test_an_existing_run_needs_resume_and_a_locked_folder_is_refused(
    local_ray, image_set, tmp_path
):
    cfg = _cfg(image_set, tmp_path / "run")
    run_audit(cfg, progress=False)
    with pytest.raises(RunFolderError, match="--resume"):
        run_audit(cfg, progress=False)
    again = run_audit(cfg, resume=True, progress=False)
    assert again.resumed_shards == 3 and again.ok == 20
    with RunLock(tmp_path / "run"), pytest.raises(RunLockedError, match="locked by another run"):
        run_audit(cfg, resume=True, progress=False)


def test_an_actor_killed_mid_shard_is_replaced_and_every_image_lands_once(
    local_ray, image_set, tmp_path
):
    # Slow shards (many windows, small batches) so that the kill lands inside one.
    cfg = _cfg(
        image_set,
        tmp_path / "run",
        occlusion={
            "window": [4, 4],
            "stride": [2, 2],
            "n_baselines": 3,
            "max_batch": 8,
            "engine": "generic",  # full forward passes: slow enough for the kill to land
        },
        cluster={"actors": 1, "shard_size": 5, "max_retries": 3},
    )
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pid = _busy_worker_pid()
            if pid is not None:
                time.sleep(0.3)  # let it get into the shard
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    res = run_audit(cfg, progress=False)
    killer.join()
    assert killed, "no worker process was found to kill"
    assert (res.ok, res.errors) == (20, 0)
    facts = json.loads((tmp_path / "run" / "run.json").read_text())
    assert sum(facts["retried_shards"].values()) >= 1
    maps = read_maps(tmp_path / "run")
    assert sorted(maps["image_id"]) == [f"img{i:03d}" for i in range(20)]


def _busy_worker_pid() -> int | None:
    """A process whose title says it is running ``ShardWorker.process`` (Ray sets titles)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ShardWorker.process" in cmd:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_driver_killed_then_resume_is_byte_identical(shared_ray, image_set, tmp_path):
    """The drivers join the session's Ray head, as a job on a cluster does: the killed one's
    actors die with it, and the resumed run's actors take the head's CPUs."""
    slow = {
        "window": [4, 4],
        "stride": [2, 2],
        "n_baselines": 3,
        "max_batch": 16,
        "engine": "generic",  # slow enough (about 1 s a shard) to be killed between shards
    }
    head = shared_ray.environ()  # only the drivers join the head: never this process
    paths = {}
    for name in ("ref", "killed"):
        cfg = audit_config(
            image_set, tmp_path / name, occlusion=slow, cluster={"shard_size": 4, "address": "auto"}
        )
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    ref = run_cli(paths["ref"], env=head)
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()

    proc = run_cli(paths["killed"], env=head)
    maps = tmp_path / "killed" / "maps"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(maps.glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver: its actors on the head die with it
    proc.wait()
    partial = len(list(maps.glob("part-*.parquet")))
    assert 2 <= partial < 5
    kept = {p.name: p.read_bytes() for p in maps.glob("part-*.parquet")}
    record = (tmp_path / "killed" / "run.json").read_bytes()

    # the identity was on disk before the first shard: another model cannot resume this run
    other = yaml.safe_load(paths["killed"].read_text())
    other["model"]["weights"] = str(save_gap_model(tmp_path / "other.pt", seed=1))
    paths["other"] = tmp_path / "other.yaml"
    paths["other"].write_text(yaml.safe_dump(other))
    refused = run_cli(paths["other"], "--resume", env=head)
    err = refused.stdout.read().decode()
    assert refused.wait(timeout=120) == 2, err
    assert "cannot resume" in err and "model_sha256" in err
    # nothing was touched (an orphaned actor of the killed driver may still add a whole shard)
    after = {p.name: p.read_bytes() for p in maps.glob("part-*.parquet")}
    assert kept.items() <= after.items()
    assert (tmp_path / "killed" / "run.json").read_bytes() == record

    resumed = run_cli(paths["killed"], "--resume", env=head)
    out = resumed.stdout.read().decode()
    assert resumed.wait(timeout=300) == 0, out
    facts = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert facts["resumed_shards"] >= 2
    ref_files = sorted((tmp_path / "ref" / "maps").glob("part-*.parquet"))
    got_files = sorted(maps.glob("part-*.parquet"))
    assert [f.name for f in ref_files] == [f.name for f in got_files]
    for a, b in zip(ref_files, got_files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_an_unknown_config_key_fails_before_any_work(image_set, tmp_path):
    cfg = audit_config(image_set, tmp_path / "run", occlusion={"windw": [8, 8]})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("run", str(path))
    assert proc.returncode == 2
    assert "occlusion.windw" in proc.stderr and "window" in proc.stderr
    assert not (tmp_path / "run").exists()
