"""Agent: a trained V + M + C (and K when trained), acting on raw pixel observations.

    agent = Agent.load("runs/cpu")                 # a finished `wm-jax run` directory
    agent.save_pretrained("agents/cpu")            # one portable folder (safetensors + config.json)
    agent = Agent.from_pretrained("agents/cpu")    # no run directory, no training data
    carry = agent.initial_carry()
    action, carry = agent.act(carry, obs)          # obs uint8[64, 64, 4]
    actions, carries = agent.act_batch(carries, observations)   # leading batch axis
    agent.evaluate(100)                            # real episodes, with the run's own evaluation key

`act` is jit-compiled once per Agent (no retrace per call) and runs the same `agent_step` as the
vmapped evaluation rollout, so its actions equal the rollout's on the same frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import pretrained
from wm_jax.models import transition
from wm_jax.search import rollout
from wm_jax import run_dir as run_dir_lib
from wm_jax.config import Config


def evaluation_key(seed: int) -> jax.Array:
    """The key `wm-jax run --seed seed` evaluates its final agent with."""
    return run_dir_lib.run_keys(seed)["evaluate"]


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
    def __init__(self, cfg: Config, params: dict[str, Any], verifier: Any = None,
                 card: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.params = params  # {"vae", "transition", "controller"}
        # K's parameters (None when the run trained none), or a function that loads them: acting
        # never needs K, so a run's K is read only when asked for (export, video).
        self._verifier = verifier
        self.card = dict(card or {})  # what the run measured (summary.json's figures), for the model card
        self._device = jax.devices()[0]
        self._act = jax.jit(self._act_impl)
        self._act_batch = jax.jit(jax.vmap(self._act_impl, in_axes=(None, 0, 0)))

    def _act_impl(self, params, carry, obs):
        action, carry, _ = rollout.agent_step(self.cfg, params, carry, obs)
        return action, carry

    @property
    def verifier(self) -> Any:
        if callable(self._verifier):
            self._verifier = self._verifier()
        return self._verifier

    @classmethod
    def load(cls, run_dir: Path | str) -> Agent:
        """Load the final agent of a finished `wm-jax run` directory (its K, if any, on first use)."""
        cfg, params = run_dir_lib.load_agent(run_dir)
        return cls(cfg, params, lambda: run_dir_lib.load_verifier(run_dir), run_dir_lib.card(run_dir))

    @classmethod
    def from_pretrained(cls, directory: Path | str) -> Agent:
        """Load an agent folder written by `save_pretrained` (or `wm-jax export`); a missing,
        damaged or other-version file is a pretrained.PretrainedError naming it."""
        cfg, params, card = pretrained.load(directory)
        k_params = params.pop("verifier", None)
        return cls(cfg, params, k_params, card)

    @classmethod
    def open(cls, path: Path | str) -> Agent:
        """A run directory (Agent.load) or an exported folder (Agent.from_pretrained), by what it holds."""
        path = Path(path)
        if pretrained.is_export(path) and not (path / "agent.json").exists() and not (path / "stages.json").exists():
            return cls.from_pretrained(path)
        return cls.load(path)

    def save_pretrained(self, directory: Path | str) -> Path:
        """One folder with V, M, C (and K) as safetensors, config.json and a model card (README.md)."""
        return pretrained.save(directory, self.cfg, {**self.params, "verifier": self.verifier}, self.card)

    def evaluate(self, episodes: int | None = None, key: jax.Array | None = None) -> dict[str, Any]:
        """Real episodes (rollout.evaluate); the default key is the one the run's own final
        evaluation used, so a loaded or exported agent reproduces summary.json's returns."""
        if key is None:
            key = evaluation_key(self.cfg.seed)
        return rollout.evaluate(self.cfg, self.params, key, episodes)

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
