"""Drift: how far M's open-loop predictions wander from the real latents as the horizon grows.

For real episodes (the encoder posteriors of every step and the actions taken), M is teacher-forced
up to a start step t0, then run open-loop from the real z_{t0} along the real actions, feeding its
own samples as a dream does. k steps ahead we record
  - latent_mse: squared error between M's predicted mixture mean and the real posterior mean,
    averaged over latent dimensions;
  - kl: a one-sample estimate of KL(real posterior || M's predicted distribution), in nats;
  - frame_mse: per-pixel squared error between the decoded prediction and the decoded real
    posterior mean (so V's own reconstruction error is not counted);
  - confidence: the verifier's p(real) for the k-th imagined transition (when K is given).
k = 0 is the real latent itself: zero error by construction (kl and confidence start at k = 1).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models import imagination, transition, vae, verifier
from wm_jax.config import Config

METRICS = ("latent_mse", "kl", "frame_mse", "confidence")


def pad_episodes(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-row arrays (`transition.training_arrays`) -> per-episode arrays padded to the longest.

    Every per-row array but the boundary flags comes back as [E, T, ...] (mean, logvar
    [E, T, latent], action, reward, done [E, T]; padding repeats the episode's first row), with
    length [E].
    """
    is_first = np.asarray(arrays["is_first"], bool)
    starts = np.flatnonzero(is_first)
    lengths = np.diff(np.append(starts, is_first.size))
    steps = np.arange(lengths.max())
    rows = np.where(steps[None] < lengths[:, None], starts[:, None] + steps[None], starts[:, None])
    out = {k: np.asarray(v)[rows] for k, v in arrays.items() if k not in ("is_first", "is_last")}
    out["length"] = lengths
    return out


@partial(jax.jit, static_argnums=(0,))
def _teacher_carries(cfg, m_params, ep):
    """M's carry before every step of every episode, teacher-forced on the posterior means."""
    reset = jnp.broadcast_to(jnp.arange(ep["action"].shape[1])[None] == 0, ep["action"].shape)
    return transition.observe_carries(cfg.transition, m_params, ep["mean"], ep["action"], reset)[0]


@partial(jax.jit, static_argnums=(0, 7, 8))
def _rollouts(cfg, key, m_params, k_params, ep, carries, pairs, max_k, with_k):
    """Open-loop rollouts for (episode, t0) pairs [P, 2]; per-pair metrics [P, max_k] for k = 1..max_k."""
    t_len = ep["action"].shape[1]

    def one(key_p, pair):
        e, t0 = pair[0], pair[1]
        steps = jnp.minimum(t0 + jnp.arange(max_k + 1), t_len - 1)  # rows t0 .. t0 + max_k
        carry = jax.tree.map(lambda c: c[e, t0], carries)
        key_ol, key_kl = jax.random.split(key_p)
        _, ol = imagination.imagine(cfg.transition, m_params, key_ol, carry, ep["mean"][e, t0], max_k,
                                   actions=ep["action"][e, steps[:-1]])
        pred_mean = transition.mixture_moments(ol["pred"])[0]
        real_mean, real_logvar = ep["mean"][e, steps[1:]], ep["logvar"][e, steps[1:]]
        kl = jax.vmap(transition.latent_kl_mc)(jax.random.split(key_kl, max_k), real_mean, real_logvar, ol["pred"])
        out = {
            "latent_mse": jnp.mean(jnp.square(pred_mean - real_mean), axis=-1),
            "kl": kl,
            "valid": (t0 + jnp.arange(1, max_k + 1)) <= ep["length"][e] - 1,
            "pred_mean": pred_mean,
        }
        if with_k:
            acts = ep["action"][e, steps[:-1]]
            out["confidence"] = verifier.confidence(cfg.verifier, k_params, ol["h"], ol["z"], acts, ol["z_next"])
        return out

    return jax.vmap(one)(jax.random.split(key, pairs.shape[0]), pairs)


def measure(
    cfg: Config, key: jax.Array, params: dict[str, Any], episodes: dict[str, np.ndarray], max_k: int = 100,
    stride: int = 25, decode_pairs: int = 32, batch: int = 256,
) -> dict[str, Any]:
    """Drift curves over k = 0..max_k for `pad_episodes` output.

    params: {"vae", "transition"} and optionally "verifier". Open-loop rollouts start every `stride`
    steps of every episode (where at least one real step follows); frame errors are computed for the
    first `decode_pairs` rollouts only (decoding is the expensive part on a CPU).
    Returns {"k": [0..max_k], metric: per-k mean (None where no rollout reaches k), "count": per-k
    number of rollouts, "rollouts": P}.
    """
    lengths = np.asarray(episodes["length"])
    pairs = np.array([(e, t0) for e in range(lengths.size) for t0 in range(0, int(lengths[e]) - 1, stride)], np.int32)
    if pairs.size == 0:
        raise ValueError("no episode has two or more steps: nothing to measure drift on")
    with_k = params.get("verifier") is not None
    ep = {name: jnp.asarray(episodes[name]) for name in ("mean", "logvar", "action", "length")}
    static = cfg.static()  # a new tau or threshold reuses both programs
    carries = _teacher_carries(static, params["transition"], ep)  # once, shared by every batch of rollouts
    parts = []
    for i, lo in enumerate(range(0, len(pairs), batch)):
        chunk = pairs[lo: lo + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])  # one compile
        res = _rollouts(static, jax.random.fold_in(key, i), params["transition"], params.get("verifier"), ep, carries,
                        jnp.asarray(padded), max_k, with_k)
        parts.append({k: np.asarray(v)[: len(chunk)] for k, v in jax.device_get(res).items()})
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    valid = res["valid"]

    # decoded-frame error on a subset: decode(prediction) vs decode(real posterior mean)
    sub = pairs[:decode_pairs]
    steps = np.minimum(sub[:, 1:2] + np.arange(1, max_k + 1)[None], episodes["mean"].shape[1] - 1)
    real = np.asarray(episodes["mean"])[sub[:, 0:1], steps]
    dec = jax.jit(lambda z: vae.decode(cfg.vae, params["vae"], z))
    frame = np.stack([
        np.mean(np.square(np.asarray(dec(jnp.asarray(res["pred_mean"][i]))) - np.asarray(dec(jnp.asarray(real[i])))),
                axis=(1, 2, 3))
        for i in range(len(sub))
    ]) if len(sub) else np.zeros((0, max_k))

    def curve(values: np.ndarray, mask: np.ndarray) -> list[float | None]:
        total, count = (values * mask).sum(axis=0), mask.sum(axis=0)
        return [float(t / c) if c else None for t, c in zip(total, count)]

    out: dict[str, Any] = {"k": list(range(max_k + 1)), "rollouts": int(len(pairs))}
    out["latent_mse"] = [0.0] + curve(res["latent_mse"], valid)
    out["frame_mse"] = [0.0] + curve(frame, valid[: len(sub)])
    out["kl"] = [None] + curve(res["kl"], valid)
    out["confidence"] = [None] + curve(res["confidence"], valid) if with_k else [None] * (max_k + 1)
    out["count"] = [int(len(pairs))] + [int(c) for c in valid.sum(axis=0)]
    out["frame_count"] = [int(len(sub))] + [int(c) for c in valid[: len(sub)].sum(axis=0)]
    return out
