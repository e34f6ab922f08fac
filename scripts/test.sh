#!/usr/bin/env bash
# The test suite: set up .venv with the test extra if needed, then run pytest.
# pytest's exit code 5 ("no tests collected") is not a failure (e.g. with a -k that selects none).
set -uo pipefail
# The server's session-store tests run against Debian's redis-server: installed here where missing
# (as root, with apt), so a fresh machine and CI run them rather than skip them.
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (the session-store tests need it)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || echo "could not install redis-server: its tests will be skipped" >&2
fi
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" "[test]"
set +e
cd "$ROOT"
# Two pytest-xdist workers share the cores (WM_JAX_TEST_WORKERS=0: one process; a -n of your own wins):
# the whole suite took 12.3 minutes on 2 cores against about 17 in one process (docs/PERFORMANCE.md).
WORKERS=()
if [ "${WM_JAX_TEST_WORKERS:-2}" != 0 ]; then WORKERS=(-n "${WM_JAX_TEST_WORKERS:-2}"); fi
# --durations: the slowest tests are named at the end of every run (where the suite's time goes)
"$VENV/bin/python" -m pytest "${WORKERS[@]}" --durations=15 "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "no tests ran (pytest exit 5): not a failure"
  exit 0
fi
exit "$rc"
