#!/usr/bin/env bash
# The whole test suite (set-up included). Pass pytest options through, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# One process by default. TEST_WORKERS=2 runs two pytest-xdist workers, each test module (or
# group of modules that share a fixture or a port, tests/conftest.py) whole on one of them: on a
# machine with cores to spare. On 2 cores it saved only 15% (40 -> 34 min) and a Ray head then
# timed out starting under the doubled load.
workers=${TEST_WORKERS:-0}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup "$@"
