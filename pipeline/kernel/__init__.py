"""The occlusion kernel: Captum-exact occlusion saliency in plain torch.

Owns: :func:`attribute` and :func:`expand_map` (``occlusion``), forward passes over plain and
occluded batches (``forward``) and their ``torch.compile`` option (``compiled``), how to compute
(``options``: :class:`ComputeOptions`), the one home of every occlusion default and option enum
(``defaults``), baselines (``baselines``), window geometry (``geometry``), targets and scores
(``targets``) and the per-image foreground metrics (``metrics``).

May import: torch, numpy and ``pipeline.incremental`` (only when an engine is resolved, inside
:func:`~pipeline.kernel.options.resolve_engine`). Never Ray, pandas, pyarrow or matplotlib: the
kernel runs in a notebook, a test or a worker alike.
"""

from pipeline.kernel.defaults import Baseline, Engine, Precision
from pipeline.kernel.occlusion import OcclusionResult, attribute, expand_map
from pipeline.kernel.options import ComputeOptions
from pipeline.kernel.targets import Score, Task

__all__ = [
    "Baseline",
    "ComputeOptions",
    "Engine",
    "OcclusionResult",
    "Precision",
    "Score",
    "Task",
    "attribute",
    "expand_map",
]
