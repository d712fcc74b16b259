"""WebDataset tars cut short: written by ``webdataset.TarWriter``, cut at a member boundary,
inside a header, inside member data, or without their end-of-archive blocks. Every cut is one
line naming the tar and exit 2, local or in a bucket (moto on loopback); never fewer rows than
samples without a word."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config.dataset import DatasetConfig
from pipeline.data.detect import open_source
from pipeline.data.plan import plan_source
from pipeline.data.source import SourceError
from tests._data_helpers import image_bytes, moto_server, noise_rgb, s3_put, use_s3
from tests._dataset import save_gap_model
from tests._faults import cli

N = 8  # samples in the tar


def _write_tar(path: Path, n: int = N) -> list[tarfile.TarInfo]:
    """``n`` samples (png and json members) written by webdataset; returns the tar's members."""
    import webdataset as wds
    from PIL import Image

    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            png = image_bytes(Image.fromarray(noise_rgb(16, 16, seed=i)), "PNG")
            sink.write({"__key__": f"s{i}", "png": png, "json": {"room": "ab"[i % 2]}})
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _cuts(path: Path) -> dict[str, int]:
    """Byte counts to keep for each kind of cut (offsets read from the tar itself)."""
    members = {m.name: m for m in _write_tar(path)}
    last = members[f"s{N - 1}.png"]
    data_end = last.offset_data + last.size
    return {
        "member boundary": members["s6.json"].offset,  # s6 and s7 gone
        "inside a header": members["s6.json"].offset + 100,
        "inside member data": members["s6.png"].offset_data + 100,
        "end blocks stripped": data_end + (-data_end % tarfile.BLOCKSIZE),  # every sample kept
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tars")
    cuts = _cuts(root / "full.tar")
    whole = (root / "full.tar").read_bytes()
    assert whole[cuts["end blocks stripped"] :].strip(b"\0") == b""  # only the end was stripped
    tars = {}
    for kind, keep in cuts.items():
        tars[kind] = root / f"{kind.replace(' ', '-')}.tar"
        tars[kind].write_bytes(whole[:keep])
    save_gap_model(root / "model.pt")
    return {"root": root, "tars": tars, "full": root / "full.tar"}


def _config(root: Path, manifest: str) -> Path:
    cfg = {
        "name": "tars",
        "dataset": {"manifest": manifest, "group_by": ["room"], "image_size": [16, 16]},
        "model": {
            "factory": "pipeline.models:SeedCNNWithGAP",
            "kwargs": {"num_classes": 2},
            "weights": str(root / "model.pt"),
        },
        "occlusion": {"window": [8, 8], "stride": [8, 8], "baseline": "mean"},
        "counterfactual": {"enabled": False},
        "cluster": {"actors": 1},
        "output": {"dir": str(root / "run"), "report_dir": str(root / "report")},
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(cfg: Path) -> subprocess.CompletedProcess:
    """``run CFG`` in this process: every run here is refused before Ray starts."""
    return cli("run", str(cfg), "--no-report", "--quiet")


def _assert_one_line(done: subprocess.CompletedProcess, tar: str, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("occlusion-audit run: error: ") and tar in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("member boundary", ("without its end-of-archive blocks", "'s5.png'")),
        ("inside a header", ("cut inside the member header",)),
        ("inside member data", ("unexpected end of data", "'s6.png'")),
        ("end blocks stripped", ("without its end-of-archive blocks", "'s7.png'")),
    ],
)
def test_a_cut_tar_is_one_line_and_exit_2(data, kind: str, words: tuple[str, ...]) -> None:
    tar = str(data["tars"][kind])
    done = _run_cli(_config(data["root"], tar))
    _assert_one_line(done, tar, *words)
    assert not (data["root"] / "run" / "maps").exists()  # refused before any compute


def test_a_cut_tar_in_a_bucket_is_the_same_line(data, monkeypatch) -> None:
    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)
        s3_put(
            endpoint, "tars", {"cut/shard-000.tar": data["tars"]["member boundary"].read_bytes()}
        )
        url = "s3://tars/cut/shard-000.tar"
        done = _run_cli(_config(data["root"], url))
    _assert_one_line(done, url, "without its end-of-archive blocks", "'s5.png'")


def test_a_worker_reading_a_tar_cut_after_planning_says_so(data, tmp_path) -> None:
    """The worker's read path: the driver planned a whole tar, then the tar was cut (or
    replaced by a shorter one) before a worker read its shard."""
    tar = tmp_path / "shard.tar"
    tar.write_bytes(data["full"].read_bytes())
    cfg = DatasetConfig(manifest=str(tar), group_by=("room",), image_size=(16, 16))
    source = open_source(cfg)
    shards = plan_source(source, 4).shards
    assert [len(s) for s in shards] == [4, 4]
    tar.write_bytes(data["tars"]["inside member data"].read_bytes())
    with pytest.raises(SourceError, match=r"shard\.tar.*unexpected end of data in member 's6"):
        source.read(shards[1])
    assert [r.image_id for r in source.read(shards[0])] == ["s0", "s1", "s2", "s3"]
    _write_tar(tar, n=6)  # a whole, shorter tar under the same name
    with pytest.raises(SourceError, match=r"shard\.tar: holds 6 samples, but shard 1 .* 4\.\.7"):
        source.read(shards[1])
    assert len(source.read(shards[0])) == 4
