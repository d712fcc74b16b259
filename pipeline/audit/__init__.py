"""The audit: from stored per-image metrics to per-group statistics and verdicts.

Owns: streaming the stored maps group by group and the summary table (``aggregate``), and the
pure statistics behind a verdict (``statistics``: geometric means, seeded bootstrap intervals).

May import: ``pipeline.run`` (the run folder), ``pipeline.config``, ``pipeline.storage`` and
``pipeline.schema``. Never Ray, torch or matplotlib.
"""

from pipeline.audit.aggregate import aggregate, read_summary

__all__ = ["aggregate", "read_summary"]
