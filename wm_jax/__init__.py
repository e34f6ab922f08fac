"""wm_jax: World Models (Ha & Schmidhuber 2018) as pure JAX functions, on CartPole-v1 from pixels."""

from typing import Any

from wm_jax.config import Config

__all__ = ["Agent", "Config", "get_preset"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Agent loads the whole model stack (flax, orbax, datasets) and get_preset the environments
    # (gymnax, whose import starts JAX's backend): only when asked for, so that `import wm_jax.config`
    # (the CLI's argument checks, a config script) stays light and `wm-jax run --coordinator` can
    # join jax.distributed first.
    if name == "Agent":
        from wm_jax.agent import Agent

        return Agent
    if name == "get_preset":
        from wm_jax.presets import get_preset

        return get_preset
    raise AttributeError(f"module 'wm_jax' has no attribute {name!r}")
