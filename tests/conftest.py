"""Suite-wide fixtures: a finished smoke run shared by the files that need one, and hygiene: the
compiled programs of one test file are released before the next.

Every XLA:CPU executable keeps its code in memory mappings of its own (measured: tests/test_pipeline.py
alone leaves about 25,000), and the whole suite in one process compiles enough programs to pass
the kernel's limit (vm.max_map_count, 65,530 by default), where the next compile crashes the
process with a segmentation fault. The library itself compiles each program once per static
config (traced hyperparameters never compile again), so this is the suite's concern only: many
small configs, each compiled for a few calls. The suite keeps the wm-jax commands' persistent
compilation cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

# The wm-jax commands turn on JAX's persistent compilation cache (cli.compilation_cache); tests that
# run them, in this process or in subprocesses, leave the user's cache alone.
os.environ["WM_JAX_COMPILATION_CACHE"] = "off"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    """One finished `pipeline.run` at the smoke preset (about a minute), shared by the files that
    read it (test_pipeline) or damage copies of it (test_reliability). Never modify it in place."""
    from wm_jax import pipeline
    from wm_jax.config import get_preset

    out = tmp_path_factory.mktemp("pipeline") / "smoke"
    summary = pipeline.run(get_preset("smoke"), out, progress=False)
    return out, summary
