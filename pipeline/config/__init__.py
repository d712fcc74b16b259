"""The audit configuration: YAML in, frozen dataclasses out, validated in one place.

Owns: :class:`AuditConfig` and its sections (``sections``), the type-driven builder that checks
every key (``typed``), the bounded YAML reader (``yaml_safe``) and :func:`load_config` with
``--set`` overrides (``load``). The sections travel to the workers as they are; defaults that the
Python API shares come from :mod:`pipeline.kernel.defaults`.

May import: ``pipeline.kernel`` (option enums and defaults), ``pipeline.storage`` (path
resolution, Hub file references) and ``pipeline.schema``. Never Ray, torch models or pandas.
"""

from pipeline.config.load import AuditConfig, config_to_dict, load_config
from pipeline.config.sections import (
    AuditSettings,
    ClusterConfig,
    ColumnsConfig,
    CounterfactualConfig,
    DataFormat,
    DatasetConfig,
    Device,
    Engine,
    ModelConfig,
    NormalizeConfig,
    OcclusionConfig,
    OutputConfig,
    Precision,
    Target,
)
from pipeline.config.typed import ConfigError
from pipeline.kernel.defaults import Baseline
from pipeline.kernel.targets import Score, Task
from pipeline.storage.hub import HubFile

__all__ = [
    "AuditConfig",
    "AuditSettings",
    "Baseline",
    "ClusterConfig",
    "ColumnsConfig",
    "ConfigError",
    "CounterfactualConfig",
    "DataFormat",
    "DatasetConfig",
    "Device",
    "Engine",
    "HubFile",
    "ModelConfig",
    "NormalizeConfig",
    "OcclusionConfig",
    "OutputConfig",
    "Precision",
    "Score",
    "Target",
    "Task",
    "config_to_dict",
    "load_config",
]
