"""Config: YAML -> frozen dataclasses, every key checked, paths resolved, lossless round trip."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import (
    AuditConfig,
    Baseline,
    ConfigError,
    Precision,
    Score,
    Target,
    Task,
    config_to_dict,
    load_config,
)

# The example config of docs/design.md, verbatim (the model alternatives are comments there).
DOC_EXAMPLE = """\
name: val-audit
dataset:
  manifest: data/val/manifest.parquet   # local path, s3://..., gs://..., hf://datasets/...
  root: data/val                        # relative image/mask paths resolve against this
  columns: {id: image_id, path: path, label: label, mask: mask_path}
  group_by: [room]                      # one or more manifest columns
  image_size: [224, 224]                # H, W after resize
  normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}  # optional
model:
  torchscript: models/model.pt          # or: export: model.pt2
  task: classification                  # or regression
  score: logit                          # classification: logit | probability
  target: predicted                     # predicted | label | <class index>
occlusion:
  window: [32, 32]                      # [h, w] spans all channels; [c, h, w] per channel group
  stride: [16, 16]
  baseline: random-pixel
  n_baselines: 3                        # K random draws averaged (1 for fixed baselines)
  seed: 0
  precision: fp32                       # fp32 | bf16 | fp16 (GPU)
  max_batch: 256                        # occluded images per forward pass
cluster:
  address: local                        # local (embedded Ray) | auto | ray://host:10001
  actors: auto                          # auto = one per GPU, else one per 2 CPUs
  gpus_per_actor: 1
  shard_size: 64
  max_retries: 3
audit:
  threshold: 1.0
  min_images: 20
  confidence: 0.95
  boundary_px: 0
output:
  dir: runs/val-audit
"""

MINIMAL = {"dataset": {"manifest": "m.parquet"}, "model": {"torchscript": "m.pt"}}


def _with(section: str, **values: object) -> dict:
    data = json.loads(json.dumps(MINIMAL))
    data.setdefault(section, {}).update(values)
    return data


def _error(source: object, overrides: tuple[str, ...] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)  # type: ignore[arg-type]
    return info.value


@pytest.fixture
def design_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs" / "val.yaml"
    path.parent.mkdir()
    path.write_text(DOC_EXAMPLE, encoding="utf-8")
    return path


def test_design_example_loads_with_its_values(design_file: Path) -> None:
    cfg = load_config(design_file)
    base = design_file.parent
    assert cfg.name == "val-audit"
    assert cfg.dataset.manifest == str(base / "data/val/manifest.parquet")
    assert cfg.dataset.root == str(base / "data/val")
    assert cfg.dataset.columns.mask == "mask_path" and cfg.dataset.columns.box is None
    assert cfg.dataset.group_by == ("room",)
    assert cfg.dataset.image_size == (224, 224)
    assert cfg.dataset.normalize is not None and cfg.dataset.normalize.std[2] == 0.225
    assert cfg.model.torchscript == str(base / "models/model.pt")
    assert (cfg.model.task, cfg.model.score, cfg.model.target) == (
        Task.CLASSIFICATION,
        Score.LOGIT,
        Target.PREDICTED,
    )
    occ = cfg.occlusion
    assert (occ.window, occ.stride, occ.baseline) == ((32, 32), (16, 16), Baseline.RANDOM_PIXEL)
    assert (occ.n_baselines, occ.precision, occ.max_batch) == (3, Precision.FP32, 256)
    assert cfg.cluster.actors == "auto" and cfg.cluster.gpus_per_actor == 1.0
    assert cfg.cluster.max_failures == 0 and cfg.audit.bootstrap == 2000
    assert cfg.output.dir == str(base / "runs/val-audit")
    assert cfg.output.report_dir == os.path.abspath("reports/val-audit")  # default: cwd


def test_round_trip_through_dict_json_and_yaml(design_file: Path, tmp_path: Path) -> None:
    cfg = load_config(design_file)
    plain = config_to_dict(cfg)
    assert load_config(plain) == cfg
    assert load_config(json.loads(json.dumps(plain))) == cfg
    again = tmp_path / "elsewhere" / "again.yaml"
    again.parent.mkdir()
    again.write_text(yaml.safe_dump(plain), encoding="utf-8")
    assert load_config(again) == cfg  # absolute paths do not move with the file


def test_config_is_frozen(design_file: Path) -> None:
    cfg = load_config(design_file)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.occlusion.seed = 1  # type: ignore[misc]


def test_unknown_top_level_key_is_named_with_suggestion() -> None:
    err = _error({**MINIMAL, "datset": {}})
    assert err.key == "datset"
    assert "did you mean 'dataset'" in str(err)
    allowed = (
        "name, dataset, model, occlusion, cluster, audit, counterfactual, output, trend, notify"
    )
    assert f"allowed keys: {allowed}" in str(err)


def test_unknown_nested_key_is_named_with_suggestion() -> None:
    err = _error(_with("occlusion", windw=[8, 8]))
    assert err.key == "occlusion.windw"
    assert str(err).startswith("occlusion.windw:")
    assert "did you mean 'window'" in str(err) and "stride" in str(err)
    assert _error(_with("dataset", columns={"ids": "x"})).key == "dataset.columns.ids"


def test_bad_enum_value_lists_the_choices() -> None:
    err = _error(_with("occlusion", baseline="random_pixel"))
    assert err.key == "occlusion.baseline"
    assert "'random_pixel'" in str(err) and "'random-channel'" in str(err)
    assert "did you mean 'random-pixel'" in str(err)
    assert _error(_with("occlusion", precision="fp64")).key == "occlusion.precision"
    assert _error(_with("model", task="segmentation")).key == "model.task"


@pytest.mark.parametrize(
    ("section", "values", "key", "shown"),
    [
        ("dataset", {"image_size": "big"}, "dataset.image_size", "'big'"),
        ("dataset", {"image_size": [224]}, "dataset.image_size", "[224]"),
        ("dataset", {"image_size": [224, "x"]}, "dataset.image_size[1]", "'x'"),
        ("occlusion", {"window": [8, 8, 8, 8]}, "occlusion.window", "[8, 8, 8, 8]"),
        ("occlusion", {"window": [8, 8], "stride": [4, 4, 4]}, "occlusion.stride", "[4, 4, 4]"),
        ("occlusion", {"window": [300, 8]}, "occlusion.window", "[300, 8]"),
        # a stride beyond the window skips pixels: refused at load, not per image in a worker
        ("occlusion", {"window": [8, 8], "stride": [4, 9]}, "occlusion.stride", "stride 9"),
        ("occlusion", {"baseline": "blur", "blur_sigma": 0}, "occlusion.blur_sigma", "got 0"),
        (
            "occlusion",
            {"baseline": "blur", "blur_sigma": float("nan")},
            "occlusion.blur_sigma",
            "nan",
        ),
        ("audit", {"threshold": float("nan")}, "audit.threshold", "nan"),
        ("audit", {"threshold": float("inf")}, "audit.threshold", "inf"),
        ("audit", {"min_images": 0}, "audit.min_images", "0"),
        ("cluster", {"startup_timeout_s": 0}, "cluster.startup_timeout_s", "0"),
        ("cluster", {"device": "tpu"}, "cluster.device", "tpu"),
        ("occlusion", {"max_batch": 0}, "occlusion.max_batch", "0"),
        ("occlusion", {"seed": True}, "occlusion.seed", "True"),
        ("cluster", {"actors": "many"}, "cluster.actors", "'many'"),
        ("cluster", {"actors": 0}, "cluster.actors", "0"),
        ("cluster", {"address": "localhost"}, "cluster.address", "'localhost'"),
        ("cluster", {"gpus_per_actor": 0}, "cluster.gpus_per_actor", "0"),
        ("audit", {"confidence": 1.5}, "audit.confidence", "1.5"),
        ("audit", {"bootstrap": 2.5}, "audit.bootstrap", "2.5"),
        ("dataset", {"manifest": 7}, "dataset.manifest", "7"),
        ("model", {"target": -1}, "model.target", "-1"),
        ("model", {"target": "foo"}, "model.target", "'foo'"),
        ("dataset", {"group_by": ["score"]}, "dataset.group_by", "['score']"),
        (
            "dataset",
            {"group_by": ["label"], "columns": {"label": "cls"}},
            "dataset.group_by",
            "group by 'cls'",
        ),
        ("dataset", {"group_by": ["a", "a"]}, "dataset.group_by", "['a', 'a']"),
    ],
)
def test_wrong_values_name_key_and_value(section, values, key, shown) -> None:
    err = _error(_with(section, **values))
    assert err.key == key
    assert shown in str(err)


def test_name_must_be_a_safe_folder_name() -> None:
    assert _error({**MINIMAL, "name": "../x"}).key == "name"


def test_required_keys() -> None:
    assert _error({"model": {"torchscript": "m.pt"}}).key == "dataset"
    assert _error({"dataset": {}, "model": {"torchscript": "m.pt"}}).key == "dataset.manifest"
    assert _error({"dataset": {"manifest": "m.csv"}}).key == "model"
    assert "exactly one" in str(_error({**MINIMAL, "model": {}}))
    both = {**MINIMAL, "model": {"torchscript": "a.pt", "export": "b.pt2"}}
    assert "torchscript, export" in str(_error(both))


def test_model_sources() -> None:
    hub = {"repo_id": "me/model", "filename": "w.pth", "revision": "abc"}
    cfg = load_config({**MINIMAL, "model": {"factory": "pipeline.models:SeedCNN", "hub": hub}})
    assert cfg.model.hub is not None and cfg.model.hub.repo_id == "me/model"
    cfg = load_config(
        {**MINIMAL, "model": {"factory": "pipeline.models:SeedCNN", "kwargs": {"num_classes": 2}}}
    )
    assert cfg.model.kwargs == {"num_classes": 2} and cfg.model.weights is None
    assert _error({**MINIMAL, "model": {"factory": "nocolon"}}).key == "model.factory"
    assert _error(_with("model", kwargs={"a": 1})).key == "model.kwargs"
    bad_repo = {**MINIMAL, "model": {"hub": {"repo_id": "x", "filename": "f"}}}
    assert _error(bad_repo).key == "model.hub.repo_id"
    reg = {"torchscript": "m.pt", "task": "regression", "score": "probability"}
    assert _error({**MINIMAL, "model": reg}).key == "model.score"


def test_n_baselines_defaults_and_fixed_baselines() -> None:
    assert load_config(MINIMAL).occlusion.n_baselines == 3
    for fixed in ("zero", "constant", "mean", "blur"):
        assert load_config(_with("occlusion", baseline=fixed)).occlusion.n_baselines == 1
        err = _error(_with("occlusion", baseline=fixed, n_baselines=3))
        assert err.key == "occlusion.n_baselines" and fixed in str(err)
    assert load_config(_with("occlusion", baseline="noise", n_baselines=5)).occlusion.n_baselines
    assert _error(_with("occlusion", n_baselines=0)).key == "occlusion.n_baselines"


def test_constant_value_and_three_d_window() -> None:
    cfg = load_config(
        _with(
            "occlusion",
            baseline="constant",
            value=[0.1, 0.2, 0.3],
            window=[1, 8, 8],
            stride=[1, 4, 4],
        )
    )
    assert cfg.occlusion.value == (0.1, 0.2, 0.3) and cfg.occlusion.window == (1, 8, 8)
    assert load_config(_with("occlusion", value=0.5)).occlusion.value == 0.5
    assert _error(_with("occlusion", value=[0.1, 0.2])).key == "occlusion.value"


def test_override_sets_values_before_validation() -> None:
    cfg = load_config(
        MINIMAL,
        [
            "occlusion.stride=[8,8]",
            "model.target=3",
            "cluster.actors=2",
            "dataset.normalize.mean=[0.5]",
            "dataset.normalize.std=[0.25]",
            "model.hub=null",
            "name=other-name",
        ],
    )
    assert cfg.occlusion.stride == (8, 8)
    assert cfg.model.target == 3 and cfg.cluster.actors == 2
    assert cfg.dataset.normalize is not None and cfg.dataset.normalize.mean == (0.5,)
    assert cfg.name == "other-name"
    # validated after overriding: a bad value is still caught, by key
    assert _error(MINIMAL, ("occlusion.stride=[0, 8]",)).key == "occlusion.stride"


def test_override_to_unknown_key_is_an_error() -> None:
    err = _error(MINIMAL, ("occlusion.windw=[8,8]",))
    assert err.key == "occlusion.windw"
    assert "did you mean 'window'" in str(err) and "--set" in str(err)
    assert _error(MINIMAL, ("nosection.key=1",)).key == "nosection"
    assert _error(MINIMAL, ("occlusion.window.h=1",)).key == "occlusion.window.h"
    assert _error(MINIMAL, ("occlusion.window",)).key == "occlusion.window"  # no "="
    # keys below a free mapping are the factory's business
    cfg = load_config(
        {**MINIMAL, "model": {"factory": "pipeline.models:SeedCNN"}}, ["model.kwargs.input_dim=64"]
    )
    assert cfg.model.kwargs == {"input_dim": 64}


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "jobs"
    cfg_dir.mkdir()
    path = cfg_dir / "nightly.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "dataset": {"manifest": "../data/val/manifest.csv"},
                "model": {"factory": "pipeline.models:SeedCNN", "weights": "~/w.pth"},
                "output": {"dir": "out", "report_dir": "s3://bucket/reports"},
            }
        ),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["model.factory=pipeline.models:SeedCNN", "output.report_dir=rep"])
    assert cfg.name == "nightly"  # from the file name
    assert cfg.dataset.manifest == str(tmp_path / "data/val/manifest.csv")
    assert cfg.dataset.root == str(tmp_path / "data/val")  # default: the manifest's folder
    assert cfg.model.weights == os.path.expanduser("~/w.pth")
    assert cfg.output.dir == str(cfg_dir / "out")
    assert cfg.output.report_dir == str(tmp_path / "rep")  # typed on the command line: cwd


def test_uris_are_kept_and_give_the_default_root() -> None:
    uri = "hf://datasets/me/rooms@0123abc/val/manifest.parquet"
    cfg = load_config({**MINIMAL, "dataset": {"manifest": uri}}, base_dir="/somewhere")
    assert cfg.dataset.manifest == uri
    assert cfg.dataset.root == "hf://datasets/me/rooms@0123abc/val"
    cfg = load_config(
        {
            "dataset": {"manifest": "s3://bkt/m.csv", "root": "s3://bkt/img"},
            "model": {"torchscript": "s3://bkt/m.pt"},
        }
    )
    assert (cfg.dataset.root, cfg.model.torchscript) == ("s3://bkt/img", "s3://bkt/m.pt")


def test_unreadable_config_files(tmp_path: Path) -> None:
    assert "cannot read" in str(_error(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed", encoding="utf-8")
    assert "not valid YAML" in str(_error(bad))
    bad.write_text("- a list\n", encoding="utf-8")
    assert "mapping" in str(_error(bad))


def test_group_by_accepts_one_name() -> None:
    assert load_config(_with("dataset", group_by="room")).dataset.group_by == ("room",)


@st.composite
def _window_and_stride(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """A window inside the default 224 x 224 image and a stride that skips no pixel."""
    window = draw(st.lists(st.integers(1, 64), min_size=2, max_size=2))
    return window, [draw(st.integers(1, w)) for w in window]


@settings(max_examples=40, deadline=None)
@given(
    geometry=_window_and_stride(),
    baseline=st.sampled_from([b.value for b in Baseline]),
    seed=st.integers(0, 2**31),
    target=st.one_of(st.sampled_from(["predicted", "label"]), st.integers(0, 999)),
)
def test_round_trip_property(geometry, baseline, seed, target) -> None:
    window, stride = geometry
    data = {
        **MINIMAL,
        "occlusion": {"window": window, "stride": stride, "baseline": baseline, "seed": seed},
        "model": {"torchscript": "m.pt", "target": target},
    }
    cfg = load_config(data)
    assert isinstance(cfg, AuditConfig)
    assert load_config(config_to_dict(cfg)) == cfg
