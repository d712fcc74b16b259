#!/usr/bin/env bash
# The demo audit on an embedded local Ray (set-up included). Extra options go to
# `occlusion-audit demo`, e.g. --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/occlusion-audit ] || bash scripts/setup.sh
exec .venv/bin/occlusion-audit demo "$@"
