"""wm_jax: World Models (Ha & Schmidhuber 2018) as pure JAX functions, on CartPole-v1 from pixels."""

from wm_jax.agent import Agent
from wm_jax.config import Config, get_preset

__all__ = ["Agent", "Config", "get_preset"]
__version__ = "0.1.0"
