"""CartPole-v1 from pixels, entirely in JAX.

`render(x, theta)` draws one 64x64 grayscale frame from the two positional state variables with
anti-aliased signed-distance shapes (no host round trip, so it jits and vmaps).
`PixelCartPole` wraps gymnax's CartPole-v1 physics (the gymnax 1.x six-value step API) and returns
the last four frames stacked, newest last.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments.classic_control import cartpole as _gx_cartpole

from wm_jax.envs.draw import FRAME_SIZE, STACK, check_finite, coverage

NUM_ACTIONS = 2  # CartPole: push left, push right

# Geometry in pixels. Rows grow downwards. The horizontal scale keeps the whole cart in frame for
# every x the episode can reach: |x| <= 2.4 maps to |column - 31.5| <= 2.4 * 11 = 26.4, and the
# cart's half width is 4 px, so the cart spans columns [1.1, 61.9].
_PX_PER_UNIT = 11.0
_CENTER_COL = (FRAME_SIZE - 1) / 2.0
_TRACK_ROW = 52.0
_CART_HALF_W = 4.0
_CART_HALF_H = 2.5
_CART_ROW = _TRACK_ROW - _CART_HALF_H - 0.5
# The pole is drawn longer than to scale (gym draws 1 world unit): at the 12 degree termination
# threshold its tip moves 28 * sin(12 deg) = 5.8 px, enough for the angle to survive a 64 px frame.
_POLE_LEN = 28.0
_POLE_HALF_W = 1.0
_TRACK_LEVEL, _POLE_LEVEL, _CART_LEVEL = 90.0, 170.0, 255.0


def _render(x: jax.Array, theta: jax.Array) -> jax.Array:
    rows, cols = jnp.meshgrid(
        jnp.arange(FRAME_SIZE, dtype=jnp.float32),
        jnp.arange(FRAME_SIZE, dtype=jnp.float32),
        indexing="ij",
    )
    x = jnp.asarray(x, jnp.float32)
    theta = jnp.asarray(theta, jnp.float32)
    cart_col = _CENTER_COL + x * _PX_PER_UNIT

    track = coverage(jnp.abs(rows - _TRACK_ROW) - 0.5)

    # Box signed distance (Inigo Quilez): outside length plus inside max.
    dx = jnp.abs(cols - cart_col) - _CART_HALF_W
    dy = jnp.abs(rows - _CART_ROW) - _CART_HALF_H
    box = jnp.hypot(jnp.maximum(dx, 0.0), jnp.maximum(dy, 0.0)) + jnp.minimum(jnp.maximum(dx, dy), 0.0)
    cart = coverage(box)

    # Pole: a capsule from the pivot on top of the cart; positive theta leans right, as in gym.
    pivot_row = _CART_ROW - _CART_HALF_H
    dir_col, dir_row = jnp.sin(theta), -jnp.cos(theta)
    rel_col, rel_row = cols - cart_col, rows - pivot_row
    along = jnp.clip(rel_col * dir_col + rel_row * dir_row, 0.0, _POLE_LEN)
    dist = jnp.hypot(rel_col - along * dir_col, rel_row - along * dir_row) - _POLE_HALF_W
    pole = coverage(dist)

    image = jnp.maximum(jnp.maximum(track * _TRACK_LEVEL, pole * _POLE_LEVEL), cart * _CART_LEVEL)
    # A state that is not finite has no picture: it is drawn white, never as a plausible frame.
    image = jnp.where(jnp.isfinite(x) & jnp.isfinite(theta), image, 255.0)
    return jnp.round(image).astype(jnp.uint8)


_render_jit = jax.jit(_render)


def render(x: jax.Array, theta: jax.Array) -> jax.Array:
    """Draw CartPole at cart position `x` (world units) and pole angle `theta` (radians).

    Returns uint8[64, 64]: black background, track, cart and pole at distinct gray levels.
    Pure, jit- and vmap-able (`jax.vmap(render)(xs, thetas)` gives uint8[N, 64, 64]). A NaN or
    infinite state is a ValueError when the values are concrete; under jit, where nothing can be
    raised, it is drawn as an all-white frame.
    """
    check_finite("render", x=x, theta=theta)
    return _render_jit(x, theta)


@struct.dataclass
class PixelState:
    """Physics state (gymnax EnvState) and the last four frames, newest last."""

    physics: _gx_cartpole.EnvState
    frames: jax.Array  # uint8[64, 64, 4]


EnvParams = _gx_cartpole.EnvParams


def _initial_stack(physics: _gx_cartpole.EnvState) -> jax.Array:
    frame = _render(physics.x, physics.theta)
    return jnp.repeat(frame[..., None], STACK, axis=-1)


def push_frame(frames: jax.Array, physics: _gx_cartpole.EnvState) -> jax.Array:
    """The 4-frame stack with the rendering of `physics` appended as the newest frame."""
    frame = _render(physics.x, physics.theta)
    return jnp.concatenate([frames[..., 1:], frame[..., None]], axis=-1)


class PixelCartPole:
    """gymnax CartPole-v1 observed through `render`, with a 4-frame stack.

    `reset(key, params) -> (obs, state)` and
    `step(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)`,
    obs uint8[64, 64, 4], newest frame last; the first observation repeats the first frame.

    Auto-reset follows gymnax: when a step ends the episode (terminated or truncated), the returned
    obs and state already belong to a fresh episode (four copies of its first frame), and the stack
    that would have shown the final state is returned in `info["final_observation"]`. Rewards follow
    gymnax/gym: 1.0 for every step taken, the terminating one included.
    """

    def __init__(self) -> None:
        self._env = _gx_cartpole.CartPole()

    @property
    def default_params(self) -> EnvParams:
        return self._env.default_params

    @property
    def num_actions(self) -> int:
        return self._env.num_actions

    def step_physics(
        self, key: jax.Array, physics: _gx_cartpole.EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[_gx_cartpole.EnvState, jax.Array, jax.Array]:
        """gymnax's physics step without auto-reset or rendering: (physics', reward, terminated)."""
        _, stepped, reward, terminated, _ = self._env.step_env(key, physics, action, params)
        return stepped, reward, terminated

    def push_frame(self, frames: jax.Array, physics: _gx_cartpole.EnvState, params: EnvParams | None = None
                   ) -> jax.Array:
        """The 4-frame stack with the rendering of `physics` appended (PixelEnv's signature)."""
        return push_frame(frames, physics)

    @partial(jax.jit, static_argnums=0)
    def reset(self, key: jax.Array, params: EnvParams | None = None) -> tuple[jax.Array, PixelState]:
        params = self.default_params if params is None else params
        _, physics = self._env.reset_env(key, params)
        frames = _initial_stack(physics)
        return frames, PixelState(physics=physics, frames=frames)

    @partial(jax.jit, static_argnums=0)
    def step(
        self,
        key: jax.Array,
        state: PixelState,
        action: jax.Array,
        params: EnvParams | None = None,
    ) -> tuple[jax.Array, PixelState, jax.Array, jax.Array, jax.Array, dict[str, Any]]:
        params = self.default_params if params is None else params
        key_step, key_reset = jax.random.split(key)
        stepped, reward, terminated = self.step_physics(key_step, state.physics, action, params)
        truncated = self._env.is_truncated(stepped, params)
        done = jnp.logical_or(terminated, truncated)
        final_frames = push_frame(state.frames, stepped)

        _, fresh = self._env.reset_env(key_reset, params)
        physics = jax.tree.map(lambda a, b: jax.lax.select(done, a, b), fresh, stepped)
        frames = jnp.where(done, _initial_stack(fresh), final_frames)
        info = {
            "final_observation": final_frames,
            "final_state": stepped,
            "terminated": terminated,
            "truncated": truncated,
        }
        return frames, PixelState(physics=physics, frames=frames), reward, terminated, truncated, info
