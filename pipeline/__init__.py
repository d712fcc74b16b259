"""occlusion-audit: dataset-scale occlusion-saliency audits of vision models.

The package follows the data flow of a run (docs/design.md, "Layout")::

    storage -> config -> data -> kernel (+ incremental) -> models -> run -> audit -> report
                                                                      \\-> cluster, bench, demo

The pure-torch kernel (:func:`attribute`, :func:`expand_map`) is imported eagerly; the Ray,
Parquet and report layers load on first use so that ``import pipeline`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipeline.incremental.select import attribute
from pipeline.kernel import (
    Baseline,
    ComputeOptions,
    Engine,
    Mode,
    OcclusionResult,
    Precision,
    Score,
    Task,
    expand_map,
)

try:
    __version__ = version("occlusion-audit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# public name -> module that defines it, imported on first access
_LAZY = {
    "load_config": "pipeline.config",
    "AuditConfig": "pipeline.config",
    "run_audit": "pipeline.run.runner",
    "RunResult": "pipeline.run.runner",
    "read_maps": "pipeline.run.folder",
    "RunFolder": "pipeline.run.folder",
    "aggregate": "pipeline.audit",
    "write_report": "pipeline.report",
    "load_model": "pipeline.models",
    "IncrementalEngine": "pipeline.incremental",
    "auto_engine": "pipeline.incremental",
}

__all__ = [
    "Baseline",
    "ComputeOptions",
    "Engine",
    "Mode",
    "OcclusionResult",
    "Precision",
    "Score",
    "Task",
    "__version__",
    "attribute",
    "expand_map",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
