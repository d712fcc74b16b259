"""The audit configuration: YAML -> frozen dataclasses, validated in one place.

Field names equal the YAML keys. ``load_config`` checks every key: an unknown one is an error
naming the full dotted key, the allowed keys and the closest match. Local paths become absolute
(relative ones resolve against the config file's folder, or the current directory for a mapping
or a ``--set`` override) so that Ray workers with another working directory see the same files;
URIs (``s3://``, ``gs://``, ``hf://``, ``http(s)://``) are kept as written.

Example:
    >>> cfg = load_config("jobs/val.yaml", ["occlusion.stride=[8, 8]"])  # doctest: +SKIP
    >>> cfg.occlusion.stride  # doctest: +SKIP
    (8, 8)
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config.model import is_local_folder
from pipeline.config.sections import (
    AuditSettings,
    ClusterConfig,
    CounterfactualConfig,
    DatasetConfig,
    ModelConfig,
    NotifyConfig,
    OcclusionConfig,
    OutputConfig,
    TrendConfig,
)
from pipeline.config.typed import ConfigError, build, check_key, fail, to_plain
from pipeline.config.yaml_safe import load_yaml, load_yaml_text
from pipeline.kernel.geometry import WindowGrid
from pipeline.storage.paths import resolve_local

__all__ = ["AuditConfig", "config_to_dict", "load_config"]


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """The whole run: what to audit, with which model, how, where."""

    name: str = "audit"  # names the run, its default folders and job ids
    dataset: DatasetConfig
    model: ModelConfig
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    audit: AuditSettings = field(default_factory=AuditSettings)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    trend: TrendConfig = field(default_factory=TrendConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            fail("name", f"must be letters, digits, '.', '_' or '-', got {self.name!r}")
        out = self.output
        run_dir = resolve_local(out.dir or os.path.join("runs", self.name), None)
        report_dir = resolve_local(out.report_dir or os.path.join("reports", self.name), None)
        object.__setattr__(self, "output", replace(out, dir=run_dir, report_dir=report_dir))
        # A folder dataset (images, `datasets` Parquet, tars) is listed to find its files: a run's
        # own Parquet shards or a report's PNGs inside it would be read as data next time.
        data = self.dataset.manifest.rstrip("/")
        for key, folder in (("dir", run_dir), ("report_dir", report_dir)):
            if folder.rstrip("/") == data or folder.startswith(data + "/"):
                fail(
                    f"output.{key}",
                    f"{folder} lies inside the dataset {data}, whose files are listed to find "
                    "the images: its own files would be read as data; choose a folder outside it",
                )
        # the kernel's own rule for the window grid (a window inside the image, a stride that
        # skips no pixel), checked once here for the whole run instead of per image in a worker
        occ = self.occlusion
        try:
            WindowGrid.create((3, *self.dataset.image_size), occ.window, occ.stride)
        except ValueError as e:
            fail("occlusion.stride" if str(e).startswith("stride") else "occlusion.window", str(e))


# Keys holding local paths; relative ones resolve against the config file's folder.
_PATH_KEYS = (
    ("dataset", "manifest"),
    ("dataset", "root"),
    ("dataset", "static_mask"),
    ("dataset", "masks_dir"),
    ("dataset", "boxes"),
    ("model", "torchscript"),
    ("model", "export"),
    ("model", "onnx"),
    ("model", "weights"),
    ("model", "factory_dir"),
    ("output", "dir"),
    ("output", "report_dir"),
    ("trend", "runs_dir"),
)


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(key, f"override {override!r} must look like section.key=value")
    try:
        check_key(AuditConfig, key)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} (in --set {override!r})") from None
    *sections, leaf = key.split(".")
    node = data
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # a missing or null section becomes an empty one
        node = node[part]
    try:
        node[leaf] = load_yaml_text(text, where=f"--set {key}")
    except ConfigError as e:
        raise ConfigError(key, f"override value {text!r}: {e.message}") from None


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    base_dir: str | None = None,
) -> AuditConfig:
    """Read and validate an audit configuration.

    Args:
        source: a YAML file, or an already-parsed mapping (e.g. ``config_to_dict`` output).
        overrides: ``section.key=value`` strings (the CLI's ``--set``), values parsed as YAML,
            applied before validation.
        base_dir: folder for relative paths of a mapping; default: the YAML file's folder, or
            the current directory for a mapping. Relative override paths use the current
            directory, where they were typed.

    Returns:
        The frozen ``AuditConfig``; local paths are absolute.

    Raises:
        ConfigError: naming the dotted key and the offending value.

    Example:
        >>> cfg = load_config({"dataset": {"manifest": "m.csv"}, "model": {"torchscript": "m.pt"}})
        >>> cfg.occlusion.window, cfg.occlusion.n_baselines
        ((32, 32), 3)
    """
    if isinstance(source, Mapping):
        data: Any = copy.deepcopy(dict(source))
    else:
        path = os.fspath(source)
        data = load_yaml(path)
        if isinstance(data, dict):
            data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
        base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    if not isinstance(data, dict):
        raise ConfigError("", f"config must be a mapping of sections, got {type(data).__name__}")
    for section, key in _PATH_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and base_dir is not None:
            data[section][key] = resolve_local(value, base_dir)
    if isinstance(data.get("model"), dict) and base_dir is not None:
        _model_beside_config(data["model"], base_dir)
    for override in overrides or ():
        _apply_override(data, override)
    return build(AuditConfig, data)


def _model_beside_config(model: dict[str, Any], base_dir: str) -> None:
    """Code and folders of ``model`` found beside the config: a ``factory`` module there is
    imported from there (``factory_dir``), and a ``transformers`` folder there is that folder
    rather than a Hub repo id of the same spelling."""
    factory, ref = model.get("factory"), model.get("transformers")
    if isinstance(factory, str) and "factory_dir" not in model:
        stem = os.path.join(base_dir, *factory.partition(":")[0].split("."))
        if os.path.isfile(stem + ".py") or os.path.isfile(os.path.join(stem, "__init__.py")):
            model["factory_dir"] = base_dir
    beside = isinstance(ref, str) and os.path.isdir(os.path.join(base_dir, ref))
    if isinstance(ref, str) and (is_local_folder(ref) or beside):
        model["transformers"] = resolve_local(ref, base_dir)


def config_to_dict(cfg: AuditConfig) -> dict[str, Any]:
    """A JSON/YAML-serialisable dict that ``load_config`` turns back into an equal config.

    Example:
        >>> load_config(config_to_dict(cfg)) == cfg  # doctest: +SKIP
        True
    """
    return to_plain(cfg)
