"""The run: a manifest's shards through a pool of Ray actors into an exactly-once run folder.

Owns: the driver (``runner``), the Ray actor pool (``pool``), the shard queue that survives
actor deaths (``dispatch``), the stateful worker (``worker``), one shard's computation
(``shard``), the run folder with its layout, lock, shard files and ``run.json`` record
(``folder``, ``record``), the kernel settings a worker computes with (``settings``), heap tuning
for CPU workers (``heap``) and the progress bar (``progress``).

May import: ``pipeline.config``, ``pipeline.data``, ``pipeline.kernel``, ``pipeline.incremental``,
``pipeline.models``, ``pipeline.storage``, ``pipeline.schema``, ``pipeline.terminal`` (the text
``inspect`` prints). Ray is imported only by the
modules that talk to it (``runner``, ``pool``, ``dispatch``, and ``worker`` for its placement)
and only inside functions.
"""
