"""Suite-wide hygiene: the compiled programs of one test file are released before the next.

Every XLA:CPU executable keeps its code in memory mappings of its own (measured: tests/test_pipeline.py
alone leaves about 25,000), and the whole suite in one process compiles enough programs to pass
the kernel's limit (vm.max_map_count, 65,530 by default), where the next compile crashes the
process with a segmentation fault. The library itself compiles each program once per static
config (traced hyperparameters never compile again), so this is the suite's concern only: many
small configs, each compiled for a few calls.
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
