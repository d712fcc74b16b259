"""Model loading: TorchScript, torch.export archives, or a factory plus a ``state_dict``.

Files are local paths or Hugging Face Hub files (a :class:`HubFile` or an
``hf://owner/name@<commit>/file`` address, :mod:`pipeline.storage.hub`). The loaded model is in eval
mode on the requested device and, given a mean/std, wrapped in :class:`Normalized`: occlusion
happens in ``[0, 1]`` pixel space and normalisation belongs to the model (docs/design.md).
"""

from __future__ import annotations

import hashlib
import importlib
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig, NormalizeConfig
from pipeline.storage.hub import HubFile, UnpinnedRevisionWarning, fetch
from pipeline.storage.paths import is_uri

__all__ = [
    "ModelLoadError",
    "Normalized",
    "UnpinnedRevisionWarning",
    "load_model",
    "model_hash",
    "resolve_model_file",
]

_EXPORT_SUFFIX = ".pt2"


class ModelLoadError(RuntimeError):
    """A model file exists but cannot become the module it should be (format, keys, shapes)."""


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
    if spec.factory is not None:
        return ("factory", "hub", spec.hub) if spec.hub else ("factory", "weights", spec.weights)
    if spec.hub is not None:
        kind = "export" if spec.hub.filename.endswith(_EXPORT_SUFFIX) else "torchscript"
        return kind, "hub", spec.hub
    if spec.torchscript is not None:
        return "torchscript", "torchscript", spec.torchscript
    return "export", "export", spec.export


def resolve_model_file(spec: ModelConfig) -> Path | None:
    """Local path of the spec's archive or weights, fetching a Hub file into the cache if needed.

    Hub files go to ``HF_HUB_CACHE`` (else ``HF_HOME/hub``), read at call time; with
    ``HF_HUB_OFFLINE=1`` they come from that cache only.

    Args:
        spec: the ``model`` config section.

    Returns:
        The file to load and to hash with :func:`model_hash`; ``None`` for a bare factory.
    """
    _, field_name, ref = _source(spec)
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


def model_hash(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, streamed in 1 MiB chunks (symlinks followed).

    Example:
        >>> len(model_hash(__file__))
        64
    """
    digest = hashlib.sha256()
    with Path(path).resolve().open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(
    spec: ModelConfig,
    normalize: NormalizeConfig | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load the model a ``model`` config section describes, ready for ``[0, 1]`` RGB input.

    Args:
        spec: where the model comes from (``torchscript``, ``export``, ``factory`` with
            ``kwargs`` and ``weights``, or ``hub``).
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
    if kind == "factory":
        model = build_factory(str(spec.factory), spec.kwargs)
        if path is not None:
            _load_state_dict(model, path, str(spec.factory))
    else:
        assert path is not None  # an archive source always names a file
        model = _load_torchscript(path, device) if kind == "torchscript" else _load_export(path)
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


def _load_export(path: Path) -> nn.Module:
    try:
        module = torch.export.load(str(path)).module()
    except RuntimeError as err:
        raise ModelLoadError(
            f"{path} is not a torch.export archive; a state_dict needs model.factory plus "
            "weights, a TorchScript archive goes in model.torchscript"
        ) from err
    for gm in module.modules():
        for node in gm.graph.nodes if isinstance(gm, torch.fx.GraphModule) else ():
            if _in_training_mode(node):
                raise ModelLoadError(
                    f"{path} was exported in training mode ({node.target} at node {node.name}), "
                    "so dropout/batch-norm would make maps random; call model.eval() before "
                    "torch.export.export"
                )
    # An exported module raises on train()/eval(), and Normalized.eval() recurses into it. The
    # graph fixed its mode at export time and was just checked to be an inference graph, so let
    # eval() pass and keep train() refused.
    for sub in module.modules():
        sub.training = False
    module.train = types.MethodType(_eval_only_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(nn.Module.eval, module)  # type: ignore[method-assign]
    return module


def _in_training_mode(node: torch.fx.Node) -> bool:
    """Whether an aten call has a ``train``/``training`` argument set to True (dropout, BN)."""
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name in ("train", "training"):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if value is True:
                return True
    return False


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise NotImplementedError("a torch.export graph cannot be switched to training mode")
    return self


def build_factory(factory: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Import ``module:callable`` and call it with ``kwargs``; the result must be a module.

    Raises:
        ImportError: the module or attribute does not exist.
        TypeError: the kwargs do not fit, or the result is not an ``nn.Module``.
    """
    module_name, _, attr = factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"model.factory {factory!r}: cannot import module {module_name!r} ({err}); install "
            "it on every worker or fix the 'module:callable' string"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"model.factory {factory!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    try:
        model = obj(**kwargs)
    except TypeError as err:
        raise TypeError(f"model.factory {factory!r} with kwargs {dict(kwargs)}: {err}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.factory {factory!r} returned {type(model).__name__}, not nn.Module")
    return model


def _load_state_dict(model: nn.Module, path: Path, factory: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # re-raised with the file and the fix; unpickling raises many types
        raise ModelLoadError(
            f"cannot read {path} with torch.load(weights_only=True) "
            f"({str(err).splitlines()[0]}); save model.state_dict(), not the model object"
        ) from err
    flat = isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not flat:
        top = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise ModelLoadError(
            f"{path} is not a flat state_dict of tensors (top level: {top}); save "
            "model.state_dict() itself, not a dict that wraps it"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # torch lists the missing/unexpected keys and shape mismatches
        raise ModelLoadError(
            f"{path} does not fit {factory}; check that model.factory and model.kwargs describe "
            f"the architecture it was saved from. {err}"
        ) from err
