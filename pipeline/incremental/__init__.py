"""The exact incremental engine: occluded scores of convolutional models without full passes.

Owns: tracing a model into steps (``graph``, ``rules``), the receptive-field plan of which region
each window changes (``plan``), the region ops (``ops``), the head updates (``head``), executing a
batch of occluded copies (``execute``) and the engine itself (``engine``).

May import: ``pipeline.kernel`` (window geometry) and torch. Never Ray, pandas or matplotlib.
"""

from pipeline.incremental.engine import IncrementalEngine, auto_engine

__all__ = ["IncrementalEngine", "auto_engine"]
