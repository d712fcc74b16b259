"""Model loading: every source round-trips through real files, errors name what to fix."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, HubFile, ModelConfig, NormalizeConfig
from pipeline.models import (
    ModelLoadError,
    Normalized,
    SeedCNN,
    SeedCNNWithGAP,
    load_model,
    model_hash,
    resolve_model_file,
)
from pipeline.storage.hub import UnpinnedRevisionWarning

NORM = NormalizeConfig((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

SIDE = 32  # SeedCNN's head grows with the square of the side; 32 keeps it at 0.5M weights
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torch.jit.script/trace are deprecated upstream; the tests still need TorchScript files to load.
jit_ok = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


class TinyNet(nn.Module):
    """Conv, batch-norm and dropout: outputs differ between train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x).mean(dim=(2, 3))))


class PlainSeed(nn.Module):
    """The published seed regressor, written out by hand (not via pipeline.models.nets)."""

    def __init__(self, n: int, side: int) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        flat = 64 * (side // 8) ** 2
        self.fc_layers = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(flat, 500), nn.ReLU(), nn.Linear(500, n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


class PlainSeedGAP(nn.Module):
    """The published global-average-pooling variant, written out by hand."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(64, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv_layers(x).mean(dim=(2, 3)))


def _trained(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, so a model left in train mode would show."""
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def _x(n: int = 2, side: int = SIDE) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _all_eval(model: nn.Module) -> bool:
    return not any(m.training for m in model.modules())


def _seed_state(tmp_path: Path, n: int = 2) -> tuple[Path, nn.Module]:
    ref = _trained(PlainSeed(n, SIDE)).eval()
    path = tmp_path / "seed.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


def _hub_cache(root: Path, repo_id: str, filename: str, data: bytes, commit: str) -> Path:
    """The on-disk layout huggingface_hub reads: blobs, snapshots/<commit>/<file>, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    pointer = repo / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return pointer


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@jit_ok
def test_torchscript_round_trip_in_eval_mode(tmp_path: Path) -> None:
    ref = _trained(TinyNet())
    torch.jit.script(ref).save(tmp_path / "m.pt")  # saved in train mode on purpose
    model = load_model(ModelConfig(torchscript=str(tmp_path / "m.pt")))
    assert _all_eval(model)
    torch.testing.assert_close(model(_x(side=8)), ref.eval()(_x(side=8)))


def test_export_round_trip_in_eval_mode(tmp_path: Path) -> None:
    ref = _trained(TinyNet()).eval()
    torch.export.save(torch.export.export(ref, (_x(side=8),)), tmp_path / "m.pt2")
    model = load_model(ModelConfig(export=str(tmp_path / "m.pt2")), NORM)
    assert _all_eval(model)
    model.eval()  # callers may call eval(); the exported graph must accept it
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    expected = ref((_x(side=8) - mean) / std)
    torch.testing.assert_close(model(_x(side=8)), expected)
    with pytest.raises(NotImplementedError, match="training mode"):
        model.train()


def test_export_in_training_mode_is_rejected(tmp_path: Path) -> None:
    ref = _trained(TinyNet()).train()
    torch.export.save(torch.export.export(ref, (_x(side=8),)), tmp_path / "m.pt2")
    with pytest.raises(ModelLoadError, match=r"training mode.*model\.eval\(\)"):
        load_model(ModelConfig(export=str(tmp_path / "m.pt2")))


def test_factory_with_state_dict(tmp_path: Path) -> None:
    ref = _trained(SeedCNN(num_classes=3, input_dim=SIDE)).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        kwargs={"num_classes": 3, "input_dim": SIDE},
        weights=str(tmp_path / "w.pth"),
    )
    model = load_model(spec)
    assert isinstance(model, SeedCNN) and _all_eval(model)
    torch.testing.assert_close(model(_x()), ref(_x()), rtol=0, atol=0)


def test_seed_checkpoint_loads_by_key_name(tmp_path: Path) -> None:
    path, ref = _seed_state(tmp_path)
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        kwargs={"num_classes": 2, "input_dim": SIDE},
        weights=str(path),
    )
    torch.testing.assert_close(load_model(spec)(_x()), ref(_x()), rtol=0, atol=0)


def test_seed_gap_checkpoint_loads_by_key_name(tmp_path: Path) -> None:
    ref = _trained(PlainSeedGAP(1)).eval()
    torch.save(ref.state_dict(), tmp_path / "gap.pth")
    spec = ModelConfig(factory="pipeline.models:SeedCNNWithGAP", weights=str(tmp_path / "gap.pth"))
    model = load_model(spec)
    assert isinstance(model, SeedCNNWithGAP)
    torch.testing.assert_close(model(_x(side=20)), ref(_x(side=20)), rtol=0, atol=0)


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = _trained(SeedCNN(input_dim=SIDE)).state_dict()
    state["head.weight"] = state.pop("fc_layers.3.weight")
    torch.save(state, tmp_path / "bad.pth")
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        kwargs={"input_dim": SIDE},
        weights=str(tmp_path / "bad.pth"),
    )
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    message = str(info.value)
    assert "fc_layers.3.weight" in message and "head.weight" in message
    assert "bad.pth" in message and "Missing" in message and "Unexpected" in message


def test_shape_mismatch_names_the_parameter(tmp_path: Path) -> None:
    path, _ = _seed_state(tmp_path, n=2)
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        kwargs={"num_classes": 5, "input_dim": SIDE},
        weights=str(path),
    )
    with pytest.raises(ModelLoadError, match=r"size mismatch for fc_layers\.3\.weight"):
        load_model(spec)


def test_normalisation_happens_inside_the_model(tmp_path: Path) -> None:
    path, ref = _seed_state(tmp_path)
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        kwargs={"num_classes": 2, "input_dim": SIDE},
        weights=str(path),
    )
    model = load_model(spec, NORM)
    assert isinstance(model, Normalized) and _all_eval(model)
    mean = torch.tensor(MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(STD).reshape(1, 3, 1, 1)
    x = _x()
    torch.testing.assert_close(model(x), ref((x - mean) / std))
    assert torch.equal(x, _x())  # input not mutated
    assert set(model.state_dict()) == {f"model.{k}" for k in ref.state_dict()}


def test_normalized_is_transparent_to_fx() -> None:
    model = Normalized(_trained(SeedCNNWithGAP()).eval(), MEAN, STD).eval()
    traced = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert any("sub" in t for t in targets) and any("truediv" in t for t in targets)
    torch.testing.assert_close(traced(_x(side=12)), model(_x(side=12)))


def test_hub_state_dict_by_pinned_revision(tmp_path: Path, offline_cache: Path) -> None:
    path, ref = _seed_state(tmp_path)
    pointer = _hub_cache(
        offline_cache, "owner/seeds", "models/a/model.pth", path.read_bytes(), COMMIT
    )
    hub = HubFile("owner/seeds", "models/a/model.pth", revision=COMMIT)
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN", kwargs={"num_classes": 2, "input_dim": SIDE}, hub=hub
    )
    resolved = resolve_model_file(spec)
    assert resolved == pointer
    assert model_hash(resolved) == hashlib.sha256(path.read_bytes()).hexdigest() == model_hash(path)
    torch.testing.assert_close(load_model(spec)(_x()), ref(_x()), rtol=0, atol=0)


def test_hub_address_string_and_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, ref = _seed_state(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    _hub_cache(tmp_path / "hf-home" / "hub", "owner/seeds", "model.pth", path.read_bytes(), COMMIT)
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        kwargs={"num_classes": 2, "input_dim": SIDE},
        weights=f"hf://owner/seeds@{COMMIT}/model.pth",
    )
    torch.testing.assert_close(load_model(spec)(_x()), ref(_x()), rtol=0, atol=0)


@jit_ok
def test_hub_archive_without_factory_is_torchscript(tmp_path: Path, offline_cache: Path) -> None:
    ref = _trained(TinyNet()).eval()
    torch.jit.script(ref).save(tmp_path / "m.pt")
    _hub_cache(offline_cache, "owner/ts", "m.pt", (tmp_path / "m.pt").read_bytes(), COMMIT)
    model = load_model(ModelConfig(hub=HubFile("owner/ts", "m.pt", revision=COMMIT)))
    torch.testing.assert_close(model(_x(side=8)), ref(_x(side=8)))


def test_unpinned_hub_file_warns_and_uses_refs_main(tmp_path: Path, offline_cache: Path) -> None:
    path, _ = _seed_state(tmp_path)
    pointer = _hub_cache(offline_cache, "owner/seeds", "model.pth", path.read_bytes(), COMMIT)
    spec = ModelConfig(factory="pipeline.models:SeedCNN", hub=HubFile("owner/seeds", "model.pth"))
    with pytest.warns(UnpinnedRevisionWarning, match="40-hex commit"):
        assert resolve_model_file(spec) == pointer


def test_hub_revision_missing_from_cache_is_clear(tmp_path: Path, offline_cache: Path) -> None:
    path, _ = _seed_state(tmp_path)
    _hub_cache(offline_cache, "owner/seeds", "model.pth", path.read_bytes(), COMMIT)
    spec = ModelConfig(
        factory="pipeline.models:SeedCNN",
        hub=HubFile("owner/seeds", "model.pth", revision=OTHER_COMMIT),
    )
    with pytest.raises(FileNotFoundError) as info:
        load_model(spec)
    message = str(info.value)
    assert OTHER_COMMIT in message and "HF_HUB_OFFLINE" in message
    assert f"hf download owner/seeds model.pth --revision {OTHER_COMMIT}" in message


def test_model_hash_streams_file_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # crosses chunk boundaries
    (tmp_path / "blob").write_bytes(data)
    assert model_hash(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert resolve_model_file(ModelConfig(factory="pipeline.models:SeedCNN")) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs exactly one of"),
        ({"torchscript": "a.pt", "export": "b.pt2"}, "got torchscript, export"),
        ({"torchscript": "a.pt", "hub": HubFile("o/n", "m.pt")}, "got torchscript, hub"),
        ({"torchscript": "a.pt", "weights": "w.pth"}, "applies only with factory"),
        ({"export": "a.pt2", "kwargs": {"n": 1}}, "applies only with factory"),
        (
            {"factory": "pipeline.models.loading.SeedCNN"},
            "'module:callable'.*pipeline.models.loading.SeedCNN",
        ),
        ({"factory": "m:f", "weights": "w", "hub": HubFile("o/n", "m.pth")}, "weights or hub"),
        ({"factory": "m:f", "hub": HubFile("o/n", "m.pt2")}, r"'m\.pt2' is a torch.export"),
        ({"torchscript": ""}, "must be a non-empty path"),
    ],
)
def test_invalid_specs_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [((0.5, 0.5), (0.2,), "1 or 3 values"), ((0.5,), (0.0,), "must be > 0")],
)
def test_invalid_normalisation_is_refused(mean, std, match) -> None:
    with pytest.raises(ConfigError, match=match):
        NormalizeConfig(mean, std)


def test_spec_is_frozen_and_copies_kwargs() -> None:
    kwargs = {"input_dim": SIDE}
    spec = ModelConfig(factory="pipeline.models:SeedCNN", kwargs=kwargs)
    kwargs["input_dim"] = 7
    assert spec.kwargs == {"input_dim": SIDE}
    with pytest.raises(AttributeError):
        spec.factory = "x:y"  # type: ignore[misc]
    # Config sections travel to Ray actors by pickle and may key caches.
    hub_spec = ModelConfig(hub=HubFile("o/n", "m.pt", COMMIT))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(pickle.loads(pickle.dumps(hub_spec))) == hash(hub_spec)


def test_hub_address_parsing() -> None:
    hub = HubFile.parse(f"hf://datasets/owner/name@{COMMIT}/dir/model.pth")
    assert hub == HubFile("owner/name", "dir/model.pth", COMMIT, repo_type="dataset") and hub.pinned
    assert str(hub) == f"hf://datasets/owner/name@{COMMIT}/dir/model.pth"
    pr = HubFile.parse("hf://owner/name@refs%2Fpr%2F3/m.pth")
    assert pr.revision == "refs/pr/3" and HubFile.parse(str(pr)) == pr
    assert not HubFile.parse("hf://owner/name/m.pth").pinned
    with pytest.raises(ValueError, match=r"malformed hf:// URI 'hf://owner/m\.pth'"):
        HubFile.parse("hf://owner/m.pth")
    with pytest.raises(ValueError, match="repo_type"):
        HubFile("o/n", "m.pth", repo_type="kernel")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(ModelConfig(torchscript=str(missing)))


def test_factory_import_errors_name_the_module() -> None:
    with pytest.raises(ImportError, match=r"'no_such_pkg\.models'"):
        load_model(ModelConfig(factory="no_such_pkg.models:Net"))
    with pytest.raises(ImportError, match=r"'pipeline\.models' has no 'Nope'"):
        load_model(ModelConfig(factory="pipeline.models:Nope"))
    with pytest.raises(TypeError, match=r"SeedCNN'? with kwargs \{'width': 3\}"):
        load_model(ModelConfig(factory="pipeline.models:SeedCNN", kwargs={"width": 3}))


@jit_ok
@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning")
def test_wrong_file_kinds_say_where_they_belong(tmp_path: Path) -> None:
    torch.jit.script(TinyNet()).save(tmp_path / "m.pt")
    torch.save({"epoch": 3, "state_dict": TinyNet().state_dict()}, tmp_path / "wrapped.pth")
    torch.save(TinyNet().state_dict(), tmp_path / "sd.pth")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(ModelConfig(factory="pipeline.models:SeedCNN", weights=str(tmp_path / "m.pt")))
    with pytest.raises(ModelLoadError, match=r"not a flat state_dict.*'epoch'"):
        load_model(
            ModelConfig(factory="pipeline.models:SeedCNN", weights=str(tmp_path / "wrapped.pth"))
        )
    with pytest.raises(ModelLoadError, match=r"not a TorchScript archive.*model\.factory"):
        load_model(ModelConfig(torchscript=str(tmp_path / "sd.pth")))
