"""The incremental engines: occluded scores of convolutional models without full passes.

Owns: tracing a model into steps (``graph``, ``rules``), the receptive-field plan of which region
each window changes (``plan``), the region ops (``ops``), the head updates (``head``), executing a
batch of occluded copies (``execute``), the exact engine (``engine``) and the approximate one,
with projective fields capped at a threshold (``approximate``).

May import: ``pipeline.kernel`` (window geometry, options) and torch. Never Ray, pandas or
matplotlib.
"""

from pipeline.incremental.approximate import ApproximateEngine, Cost
from pipeline.incremental.engine import IncrementalEngine, auto_engine

__all__ = ["ApproximateEngine", "Cost", "IncrementalEngine", "auto_engine"]
