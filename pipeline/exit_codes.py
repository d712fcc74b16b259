"""The exit codes of every ``occlusion-audit`` command, defined once (docs/design.md,
"Exit codes"). A scheduled job or a CI gate reads them, so each means one thing everywhere."""

from __future__ import annotations

__all__ = [
    "EXIT_DUPLICATE_JOB",
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
]

EXIT_OK = 0  # done; a run's failed images within cluster.max_failures
# a run finished with more failed images than cluster.max_failures; a compare gate verdict
# occurred; a submitted job ended FAILED or STOPPED
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad config or arguments, missing input, model that cannot load, refused folder
EXIT_DUPLICATE_JOB = 3  # submit: Ray already has a job with this submission id
EXIT_INCOMPLETE = 4  # infrastructure failed (disk, actors, the run lock); stored shards kept
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
