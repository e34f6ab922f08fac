"""Agent: a trained V + M + C loaded from a run directory, acting on raw pixel observations.

    agent = Agent.load("runs/cpu")
    carry = agent.initial_carry()
    action, carry = agent.act(carry, obs)          # obs uint8[64, 64, 4]
    actions, carries = agent.act_batch(carries, observations)   # leading batch axis

`act` is jit-compiled once per Agent (no retrace per call) and runs the same `agent_step` as the
vmapped evaluation rollout, so its actions equal the rollout's on the same frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import rollout, transition
from wm_jax import run_dir as run_dir_lib
from wm_jax.config import Config


def _observation(obs: Any, wanted: str) -> jax.Array:
    """obs as a uint8 jax array; the dtype is judged before conversion (jnp.asarray would turn a
    float64 array into float32 and the error would name the wrong type)."""
    dtype = getattr(obs, "dtype", None)
    if dtype is None:
        dtype = np.asarray(obs).dtype
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{wanted}, got {np.dtype(dtype)}{list(np.shape(obs))}")
    return jnp.asarray(obs)


class Agent:
    def __init__(self, cfg: Config, params: dict[str, Any]) -> None:
        self.cfg = cfg
        self.params = params
        self._device = jax.devices()[0]
        self._act = jax.jit(self._act_impl)
        self._act_batch = jax.jit(jax.vmap(self._act_impl, in_axes=(None, 0, 0)))

    def _act_impl(self, params, carry, obs):
        action, carry, _ = rollout.agent_step(self.cfg, params, carry, obs)
        return action, carry

    @classmethod
    def load(cls, run_dir: Path | str) -> "Agent":
        """Load the final agent of a finished `wm-jax run` directory."""
        return cls(*run_dir_lib.load_agent(run_dir))

    def initial_carry(self, batch: int | None = None) -> Any:
        """M's carry at the start of an episode (with a leading axis when batch is given)."""
        carry = transition.initial_carry(self.cfg.transition, () if batch is None else batch)
        # Committed like the carries act returns, so the first and later calls share one executable.
        return jax.device_put(carry, self._device)

    def act(self, carry: Any, obs: jax.Array) -> tuple[jax.Array, Any]:
        obs = _observation(obs, "obs must be uint8[64, 64, 4]")
        if obs.shape != (64, 64, 4):
            raise ValueError(f"obs must be uint8[64, 64, 4], got {obs.dtype}{list(obs.shape)}")
        # Commit inputs to the device: an uncommitted first obs (from env.reset) would otherwise
        # make the second call compile again for different input shardings.
        return self._act(self.params, *jax.device_put((carry, obs), self._device))

    def act_batch(self, carry: Any, obs: jax.Array) -> tuple[jax.Array, Any]:
        obs = _observation(obs, "obs must be uint8[B, 64, 64, 4]")
        if obs.ndim != 4 or obs.shape[1:] != (64, 64, 4):
            raise ValueError(f"obs must be uint8[B, 64, 64, 4], got {obs.dtype}{list(obs.shape)}")
        return self._act_batch(self.params, *jax.device_put((carry, obs), self._device))
