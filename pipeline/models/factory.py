"""Models built in code: a ``module:callable`` factory, imported from the config's folder first.

A ``my_models.py`` beside the YAML file is a valid ``model.factory: my_models:Net`` without
``PYTHONPATH``: the loader records that folder as ``model.factory_dir``, which travels with the
config to every Ray worker, and the module is imported from there.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelLoadError", "build_factory", "load_state_dict"]


class ModelLoadError(RuntimeError):
    """A model file exists but cannot become the module it should be (format, keys, shapes)."""


def _import(module_name: str, factory_dir: str | None) -> Any:
    """Import ``module_name``, looking in ``factory_dir`` first when it holds the module."""
    if factory_dir is not None:
        stem = Path(factory_dir, *module_name.split("."))
        if stem.with_suffix(".py").is_file() or (stem / "__init__.py").is_file():
            # First on the path, and kept there: the module may import its neighbours later.
            if factory_dir in sys.path:
                sys.path.remove(factory_dir)
            sys.path.insert(0, factory_dir)
            importlib.invalidate_caches()
    return importlib.import_module(module_name)


def build_factory(
    factory: str, kwargs: Mapping[str, Any], factory_dir: str | os.PathLike[str] | None = None
) -> nn.Module:
    """Import ``module:callable`` and call it with ``kwargs``; the result must be a module.

    Args:
        factory: ``"module:callable"``; ``callable`` may be dotted (``Class.build``).
        kwargs: keyword arguments of the call.
        factory_dir: folder searched first for ``module`` (``model.factory_dir``).

    Raises:
        ImportError: the module or attribute does not exist.
        TypeError: the kwargs do not fit, or the result is not an ``nn.Module``.

    Example:
        >>> build_factory("pipeline.models:SeedCNNWithGAP", {"num_classes": 2}).fc.out_features
        2
    """
    module_name, _, attr = factory.partition(":")
    where = None if factory_dir is None else os.fspath(factory_dir)
    try:
        obj: Any = _import(module_name, where)
    except ImportError as err:
        beside = f" or into {where}" if where else ""
        raise ImportError(
            f"model.factory {factory!r}: cannot import module {module_name!r} ({err}); put "
            f"{module_name.replace('.', '/')}.py beside the config{beside}, install it on every "
            "worker, or fix the 'module:callable' string"
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


def load_state_dict(model: nn.Module, path: Path, what: str) -> None:
    """Load the flat ``state_dict`` file at ``path`` into ``model``, strictly.

    Args:
        what: names the architecture in errors (``model.timm 'resnet50'``).

    Raises:
        ModelLoadError: the file is not a flat dict of tensors, or keys or shapes differ.
    """
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
            f"{path} does not fit {what}; check that the model source and model.kwargs describe "
            f"the architecture it was saved from. {err}"
        ) from err
