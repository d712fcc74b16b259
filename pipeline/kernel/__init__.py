"""The occlusion kernel: Captum-exact occlusion saliency in plain torch.

Owns: :func:`occlude` and :func:`expand_map` (``occlusion``), forward passes over plain and
occluded batches (``forward``), their sizes (``passes``) and their ``torch.compile`` option
(``compiled``), how to compute (``options``: :class:`ComputeOptions`), the one home of every
occlusion default and option enum (``defaults``), baselines (``baselines``), window geometry
(``geometry``), token-drop occlusion through a :class:`~pipeline.kernel.tokens.TokenModel`
(``tokens``), targets and scores (``targets``) and the per-image foreground metrics
(``metrics``).

May import: torch and numpy, nothing else of ``pipeline``. It computes with generic full passes
or an engine object it is given, and drops tokens through the token model it is given; choosing
an engine or building a token model for a model is :mod:`pipeline.incremental.select`'s (which
:func:`pipeline.attribute` uses). Never Ray, pandas, pyarrow or matplotlib: the kernel runs in a
notebook, a test or a worker alike.
"""

from pipeline.kernel.defaults import Baseline, Engine, Mode, Precision
from pipeline.kernel.occlusion import OcclusionResult, expand_map, occlude
from pipeline.kernel.options import ComputeOptions
from pipeline.kernel.targets import Score, Task

__all__ = [
    "Baseline",
    "ComputeOptions",
    "Engine",
    "Mode",
    "OcclusionResult",
    "Precision",
    "Score",
    "Task",
    "expand_map",
    "occlude",
]
