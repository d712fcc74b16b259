"""Model loading: every ``model`` source of the config becomes a module in eval mode.

Archives (TorchScript, ``torch.export``, ONNX) and builders (a factory, timm, torchvision,
``transformers``) with an optional ``state_dict``. Files are local paths or Hugging Face Hub
files (a :class:`HubFile` or an ``hf://owner/name@<commit>/file`` address,
:mod:`pipeline.storage.hub`). The loaded model is in eval mode on the requested device and, given
a mean/std, wrapped in :class:`Normalized`: occlusion happens in ``[0, 1]`` pixel space and
normalisation belongs to the model (docs/design.md).
"""

from __future__ import annotations

import fnmatch
import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.config import ModelConfig, NormalizeConfig
from pipeline.config.model import ARCHIVES, BUILDERS
from pipeline.models.exported import load_export
from pipeline.models.factory import ModelLoadError, build_factory, load_state_dict
from pipeline.models.onnxrt import load_onnx
from pipeline.models.outputs import SelectOutput
from pipeline.models.zoo import (
    TRANSFORMERS_FILES,
    build_timm,
    build_torchvision,
    build_transformers,
    transformers_folder,
)
from pipeline.storage.hub import HubFile, UnpinnedRevisionWarning, fetch
from pipeline.storage.paths import is_uri

__all__ = [
    "ModelLoadError",
    "Normalized",
    "UnpinnedRevisionWarning",
    "build_factory",
    "load_model",
    "model_hash",
    "resolve_model_file",
]


def _check_normalize(pair: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean, std = (tuple(float(v) for v in seq) for seq in pair)
    except (TypeError, ValueError) as err:
        raise ValueError(f"normalize must be (mean, std), two lists of numbers: {err}") from err
    if not mean or len(mean) != len(std):
        raise ValueError(f"normalize mean {mean} and std {std} need one entry per channel")
    if not all(s > 0 for s in std):
        raise ValueError(f"normalize std must be positive, got {std}")
    return mean, std


class Normalized(nn.Module):
    """``model((x - mean) / std)`` per channel, for ``x`` of shape ``(N, C, H, W)`` in ``[0, 1]``.

    Only element-wise ops, so ``torch.fx`` and ``torch.export`` trace straight through it.

    Args:
        model: the network that expects normalised input.
        mean: per-channel mean, ``C`` entries (or one for all channels).
        std: per-channel standard deviation, as many entries as ``mean``.

    Example:
        >>> Normalized(nn.Identity(), [0.5], [0.5])(torch.ones(1, 1, 1, 2)).flatten().tolist()
        [1.0, 1.0]
    """

    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor  # (1, C, 1, 1)
    # the inner model sees every pixel where it was: occlusion.mode token-drop reaches through
    # (pipeline.incremental.tokens)
    keeps_pixel_positions: ClassVar[bool] = True

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = _check_normalize((mean, std))
        self.model = model
        # Non-persistent: the wrapper's state_dict stays the inner model's, under "model.".
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)  # (N, C, H, W) -> model output


def _source(spec: ModelConfig) -> tuple[str, str, str | HubFile | None]:
    """(how to load, the field naming the file, the file reference or None)."""
    builder = next((k for k in BUILDERS if getattr(spec, k)), None)
    if builder is not None:
        return (builder, "hub", spec.hub) if spec.hub else (builder, "weights", spec.weights)
    if spec.hub is not None:
        name = spec.hub.filename
        kind = "export" if name.endswith(".pt2") else "onnx" if name.endswith(".onnx") else ""
        return kind or "torchscript", "hub", spec.hub
    kind = next(k for k in ARCHIVES if getattr(spec, k))
    return kind, kind, getattr(spec, kind)


def _file(field_name: str, ref: str | HubFile | None) -> Path | None:
    """The local path of a model file reference, fetched from the Hub if needed."""
    if isinstance(ref, str) and ref.startswith("hf://"):
        ref = HubFile.parse(ref)
    if ref is None:
        return None
    if isinstance(ref, HubFile):
        return fetch(ref)
    if is_uri(ref):
        raise FileNotFoundError(
            f"model.{field_name} {ref!r}: model files are read from local paths or hf:// "
            "addresses; copy it to a local path (or the Hub) first"
        )
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.{field_name} file not found: {path.absolute()}")
    return path


def resolve_model_file(spec: ModelConfig) -> Path | None:
    """Local path of the spec's archive or weights, fetching a Hub file into the cache if needed.

    Hub files go to ``HF_HUB_CACHE`` (else ``HF_HOME/hub``), read at call time; with
    ``HF_HUB_OFFLINE=1`` they come from that cache only. A ``transformers`` source without
    ``weights`` is its folder (a Hub repo's snapshot in the cache).

    Args:
        spec: the ``model`` config section.

    Returns:
        The file (or folder) to load and to hash with :func:`model_hash`; ``None`` for a
        builder without weights (random or built-in weights).
    """
    _, field_name, ref = _source(spec)
    path = _file(field_name, ref)
    if path is None and spec.transformers is not None:
        return transformers_folder(spec.transformers, spec.revision)
    return path


def model_hash(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, streamed in 1 MiB chunks (symlinks followed); of a
    folder (a ``transformers`` checkpoint), the digest of its checkpoint files' names and
    digests.

    Example:
        >>> len(model_hash(__file__))
        64
    """
    path = Path(path).resolve()
    if path.is_dir():
        names = sorted(
            p.name
            for p in path.iterdir()
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in TRANSFORMERS_FILES)
        )
        lines = "".join(f"{name}\0{model_hash(path / name)}\n" for name in names)
        return hashlib.sha256(lines.encode("utf-8")).hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build(kind: str, spec: ModelConfig, folder: Path | None) -> nn.Module:
    """The module of a builder source, before any state_dict."""
    if kind == "factory":
        return build_factory(str(spec.factory), spec.kwargs, spec.factory_dir)
    if kind == "timm":
        return build_timm(str(spec.timm), spec.kwargs)
    if kind == "torchvision":
        return build_torchvision(str(spec.torchvision), spec.kwargs)
    if folder is None:
        folder = transformers_folder(str(spec.transformers), spec.revision)
    return build_transformers(folder, spec.kwargs)


def load_model(
    spec: ModelConfig,
    normalize: NormalizeConfig | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load the model a ``model`` config section describes, ready for ``[0, 1]`` RGB input.

    Args:
        spec: where the model comes from: an archive (``torchscript``, ``export``, ``onnx``,
            ``hub``) or a builder (``factory``, ``timm``, ``torchvision``, ``transformers``)
            with ``kwargs`` and optional ``weights``; ``output`` picks the score tensor.
        normalize: the dataset's per-channel mean/std, applied inside the model.
        device: where to put the model.

    Returns:
        A module in eval mode on ``device`` mapping ``(N, C, H, W)`` pixels in ``[0, 1]`` to the
        model's output, wrapped in :class:`Normalized` when ``normalize`` is set.

    Example:
        >>> m = load_model(ModelConfig(factory="pipeline.models:SeedCNN", kwargs={"input_dim": 64}))
        >>> m(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 1])
    """
    device = torch.device(device)
    kind = _source(spec)[0]
    path = resolve_model_file(spec)
    if kind in BUILDERS:
        folder = path if path is not None and path.is_dir() else None
        model = _build(kind, spec, folder)
        if path is not None and folder is None:
            load_state_dict(model, path, f"model.{kind} {getattr(spec, kind)!r}")
    else:
        assert path is not None  # an archive source always names a file
        if kind == "onnx":
            model = load_onnx(path, spec.kwargs, device)
        else:
            model = _load_torchscript(path, device) if kind == "torchscript" else load_export(path)
    if spec.output is not None:
        model = SelectOutput(model, spec.output)
    if normalize is not None:
        model = Normalized(model, normalize.mean, normalize.std)
    return model.to(device).eval()


def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream, yet TorchScript archives stay a supported input; the
        # warning would repeat in every worker with nothing for the user to act on.
        warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
        try:
            return torch.jit.load(str(path), map_location=device)
        except RuntimeError as err:
            raise ModelLoadError(
                f"{path} is not a TorchScript archive ({str(err).splitlines()[0]}); a state_dict "
                "needs model.factory plus weights, a torch.export archive goes in model.export"
            ) from err
