"""C: Ha's linear controller on [z, h], action = argmax(W [z, h] + b), as one flat vector.

CMA-ES searches over the flat vector directly; `unflatten` slices it into W and b (and, with the
"mlp" switch, one tanh hidden layer in front). On a continuous task the outputs are the action
itself, squashed into the task's bounds: low + (high - low) * (tanh(y) + 1) / 2 (Ha's CarRacing
controller squashes with tanh the same way).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from wm_jax.config import ControllerConfig


def _shapes(cfg: ControllerConfig, latent: int, hidden: int) -> list[tuple[int, ...]]:
    inputs, actions = latent + hidden, cfg.actions  # a task's actions (or a vector's size), or macros
    if cfg.kind == "linear":
        return [(inputs, actions), (actions,)]
    return [(inputs, cfg.mlp_hidden), (cfg.mlp_hidden,), (cfg.mlp_hidden, actions), (actions,)]


def num_params(cfg: ControllerConfig, latent: int, hidden: int) -> int:
    return sum(math.prod(shape) for shape in _shapes(cfg, latent, hidden))


def unflatten(cfg: ControllerConfig, flat: jax.Array, latent: int, hidden: int) -> list[jax.Array]:
    if flat.shape[-1] != num_params(cfg, latent, hidden):
        raise ValueError(
            f"controller vector has {flat.shape[-1]} entries, expected {num_params(cfg, latent, hidden)} "
            f"for kind={cfg.kind!r}, latent={latent}, hidden={hidden}"
        )
    out, offset = [], 0
    for shape in _shapes(cfg, latent, hidden):
        size = math.prod(shape)
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out


def logits(cfg: ControllerConfig, flat: jax.Array, z: jax.Array, h: jax.Array) -> jax.Array:
    """Action scores for one (z, h) or a batch; flat is one candidate's parameter vector."""
    x = jnp.concatenate([z, h], axis=-1)
    parts = unflatten(cfg, flat, z.shape[-1], h.shape[-1])
    if cfg.kind == "linear":
        w, b = parts
        return x @ w + b
    w1, b1, w2, b2 = parts
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


def squash(cfg: ControllerConfig, y: jax.Array) -> jax.Array:
    """Outputs y [..., actions] as a continuous action within [cfg.low, cfg.high] (tanh, scaled)."""
    low, high = (jnp.asarray(b, jnp.float32) for b in (cfg.low, cfg.high))
    return low + (high - low) * (0.5 * jnp.tanh(y) + 0.5)


def act(cfg: ControllerConfig, flat: jax.Array, z: jax.Array, h: jax.Array) -> jax.Array:
    """Deterministic action: the argmax of the scores (int32), or on a continuous task the squashed
    outputs (float32 [..., actions], within [low, high])."""
    out = logits(cfg, flat, z, h)
    return squash(cfg, out) if cfg.continuous else jnp.argmax(out, axis=-1).astype(jnp.int32)
