"""Every model source a user brings loads from YAML: timm, torchvision, Hugging Face
``transformers`` (a local folder, or a Hub repo in an offline cache), ONNX, and a factory module
beside the config; ``model.output`` and the extras' errors name what to do."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import attribute, load_config
from pipeline.config import ConfigError, ModelConfig
from pipeline.incremental.select import select_engine
from pipeline.kernel.defaults import Engine
from pipeline.kernel.targets import score_tensor
from pipeline.models import ModelLoadError, SelectOutput, load_model, model_hash
from pipeline.models import resolve_model_file as resolve
from pipeline.storage.hub import UnpinnedRevisionWarning
from tests._zoo import (
    CLASSES,
    COMMIT,
    FAMILIES,
    SIDE,
    export_onnx,
    gap_net,
    hf_folder,
    hub_cache,
    model_section,
)

X = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection fails: loading must work from local files alone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _yaml_model(tmp_path: Path, model: dict) -> ModelConfig:
    """The ``model`` section as a user's YAML file gives it (paths relative to the file)."""
    cfg = {"dataset": {"manifest": "m.parquet", "image_size": [SIDE, SIDE]}, "model": model}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path).model


@pytest.mark.parametrize(
    ("source", "name", "kwargs"),
    [
        ("timm", "resnet10t", {}),
        ("timm", "vit_tiny_patch16_224", {"img_size": SIDE, "patch_size": 8, "depth": 1}),
        ("torchvision", "resnet18", {}),
    ],
)
def test_timm_and_torchvision_from_yaml_with_a_state_dict(tmp_path, source, name, kwargs):
    kwargs = {"num_classes": CLASSES, **kwargs}
    random = load_model(_yaml_model(tmp_path, {source: name, "kwargs": kwargs}))
    assert random(X).shape == (2, CLASSES) and not random.training
    torch.save(random.state_dict(), tmp_path / "w.pth")
    spec = _yaml_model(tmp_path, {source: name, "kwargs": kwargs, "weights": "w.pth"})
    assert spec.weights == str(tmp_path / "w.pth") and spec.source.startswith(f"{source}:{name}")
    torch.testing.assert_close(load_model(spec)(X), random(X), rtol=0, atol=0)
    assert resolve(spec) == tmp_path / "w.pth"


def test_unknown_names_and_kwargs_name_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model\.timm 'resnet_nope'.*list_models"):
        load_model(ModelConfig(timm="resnet_nope"))
    with pytest.raises(ModelLoadError, match=r"model\.torchvision 'resnet_nope'"):
        load_model(ModelConfig(torchvision="resnet_nope"))
    with pytest.raises(TypeError, match=r"model\.torchvision 'resnet18' with kwargs"):
        load_model(ModelConfig(torchvision="resnet18", kwargs={"no_such_kwarg": 1}))
    with pytest.raises(ConfigError, match=r"model\.timm: must be a model name"):
        _yaml_model(tmp_path, {"timm": "hf-hub:owner/name"})


def test_transformers_from_a_local_folder_without_network(tmp_path, no_network):
    hf_folder("vit", tmp_path / "vit")
    spec = _yaml_model(tmp_path, {"transformers": "vit"})  # relative to the YAML file
    assert spec.transformers == str(tmp_path / "vit") and spec.revision is None
    model = load_model(spec)
    out = model(X)  # a ModelOutput: the kernel takes its logits
    assert type(out).__name__ == "ImageClassifierOutput"
    assert score_tensor(out).shape == (2, CLASSES)
    r = attribute(model, X, window=[16, 16], baseline="zero")
    assert r.delta.shape == (2, 1, 1, 3, 3)
    assert resolve(spec) == tmp_path / "vit" and len(model_hash(tmp_path / "vit")) == 64


def test_transformers_by_repo_id_and_commit_from_an_offline_cache(
    tmp_path, no_network, monkeypatch
):
    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, "owner/tiny-resnet", hf_folder("resnet", tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    spec = _yaml_model(tmp_path, {"transformers": "owner/tiny-resnet", "revision": COMMIT})
    assert spec.source == f"transformers:owner/tiny-resnet@{COMMIT}"
    assert resolve(spec) == snapshot
    # the same bytes, through a local folder or the cache: the same run identity
    assert model_hash(snapshot) == model_hash(tmp_path / "src")
    expected = load_model(ModelConfig(transformers=str(tmp_path / "src")))(X).logits
    torch.testing.assert_close(load_model(spec)(X).logits, expected, rtol=0, atol=0)
    with pytest.warns(UnpinnedRevisionWarning, match="40-hex commit"):
        load_model(ModelConfig(transformers="owner/tiny-resnet"))  # refs/main, with a warning
    with pytest.raises(FileNotFoundError, match=r"owner/missing.*HF_HUB_OFFLINE.*hf download"):
        load_model(ModelConfig(transformers="owner/missing", revision=COMMIT))


def test_model_output_picks_a_key_or_an_index_and_lists_what_there_is(tmp_path):
    hf_folder("convnext", tmp_path / "cx")
    logits = load_model(ModelConfig(transformers=str(tmp_path / "cx"), output="logits"))(X)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, CLASSES)
    with pytest.raises(ValueError, match=r"model\.output 'probs'.*keys \['logits'\]"):
        load_model(ModelConfig(transformers=str(tmp_path / "cx"), output="probs"))(X)
    pair = SelectOutput(torch.nn.Identity(), 1)
    assert pair((torch.zeros(1), torch.ones(1))).item() == 1.0
    with pytest.raises(ValueError, match=r"returns a tensor.*leave model\.output unset"):
        SelectOutput(torch.nn.Identity(), 0)(X)
    # without model.output: logits, else the first tensor
    assert score_tensor((None, X)).shape == X.shape
    with pytest.raises(TypeError, match=r"set model\.output"):
        score_tensor({"pooled": None})


def test_onnx_forward_passes_equal_torch(tmp_path):
    path = export_onnx(tmp_path / "m.onnx")
    spec = _yaml_model(tmp_path, {"onnx": "m.onnx", "kwargs": {"intra_op_num_threads": 1}})
    model = load_model(spec)
    torch.testing.assert_close(model(X), gap_net()(X), rtol=1e-4, atol=1e-5)
    assert model_hash(resolve(spec)) == model_hash(path)
    two = load_model(ModelConfig(onnx=str(export_onnx(tmp_path / "two.onnx", two_outputs=True))))
    out = two(X)
    assert set(out) == {"logits", "negated"}
    torch.testing.assert_close(score_tensor(out), gap_net()(X), rtol=1e-4, atol=1e-5)
    with pytest.raises(ModelLoadError, match=r"model\.kwargs\.threads: not an onnxruntime"):
        load_model(ModelConfig(onnx=str(path), kwargs={"threads": 1}))
    with pytest.raises(ConfigError, match=r"model\.weights: applies only with factory"):
        _yaml_model(tmp_path, {"onnx": "m.onnx", "weights": "w.pth"})


def test_a_factory_module_beside_the_yaml_needs_no_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "beside_yaml_nets", raising=False)
    (tmp_path / "beside_yaml_nets.py").write_text(
        "from pipeline.models import SeedCNNWithGAP\n\n"
        "def build(classes):\n    return SeedCNNWithGAP(num_classes=classes)\n"
    )
    spec = _yaml_model(tmp_path, {"factory": "beside_yaml_nets:build", "kwargs": {"classes": 2}})
    assert spec.factory_dir == str(tmp_path)
    assert load_model(spec)(X).shape == (2, 2)
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    monkeypatch.delitem(sys.modules, "beside_yaml_nets", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    spec = _yaml_model(elsewhere, {"factory": "beside_yaml_nets:build"})  # not beside this one
    assert spec.factory_dir is None
    with pytest.raises(ImportError, match=r"beside_yaml_nets\.py beside the config"):
        load_model(spec)


@pytest.mark.parametrize(
    ("module", "source", "extra"),
    [
        ("timm", {"timm": "resnet18"}, "timm"),
        ("torchvision", {"torchvision": "resnet18"}, "torchvision"),
        ("transformers", {"transformers": "./src"}, "transformers"),
        ("onnxruntime", {"onnx": "m.onnx"}, "onnx"),
    ],
)
def test_a_missing_extra_names_what_to_install(tmp_path, monkeypatch, module, source, extra):
    (tmp_path / "m.onnx").write_bytes(b"")
    hf_folder("resnet", tmp_path / "src")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=rf"pip install 'occlusion-audit\[{extra}\]'"):
        load_model(_yaml_model(tmp_path, source))


@pytest.mark.parametrize(
    ("model", "key", "match"),
    [
        ({"timm": "a", "torchvision": "b"}, "model", "exactly one of .*got timm, torchvision"),
        ({"timm": "a", "factory_dir": "x"}, "model.factory_dir", "only with factory"),
        ({"timm": "a", "revision": COMMIT}, "model.revision", "only with model.transformers"),
        ({"transformers": "./f", "revision": COMMIT}, "model.revision", "Hub repo id"),
        ({"transformers": "a b"}, "model.transformers", "local folder .* or a Hub repo id"),
        ({"torchscript": "m.pt", "kwargs": {"a": 1}}, "model.kwargs", "applies only with"),
        ({"timm": "a", "output": -1}, "model.output", "index >= 0"),
        (
            {"timm": "a", "hub": {"repo_id": "o/n", "filename": "m.onnx"}},
            "model.hub.filename",
            "is an ONNX file, not a state_dict",
        ),
    ],
)
def test_invalid_sources_name_the_key(model, key, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config({"dataset": {"manifest": "m.parquet"}, "model": model})
    assert info.value.key == key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_resolves_the_engine_each_family_records(family, tmp_path, monkeypatch):
    """What ``occlusion.engine: auto`` picks for each family of tests/test_zoo_runs.py, here in
    one process: the incremental engine where the graph is local, else generic and why."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # factory_dir goes first on the path
    monkeypatch.setitem(sys.modules, "my_models", None)  # restored (removed) afterwards
    del sys.modules["my_models"]
    spec = _yaml_model(tmp_path, model_section(family, tmp_path))
    model = load_model(spec)
    engine, note = select_engine(Engine.AUTO, model, (3, SIDE, SIDE), "cpu")
    assert ("generic" if engine is None else "incremental") == FAMILIES[family][1], note
    assert note
