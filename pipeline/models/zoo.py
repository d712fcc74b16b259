"""Architectures of the libraries auditors bring: timm, torchvision and Hugging Face
``transformers``, and ONNX files through onnxruntime.

Each library is an optional extra (``pip install 'occlusion-audit[timm]'``), imported only when
its source is used; a missing one is an ``ImportError`` naming the extra. Nothing here downloads
architecture code: ``timm`` and ``torchvision`` build random weights (trained weights come as
``model.weights``), and ``transformers`` reads a local folder or the Hub cache (offline with
``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from pipeline.config.model import is_local_folder
from pipeline.models.factory import ModelLoadError
from pipeline.storage.hub import fetch_snapshot, hub_offline

__all__ = [
    "TRANSFORMERS_FILES",
    "build_timm",
    "build_torchvision",
    "build_transformers",
    "random_transformers",
    "require",
    "transformers_folder",
]

# The files of a transformers checkpoint that from_pretrained reads (and the run hashes).
TRANSFORMERS_FILES = ["*.json", "*.safetensors", "*.bin"]
_EXTRA = {"timm": "timm", "torchvision": "torchvision", "transformers": "transformers"}
_EXTRA["onnxruntime"] = "onnx"


def require(module: str, key: str) -> ModuleType:
    """Import ``module`` for the ``model.<key>`` source, or say which extra installs it.

    Raises:
        ImportError: ``module`` is not installed (or fails to import), naming the extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"model.{key} needs the {module} package ({err}); install it on the driver and "
            f"every worker: pip install 'occlusion-audit[{_EXTRA[module]}]'"
        ) from err


def build_timm(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``: random weights, no download.

    Example:
        >>> build_timm("resnet18", {"num_classes": 3}).fc.out_features  # doctest: +SKIP
        3
    """
    timm = require("timm", "timm")
    try:
        return timm.create_model(name, **{"pretrained": False, **kwargs})
    except RuntimeError as err:  # timm: "Unknown model (name)"
        raise ModelLoadError(
            f"model.timm {name!r}: {err}; timm.list_models('{name[:4]}*') lists the names"
        ) from err
    except TypeError as err:
        raise TypeError(f"model.timm {name!r} with kwargs {dict(kwargs)}: {err}") from err


def build_torchvision(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``: random weights."""
    models = require("torchvision", "torchvision").models
    try:
        return models.get_model(name, **{"weights": None, **kwargs})
    except ValueError as err:  # torchvision: "Unknown model name"
        raise ModelLoadError(
            f"model.torchvision {name!r}: {err}; torchvision.models.list_models() lists them"
        ) from err
    except TypeError as err:
        raise TypeError(f"model.torchvision {name!r} with kwargs {dict(kwargs)}: {err}") from err


def transformers_folder(ref: str, revision: str | None) -> Path:
    """The local folder of a ``model.transformers`` source: the folder itself, or the Hub
    repository's snapshot in the Hub cache (downloaded first unless ``HF_HUB_OFFLINE``).

    Raises:
        FileNotFoundError: the folder holds no ``config.json``, or the repo is not found.
    """
    if is_local_folder(ref):
        folder = Path(ref)
    else:
        try:
            folder = fetch_snapshot(ref, revision, TRANSFORMERS_FILES)
        except FileNotFoundError as err:  # a mistyped folder reads as a repo id
            raise FileNotFoundError(
                f"model.transformers {ref!r} is neither a folder beside the config nor a Hub "
                f"repo found: {err}"
            ) from err
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.transformers {ref!r}: {folder} holds no config.json; give the folder that "
            "model.save_pretrained(folder) wrote"
        )
    return folder


def build_transformers(folder: Path, kwargs: Mapping[str, Any]) -> nn.Module:
    """``AutoModelForImageClassification.from_pretrained(folder, **kwargs)``, from local files
    only (the folder is already resolved by :func:`transformers_folder`)."""
    tf = require("transformers", "transformers")
    bars = tf.utils.logging.is_progress_bar_enabled()
    # a "Loading weights" bar per worker and per pre-run check says nothing a run needs
    tf.utils.logging.disable_progress_bar()
    try:
        return tf.AutoModelForImageClassification.from_pretrained(
            str(folder), **{"local_files_only": True, **kwargs}
        )
    except (OSError, ValueError, KeyError) as err:  # unknown architecture, missing weights
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"model.transformers {folder}: {first}") from err
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()


def random_transformers(ref: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The architecture of the ``config.json`` in ``ref`` (a folder or a cached repo id) with
    random weights (``from_config``); ``kwargs`` update the config."""
    tf = require("transformers", "transformers")
    offline = hub_offline() or is_local_folder(ref)
    config = tf.AutoConfig.from_pretrained(ref, local_files_only=offline, **kwargs)
    return tf.AutoModelForImageClassification.from_config(config)
