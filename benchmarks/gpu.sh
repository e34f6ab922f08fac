#!/usr/bin/env bash
# One NVIDIA GPU, ten minutes: the dream-throughput table, then the `paper` preset end to end with
# its stage times and final return.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]          # default runs/gpu: paper/, dream_throughput.json
#
# The Python (WM_JAX_PYTHON, default python3) must already have jax with CUDA, flax, optax, chex
# and orbax-checkpoint. What it lacks of benchmarks/gpu_requirements.txt (gymnax, evosax, datasets,
# six, tqdm, matplotlib and their dependencies) is installed offline from the wheel folder
# WM_JAX_WHEELS (default ./wheels), which a machine with network access builds with
#
#   python -m pip download --dest wheels --no-deps --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       --implementation cp --python-version 3.11 -r benchmarks/gpu_requirements.txt
#
# where --python-version is the GPU machine's Python (python3 -c 'import sys; print(sys.version[:4])').
# wm_jax itself runs from this checkout (PYTHONPATH), not installed.
#
# The whole script stops after WM_JAX_GPU_BUDGET seconds (default 600). A paper run cut short keeps
# its finished stages: its stage times are still printed, and rerunning the script resumes it.
# WM_JAX_GPU_QUICK=1 is a dry run that fits a CPU: the quick throughput table and the smoke preset.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${WM_JAX_PYTHON:-python3}"
WHEELS="${WM_JAX_WHEELS:-$ROOT/wheels}"
RESULTS="${1:-runs/gpu}"
BUDGET="${WM_JAX_GPU_BUDGET:-600}"
if [ "${WM_JAX_GPU_QUICK:-0}" = 1 ]; then
  PRESET=smoke; THROUGHPUT_ARGS=(--quick); THROUGHPUT_LIMIT=120
else
  PRESET=paper; THROUGHPUT_ARGS=(); THROUGHPUT_LIMIT=180
fi
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

left() { local s=$((BUDGET - SECONDS)); echo $((s > 1 ? s : 1)); }  # timeout 0 would mean no limit

missing=$("$PY" - <<'PYEOF'
import importlib.util
modules = {"gymnax": "gymnax", "evosax": "evosax", "datasets": "datasets", "six": "six", "tqdm": "tqdm",
           "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "== installing from $WHEELS: $missing"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $missing
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== dream throughput"
timeout "$(( $(left) < THROUGHPUT_LIMIT ? $(left) : THROUGHPUT_LIMIT ))" \
  "$PY" "$ROOT/benchmarks/dream_throughput.py" "${THROUGHPUT_ARGS[@]}" --json "$RESULTS/dream_throughput.json" \
  || echo "dream throughput stopped (exit $?)"

echo "== wm-jax run --preset $PRESET ($(left) s left)"
status=0
timeout "$(left)" "$PY" -m wm_jax.cli run --preset "$PRESET" --out "$RESULTS/$PRESET" || status=$?
[ "$status" = 124 ] && echo "the $PRESET run hit the time limit: stages finished so far below; rerun to resume"

echo "== stage times"
"$PY" "$ROOT/benchmarks/pipeline_time.py" "$RESULTS/$PRESET" --json "$RESULTS/pipeline_time.json" || true
exit "$status"
