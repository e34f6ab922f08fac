# Sourced by scripts/run.sh and scripts/test.sh: create or reuse .venv and install wm_jax into it.
# Needs only python3 (>= 3.11) on PATH. Set WM_JAX_PYTHON to choose another interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${WM_JAX_PYTHON:-python3}"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "wm_jax needs Python >= 3.11; '$PY' is $("$PY" --version 2>&1). Set WM_JAX_PYTHON." >&2
  exit 2
fi
# A venv without a working pip (e.g. made where python3-venv was missing) is rebuilt.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.wm_jax_installed$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT$EXTRAS"
  touch "$STAMP"
fi
