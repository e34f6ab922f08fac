"""Mixed precision: compute in cfg.compute_dtype, keep parameters, optimizer state and losses float32.

Models cast their (float32) parameters and inputs with `cast` at entry, so gradients flow back
through the cast into float32 parameters, and cast their outputs back to float32. Only floating
leaves that differ from the target change, so with "float32" every cast is the identity and the
program is exactly the one without this module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast(tree: Any, dtype: str) -> Any:
    """Every floating array leaf of `tree` as `dtype` ("float32" or "bfloat16"); others untouched."""
    target = DTYPES[dtype]

    def one(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != target:
            return x.astype(target)
        return x

    return jax.tree.map(one, tree)
