#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the whole pipeline at the default (frugal) preset.
# Extra arguments go to `wm-jax run` (e.g. --seed 1, --out runs/other, --preset smoke).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" ""
cd "$ROOT"
# --preset frugal first: a --preset among the arguments comes later and wins.
exec "$VENV/bin/wm-jax" run --preset frugal "$@"
