"""A task's physics state as one float vector, and its frame drawn back from that vector.

A dataset stores each step's state, not its frame's stack: collection renders the frames once the
episodes are over, from the states of the steps that happened, so a random policy's scan never draws
the dead steps after an episode ended, and the scan's buffers hold a few floats per step instead of
4 KB of pixels (a 1,000-step scan of 1,000 episodes would hold 4 GB of frames). The stored vector
also keeps the whole physics for later use (grounding, analysis).

`codec(name)` gives the task's `StateCodec`: `flatten(physics) -> float32[size]` and
`frame(vector) -> uint8[64, 64]`, both pure and vmap-able. CartPole-v1 keeps the four numbers its
datasets have always held (x, x_dot, theta, theta_dot; drawn from x and theta), so its datasets and
run directories read as before. Every other task stores its gymnax EnvState flattened in field order
(`jax.flatten_util.ravel_pytree`: integers and booleans as float32, exact for the values these tasks
take, and cast back before drawing), so a user's registered task works without writing a codec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from wm_jax.envs.cartpole import PixelCartPole, render
from wm_jax.envs.registry import make, spec


@dataclasses.dataclass(frozen=True)
class StateCodec:
    """How one task's states are stored: `size` floats per step (`flatten`), drawn by `frame`."""

    size: int
    flatten: Callable[[Any], jax.Array]  # gymnax EnvState -> float32[size]
    frame: Callable[[jax.Array], jax.Array]  # float32[size] -> uint8[64, 64]


def _cartpole_flatten(physics: Any) -> jax.Array:
    return jnp.stack([physics.x, physics.x_dot, physics.theta, physics.theta_dot]).astype(jnp.float32)


def _cartpole_frame(vector: jax.Array) -> jax.Array:
    return render(vector[0], vector[2])


CARTPOLE = StateCodec(size=4, flatten=_cartpole_flatten, frame=_cartpole_frame)
_CODECS: dict[tuple[str, int], StateCodec] = {}


def _generic(env: Any) -> StateCodec:
    """The codec of a PixelEnv: its gymnax state ravelled in field order."""
    params = env.default_params
    example = env.env.reset_env(jax.random.key(0), params)[1]
    vector, unravel = ravel_pytree(example)

    def flatten(physics: Any) -> jax.Array:
        return ravel_pytree(physics)[0].astype(jnp.float32)

    def frame(v: jax.Array) -> jax.Array:
        return env.frame(unravel(jnp.asarray(v, vector.dtype)), params)

    return StateCodec(size=int(vector.size), flatten=flatten, frame=frame)


def codec(name: str) -> StateCodec:
    """The StateCodec of registered task `name` (built once per registration and process)."""
    entry = spec(name)
    key = (name, id(entry))  # a task registered again (overwrite=True) gets a codec of its own
    if key not in _CODECS:
        env = make(name)
        _CODECS[key] = CARTPOLE if isinstance(env, PixelCartPole) else _generic(env)
    return _CODECS[key]
