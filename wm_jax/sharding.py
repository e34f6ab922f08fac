"""Spread batches of independent work (CMA-ES candidates, real episodes) over every device.

One mesh axis over `jax.devices()`: all local devices, and every process's devices after
`jax.distributed.initialize()` (`wm-jax run --coordinator` calls it; a library user does so first
thing in each process, before importing wm_jax.presets or wm_jax.envs, whose gymnax starts JAX's
backend, then runs the same program everywhere; run_dir.for_process says where each writes). Candidates and
episodes are independent, so splitting their leading axis changes where they run, not what they
compute. With one device every function here returns its input unchanged, so single-device
programs are exactly the ones without sharding.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"


def mesh() -> Mesh:
    """A one-axis mesh over every device (every host's, after jax.distributed.initialize)."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def _spec(x: Any) -> PartitionSpec:
    n = jax.device_count()
    if getattr(x, "ndim", 0) >= 1 and x.shape[0] % n == 0:
        return PartitionSpec(AXIS)
    return PartitionSpec()


def shard_leading(tree: Any) -> Any:
    """Inside jit: split each array's leading axis over the devices where it divides evenly,
    replicate it otherwise."""
    if jax.device_count() == 1:
        return tree
    m = mesh()
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(m, _spec(x))), tree)


def replicated(tree: Any) -> Any:
    """Inside jit: a full copy of each array on every device (so every host can read results)."""
    if jax.device_count() == 1:
        return tree
    s = NamedSharding(mesh(), PartitionSpec())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, s), tree)


def commit(tree: Any) -> Any:
    """Outside jit: each array committed to the devices (one device: that device; several: a copy
    on each, as put_replicated). A jitted program compiles once per placement of its arguments, and
    its outputs are committed when an argument it reads is (parameters restored from a checkpoint,
    say): a loop that feeds a program's outputs back in commits its first inputs, or the second
    call compiles the program again."""
    if jax.device_count() == 1:
        return jax.device_put(tree, jax.devices()[0])
    return put_replicated(tree)


def put_replicated(tree: Any) -> Any:
    """Outside jit: place a copy of each array on every device of the mesh.

    A jitted program that shards over the mesh refuses arguments committed to a single device
    (parameters restored from a checkpoint, say); callers put their inputs here first.
    """
    if jax.device_count() == 1:
        return tree
    s = NamedSharding(mesh(), PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, s)
    return jax.tree.map(lambda x: _global(x, s), tree)


def _global(x: Any, s: NamedSharding) -> Any:
    """x (the same value in every process) as one array over every host's devices: from host memory,
    as an array on this host's devices cannot be put on another's."""
    if isinstance(x, jax.Array) and x.sharding == s:
        return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_global(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), s)
