"""Suite-wide fixtures: a finished smoke run shared by the files that need one, and hygiene: the
compiled programs of one test file are released before the next; `load_experiment` (imported by
the test files) gives a script of experiments/ as a module.

Every XLA:CPU executable keeps its code in memory mappings of its own (measured: tests/test_pipeline.py
alone leaves about 25,000), and the whole suite in one process compiles enough programs to pass
the kernel's limit (vm.max_map_count, 65,530 by default), where the next compile crashes the
process with a segmentation fault. The library itself compiles each program once per static
config (traced hyperparameters never compile again), so this is the suite's concern only: many
small configs, each compiled for a few calls.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# One persistent compilation cache for the session, in a temporary folder removed at exit: the
# programs that this process, the wm-jax commands (cli.compilation_cache) and the scripts the tests
# start in subprocesses compile again and again (the smoke pipeline's in every real-command test,
# each test file's after the module hygiene below) compile once. The user's own cache is left alone.
# With pytest-xdist the controller makes the folder and its workers, which inherit its environment,
# share it; the process that made it removes it. Outside a worker, a folder is always made anew.
_CACHE = os.environ.get("WM_JAX_TESTS_CACHE") if os.environ.get("PYTEST_XDIST_WORKER") else None
if _CACHE is None:
    _CACHE = tempfile.mkdtemp(prefix="wm_jax_tests_jax_cache_")
    os.environ["WM_JAX_TESTS_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)
os.environ["WM_JAX_COMPILATION_CACHE"] = _CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
# The suite's programs are many, small and run briefly, so compiling them is most of its time: the
# tests compile with LLVM's optimizations off (the same XLA programs, after the same XLA passes;
# only the machine code is less tuned). Measured on the sharding test's script: 53 s -> 30 s, with
# results equal up to float rounding (scores within 3e-8). Every wm-jax command, benchmark and
# experiment outside the suite compiles at XLA's default level; subprocesses started by tests
# inherit this setting.
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0")))

import jax
import pytest

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Tests that need a trained run directory (the session's smoke run, about a minute to make) are
# slow whatever their own time: `pytest -m "not slow"` leaves them out and so never builds it.
NEEDS_A_TRAINED_RUN = ("smoke_run",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.fixturenames for name in NEEDS_A_TRAINED_RUN):
            item.add_marker(pytest.mark.slow)


def load_experiment(name: str, monkeypatch):
    """experiments/NAME.py as a module, with experiments/ on sys.path as when the script runs."""
    import importlib.util

    folder = Path(__file__).parents[1] / "experiments"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    """One finished `pipeline.run` at the smoke preset (about a minute), shared by the files that
    read it (test_pipeline, test_portable) or damage copies of it (test_reliability). It runs with
    the TensorBoard writer on (`--log tensorboard`), as test_portable reads. Never modify it in place."""
    from wm_jax import logs, pipeline
    from wm_jax.presets import get_preset

    out = tmp_path_factory.mktemp("pipeline") / "smoke"
    logs.use("tensorboard")
    try:
        summary = pipeline.run(get_preset("smoke"), out, progress=False)
    finally:
        logs.use()
    return out, summary


@pytest.fixture(scope="session")
def run_with_k(smoke_run, tmp_path_factory) -> Path:
    """A copy of the smoke run (trained without K) with K added by `wm-jax train-verifier`: the
    served agent of tests/test_serve*.py, its gate on. Never modify it in place."""
    from wm_jax import cli

    out = tmp_path_factory.mktemp("serve") / "smoke"
    shutil.copytree(smoke_run[0], out)
    assert cli.main(["train-verifier", str(out), "--steps", "60", "--quiet"]) == 0
    return out
