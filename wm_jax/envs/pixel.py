"""Any gymnax environment observed through a JAX render function, with a 4-frame stack.

`PixelEnv(env, frame_fn)` keeps gymnax's physics, rewards, terminations and time limit exactly
(it calls the environment's own `step_env`, `is_truncated` and `reset_env`) and replaces its
observation by the last four frames `frame_fn(state, params)` drew, newest last. The API is
gymnax 1.x's, the same as `PixelCartPole`'s, so the rest of wm_jax can hold either.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from wm_jax.envs.draw import FRAME_SIZE, STACK

FrameFn = Callable[[Any, Any], jax.Array]  # (gymnax state, gymnax params) -> uint8[64, 64]


@struct.dataclass
class PixelState:
    """Physics state (the gymnax environment's EnvState) and the last four frames, newest last."""

    physics: Any
    frames: jax.Array  # uint8[64, 64, 4]


def strong_types(tree: Any) -> Any:
    """`tree` with every leaf an array of its own dtype, none weakly typed.

    gymnax's resets build some fields from Python scalars (`jnp.array(0.0)`: weakly typed) that its
    steps return strongly typed; without this a jitted step called on a reset state and then on a
    stepped one would compile twice.
    """
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


class PixelEnv:
    """gymnax environment `env` observed through `frame_fn`, with a 4-frame stack.

    `reset(key, params) -> (obs, state)` and
    `step(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)`,
    obs uint8[64, 64, 4], newest frame last; the first observation repeats the first frame.
    Both are jitted (the instance is static) and vmap over keys, states and actions.

    `frame_fn(state, params)` must return uint8[64, 64] from traced values (it runs inside jit);
    any other shape or dtype is a ValueError when the step is traced.

    Auto-reset follows gymnax: when a step ends the episode (terminated or truncated), the returned
    obs and state already belong to a fresh episode (four copies of its first frame); the stack
    that shows the final state is `info["final_observation"]` and its physics `info["final_state"]`.
    Rewards are gymnax's, the terminating step's included.
    """

    def __init__(self, env: Any, frame_fn: FrameFn) -> None:
        self.env = env
        self.frame_fn = frame_fn

    @property
    def default_params(self) -> Any:
        return self.env.default_params

    @property
    def num_actions(self) -> int:
        return self.env.num_actions

    def action_space(self, params: Any = None) -> Any:
        """The gymnax action space (Discrete or Box) of the wrapped environment."""
        return self.env.action_space(self.default_params if params is None else params)

    def frame(self, physics: Any, params: Any) -> jax.Array:
        """One frame of `physics`, checked to be uint8[64, 64]."""
        frame = self.frame_fn(physics, params)
        if frame.shape != (FRAME_SIZE, FRAME_SIZE) or frame.dtype != jnp.uint8:
            raise ValueError(
                f"frame_fn must return uint8[{FRAME_SIZE}, {FRAME_SIZE}], got {frame.dtype}{list(frame.shape)}"
            )
        return frame

    def initial_stack(self, physics: Any, params: Any) -> jax.Array:
        """The first observation of an episode: its first frame repeated four times."""
        return jnp.repeat(self.frame(physics, params)[..., None], STACK, axis=-1)

    def push_frame(self, frames: jax.Array, physics: Any, params: Any) -> jax.Array:
        """The 4-frame stack with the rendering of `physics` appended as the newest frame."""
        return jnp.concatenate([frames[..., 1:], self.frame(physics, params)[..., None]], axis=-1)

    def step_physics(self, key: jax.Array, physics: Any, action: jax.Array, params: Any) -> tuple[Any, jax.Array, jax.Array]:
        """gymnax's physics step without auto-reset or rendering: (physics', reward, terminated)."""
        _, stepped, reward, terminated, _ = self.env.step_env(key, physics, action, params)
        return stepped, reward, terminated

    @partial(jax.jit, static_argnums=0)
    def reset(self, key: jax.Array, params: Any = None) -> tuple[jax.Array, PixelState]:
        params = self.default_params if params is None else params
        physics = strong_types(self.env.reset_env(key, params)[1])
        frames = self.initial_stack(physics, params)
        return frames, PixelState(physics=physics, frames=frames)

    @partial(jax.jit, static_argnums=0)
    def step(
        self, key: jax.Array, state: PixelState, action: jax.Array, params: Any = None
    ) -> tuple[jax.Array, PixelState, jax.Array, jax.Array, jax.Array, dict[str, Any]]:
        params = self.default_params if params is None else params
        key_step, key_reset = jax.random.split(key)  # the split gymnax's own step makes
        stepped, reward, terminated = self.step_physics(key_step, state.physics, action, params)
        stepped = strong_types(stepped)
        truncated = self.env.is_truncated(stepped, params)
        done = jnp.logical_or(terminated, truncated)
        final_frames = self.push_frame(state.frames, stepped, params)

        fresh = strong_types(self.env.reset_env(key_reset, params)[1])
        physics = jax.tree.map(lambda a, b: jax.lax.select(done, a, b), fresh, stepped)
        frames = jnp.where(done, self.initial_stack(fresh, params), final_frames)
        info = {
            "final_observation": final_frames,
            "final_state": stepped,
            "terminated": terminated,
            "truncated": truncated,
        }
        return frames, PixelState(physics=physics, frames=frames), reward, terminated, truncated, info
