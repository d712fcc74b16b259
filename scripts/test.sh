#!/usr/bin/env bash
# The whole test suite (set-up included). Pass pytest options through, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
