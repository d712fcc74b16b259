"""The incremental engines: occluded scores of convolutional models without full passes; and
what a model becomes for the kernel (engine choice, token models).

Owns: tracing a model into steps (``graph``; with the input's shape known where a model checks
it: ``tracer``; ``torch.export`` graphs of aten ops lowered to the torch ops the rules know:
``aten``), which nodes are local (``steps``, ``rules``; per-position ops over the channels
and channels-last sections: ``channels``), refusals naming the op and its module (``explain``),
the receptive-field plan of which region each window changes (``plan``), the region ops
(``ops``), the head updates (``head``), executing a batch of occluded copies (``execute``), the
exact engine (``engine``) and the approximate one, with projective fields capped at a threshold
(``approximate``); the token models of the ViT families for ``occlusion.mode: token-drop``
(``tokens``); engine choice, token models and the public ``attribute`` (``select``).

May import: ``pipeline.kernel`` (window geometry, options) and torch; timm, torchvision and
transformers classes are recognised by name, never imported. Never Ray, pandas or matplotlib.
"""

from pipeline.incremental.approximate import ApproximateEngine, Cost
from pipeline.incremental.engine import IncrementalEngine, auto_engine

__all__ = ["ApproximateEngine", "Cost", "IncrementalEngine", "auto_engine"]
