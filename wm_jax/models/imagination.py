"""M's dreams: z' drawn from M's prediction, one imagined step, and `imagine`, the one loop that rolls
M forward on its own samples.

Every dream runs through `imagine`: C's dreams and their scores (search.dream), the macro dreams
(search.macro passes its two-primitive step), the PPO dream environment (one step per env step), K's
open-loop negatives, the drift curves, the video, and the server's look-ahead and /v1/dream, which
dream deterministically (M's most likely latent at every step, so the same request dreams the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wm_jax.models.transition import Cell, Params, Prediction, cell_step, components, hidden, null_action, pack

Carry = tuple[jax.Array, jax.Array]
Noise = tuple[jax.Array | None, jax.Array]  # (Gumbel [latent, K] or None for K = 1, standard normal [latent])
# (cell, carry, z, a, noise, tau) -> (new carry, z', prediction, extra trajectory entries)
Step = Callable[[Cell, Carry, jax.Array, jax.Array, Any, Any], tuple[Carry, jax.Array, Prediction, dict[str, Any]]]


def latent_noise(key: jax.Array, latent: int, components: int) -> Noise:
    """The random draws one `sample_latent` makes: (Gumbel [latent, K] for the component, None for
    K = 1; standard normal [latent]). Drawn apart so a rollout can draw all its steps' noise at once."""
    key_k, key_n = jax.random.split(key)
    gumbel = jax.random.gumbel(key_k, (latent, components)) if components > 1 else None
    return gumbel, jax.random.normal(key_n, (latent,))


def most_likely_noise(latent: int, components: int, shape: tuple[int, ...] = ()) -> Noise:
    """`latent_noise`-shaped zeros (with leading `shape`): with them `sample_with_noise` takes M's
    most likely component and its mean, whatever the temperature."""
    gumbel = jnp.zeros(shape + (latent, components)) if components > 1 else None
    return gumbel, jnp.zeros(shape + (latent,))


def sample_with_noise(pred: Prediction, noise: Noise, tau: float | jax.Array = 1.0) -> jax.Array:
    """z' from M's prediction and `latent_noise`'s draws at temperature tau."""
    gumbel, eps = noise
    tau = jnp.asarray(tau, pred.mean.dtype)
    if gumbel is None:
        mean, logstd = pred.mean[..., 0], pred.logstd[..., 0]
    else:  # jax.random.categorical(logits / tau) with these Gumbel draws
        k = jnp.argmax(gumbel + pred.logits / tau, axis=-1)
        mean = jnp.take_along_axis(pred.mean, k[..., None], axis=-1)[..., 0]
        logstd = jnp.take_along_axis(pred.logstd, k[..., None], axis=-1)[..., 0]
    return mean + jnp.exp(logstd) * jnp.sqrt(tau) * eps


def sample_latent(key: jax.Array, pred: Prediction, tau: float | jax.Array = 1.0) -> jax.Array:
    """z' ~ p(z' | h') at temperature tau (logits / tau, sigma * sqrt(tau)); [..., latent]."""
    key_k, key_n = jax.random.split(key)
    gumbel = jax.random.gumbel(key_k, pred.logits.shape) if pred.logits.shape[-1] > 1 else None
    return sample_with_noise(pred, (gumbel, jax.random.normal(key_n, pred.mean.shape[:-1])), tau)


def dream_step(cell: Cell, carry: Carry, z: jax.Array, a: jax.Array, noise: Noise, tau: float | jax.Array
               ) -> tuple[Carry, jax.Array, Prediction]:
    """One imagined step: M's transition from (carry, z, a), then z' drawn with `noise` at
    temperature tau. Returns (new carry, z', prediction)."""
    new_carry, pred = cell_step(cell, carry, z, a)
    return new_carry, sample_with_noise(pred, noise, tau), pred


def one_step(cell: Cell, carry: Carry, z: jax.Array, a: jax.Array, noise: Noise, tau: float | jax.Array
             ) -> tuple[Carry, jax.Array, Prediction, dict[str, Any]]:
    """`imagine`'s default Step: one `dream_step` per action, nothing added to the trajectory."""
    return (*dream_step(cell, carry, z, a, noise, tau), {})


def imagine(
    cfg: Any, params: Params | Cell, key: jax.Array | None, carry: Carry, z0: jax.Array, length: int,
    tau: float | jax.Array = 1.0, actions: jax.Array | None = None,
    policy: Callable[[Carry, jax.Array], jax.Array] | None = None, *,
    deterministic: bool = False, step: Step = one_step, substeps: int = 1,
) -> tuple[Carry, dict[str, Any]]:
    """M (cfg: TransitionConfig; params, or a packed or quantized Cell) rolled forward `length`
    steps from (carry, z0), fed its own samples at temperature tau.

    The actions are given (`actions` [length], or [length, cfg.actions] on a continuous task) or chosen at each step by `policy(carry, z) -> a`.
    Each step's noise is drawn from `key` before the loop (the same bits as `sample_latent` with
    each step's key; under vmap drawn once per key, however many controllers share it), or, with
    `deterministic`, is `most_likely_noise` (key unused). `step` advances one action with
    `substeps` draws of noise (`one_step`: one; the macro dreams pass a step of two primitives).

    Returns (the final carry, trajectory [L, ...]): h (the h each step started from), z (its
    input; z[0] = z0), action, z_next (the sample), pred (M's Prediction) and what `step` adds.
    Step t carries t + 1 steps of drift.
    """
    if (actions is None) == (policy is None):
        raise ValueError("imagine needs exactly one of `actions` and `policy`")
    cell = params if isinstance(params, Cell) else pack(cfg, params)  # once, not at every step
    latent, k = z0.shape[-1], components(cfg)
    lead = (length,) if substeps == 1 else (length, substeps)
    if deterministic:
        noise = most_likely_noise(latent, k, lead)
    else:
        noise = jax.vmap(lambda key_t: latent_noise(key_t, latent, k))(jax.random.split(key, length * substeps))
        noise = jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), noise)

    def body(state, inputs):
        carry, z = state
        noise_t, a = inputs
        if policy is not None:
            a = policy(carry, z)
        new_carry, z_next, pred, extra = step(cell, carry, z, a, noise_t, tau)
        return (new_carry, z_next), {"h": hidden(carry), "z": z, "action": a, "z_next": z_next, "pred": pred, **extra}

    null = null_action(cfg, (length,))  # the given actions' form: int32 indices or float32 vectors
    given = null if actions is None else jnp.asarray(actions, null.dtype)
    (carry, _), traj = jax.lax.scan(body, (carry, z0), (noise, given))
    return carry, traj
