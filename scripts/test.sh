#!/usr/bin/env bash
# The whole test suite (set-up included). Pass pytest options through, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# Two workers by default (TEST_WORKERS=0: one process): many tests wait on Ray's start, a lease
# or a cluster's nodes, so a second worker fills that time. Each test module (or group of modules
# that share a fixture or a port, tests/conftest.py) runs whole on one worker.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
