#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the whole pipeline at the default (cpu) preset.
# Extra arguments go to `wm-jax run` (e.g. --seed 1, --out runs/other, --preset smoke).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" ""
cd "$ROOT"
has_out=0
for a in "$@"; do [ "$a" = "--out" ] && has_out=1; done
if [ "$has_out" = 1 ]; then
  exec "$VENV/bin/wm-jax" run "$@"
else
  exec "$VENV/bin/wm-jax" run --preset cpu --out runs/cpu "$@"
fi
