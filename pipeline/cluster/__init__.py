"""Cluster jobs: submitting a run to a Ray cluster as a job with a deterministic id.

Owns: the ``submit`` command (``cli``) and the job submission itself (``submit``).

May import: ``pipeline.config`` and ``pipeline.storage``. Ray's job client is imported where it
is used.
"""
