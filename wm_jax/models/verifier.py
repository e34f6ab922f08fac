"""K: a verifier that scores whether a transition (h_t, z_t, a_t, z_{t+1}) looks real.

Trained contrastively on windows of real rows, in the style of RLVR-World. Positives are real
transitions: M's teacher-forced h_t, with z_t and z_{t+1} sampled from the encoder posteriors.
Negatives are imagined transitions of three kinds:
  - one step: z_{t+1} sampled from M's prediction after the real history;
  - open loop: M run from the window's start along the real actions on its own samples, so the
    transition at window step t carries t + 1 steps of drift in h, z and z';
  - noise: the real z_{t+1} perturbed by noise scaled to the per-dimension spread of the
    posterior means.
The loss is a balanced logistic loss: positives and negatives weigh equally, and so do the three
kinds of negatives. `confidence` is sigmoid(logit); the dream multiplies its reward by it
(mode "weight") or ends where it falls below a threshold (mode "cutoff").
"""

from __future__ import annotations

import dataclasses

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import stats
from wm_jax.models import imagination, transition
from wm_jax.models import train as train_lib
from wm_jax.config import Config, VerifierConfig

Params = Any
NEGATIVE_KINDS = ("one_step", "open_loop", "noise")


class _Net(nn.Module):
    hidden: int
    actions: int = transition.CARTPOLE_ACTIONS
    continuous: bool = False

    @nn.compact
    def __call__(self, h, z, a, z_next):
        action = transition.action_input(a, self.actions, self.continuous, z.dtype)
        x = jnp.concatenate([h, z, action, z_next, z_next - z], axis=-1)
        x = nn.elu(nn.Dense(self.hidden, name="dense_0")(x))
        x = nn.elu(nn.Dense(self.hidden, name="dense_1")(x))
        return nn.Dense(1, name="logit")(x)[..., 0]


def init(key: jax.Array, cfg: VerifierConfig, latent: int, hidden: int) -> Params:
    """Parameters of K for latents of size `latent` and M's hidden size `hidden`."""
    z = jnp.zeros((1, latent))
    return _Net(cfg.hidden, cfg.actions, cfg.continuous).init(key, jnp.zeros((1, hidden)), z,
                                                              transition.null_action(cfg, (1,)), z)


def logit(
    cfg: VerifierConfig, params: Params, h: jax.Array, z: jax.Array, a: jax.Array, z_next: jax.Array
) -> jax.Array:
    """K's logit that (h, z, a, z_next) is a real transition; any leading batch shape."""
    a = jnp.asarray(a, jnp.float32 if cfg.continuous else jnp.int32)
    return _Net(cfg.hidden, cfg.actions, cfg.continuous).apply(params, h, z, a, z_next)


def confidence(cfg: VerifierConfig, params: Params, h, z, a, z_next) -> jax.Array:
    """p(real) in [0, 1]."""
    return jax.nn.sigmoid(logit(cfg, params, h, z, a, z_next))


def examples(
    cfg: Config, key: jax.Array, m_params: Params, batch: dict[str, jax.Array], latent_std: jax.Array
) -> dict[str, Any]:
    """Positives and the three kinds of negatives from a `transition.sequence_batch` [B, L].

    Returns {"positive": (h, z, a, z_next, mask), kind: (...) for kind in NEGATIVE_KINDS}; the
    open-loop masks end at the first reset after the window start (a new episode).
    """
    key_one, key_ol, key_noise = jax.random.split(key, 3)
    (_, h), preds = transition.observe_carries(cfg.transition, m_params, batch["z"], batch["action"], batch["reset"])
    mask = batch["next_valid"]
    z, a, z_next = batch["z"], batch["action"], batch["z_next"]
    one_step = imagination.sample_latent(key_one, preds, 1.0)
    noisy = z_next + cfg.verifier.noise * latent_std * jax.random.normal(key_noise, z_next.shape)
    carry0 = transition.initial_carry(cfg.transition, z.shape[0])
    keys = jax.random.split(key_ol, z.shape[0])
    _, ol = jax.vmap(lambda k, c, z0, acts: imagination.imagine(cfg.transition, m_params, k, c, z0, acts.shape[0],
                                                                actions=acts))(keys, carry0, z[:, 0], a)
    same_episode = jnp.cumsum(batch["reset"][:, 1:], axis=1) == 0
    ol_mask = mask & jnp.concatenate([jnp.ones_like(same_episode[:, :1]), same_episode], axis=1)
    return {
        "positive": (h, z, a, z_next, mask),
        "one_step": (h, z, a, one_step, mask),
        "open_loop": (ol["h"], ol["z"], a, ol["z_next"], ol_mask),
        "noise": (h, z, a, noisy, mask),
    }


def loss(cfg: VerifierConfig, params: Params, ex: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Balanced logistic loss: 0.5 * (positives' mean + the mean over negative kinds of their means)."""
    h, z, a, zn, m = ex["positive"]
    lp = logit(cfg, params, h, z, a, zn)
    pos = stats.masked_mean(jax.nn.softplus(-lp), m)
    metrics = {"acc/positive": stats.masked_mean((lp > 0).astype(jnp.float32), m)}
    neg = []
    for kind in NEGATIVE_KINDS:
        h, z, a, zn, m = ex[kind]
        ln = logit(cfg, params, h, z, a, zn)
        neg.append(stats.masked_mean(jax.nn.softplus(ln), m))
        metrics[f"acc/{kind}"] = stats.masked_mean((ln < 0).astype(jnp.float32), m)
    total = 0.5 * (pos + sum(neg) / len(neg))
    return total, {"loss": total, **metrics}


def latent_spread(mean: np.ndarray) -> np.ndarray:
    """Per-dimension standard deviation of the posterior means (the noise negatives' scale)."""
    return np.asarray(mean, np.float32).std(axis=0)


def _data(m_params: Params, arrays: dict[str, Any], batched: bool = False) -> dict[str, Any]:
    """The training data: the rows (with their optional "rows" count), M, and the latents' spread;
    `batched`: every entry with a leading axis of seeds, each spread over its seed's own rows."""
    keys = transition.DATA_KEYS + (("rows",) if "rows" in arrays else ())
    mean = np.asarray(arrays["mean"])
    if batched:
        rows = arrays.get("rows", [mean.shape[1]] * mean.shape[0])
        spread = np.stack([latent_spread(m[:int(n)]) for m, n in zip(mean, rows)])
    else:
        spread = latent_spread(mean[:int(arrays.get("rows", mean.shape[0]))])
    return {**{k: jnp.asarray(arrays[k]) for k in keys}, "latent_std": jnp.asarray(spread), "m_params": m_params}


def model_config(cfg: Config, latent: int) -> dict[str, Any]:
    """What a checkpoint of K must agree on; the action count and kind only where they are not
    CartPole's (2, discrete: another task's, or a macro-M's K), so checkpoints written before they
    existed keep loading."""
    vcfg = cfg.verifier
    out = {"hidden": vcfg.hidden, "latent": int(latent), "m_hidden": cfg.transition.hidden,
           "noise": vcfg.noise, "seq_len": vcfg.seq_len}
    if vcfg.actions != transition.CARTPOLE_ACTIONS or vcfg.continuous:
        out["actions"] = vcfg.actions
    return {**out, "continuous": True} if vcfg.continuous else out


def train(cfg: Config, key: jax.Array, data: dict[str, Any], out_dir, progress: bool = True, *,
          m_params: Params, seeds: train_lib.Seeds | None = None, limits: Any = None
          ) -> tuple[Params, dict[str, Any]]:
    """Train K against the frozen M `m_params` on `transition.training_arrays`-style per-row data;
    resumable in out_dir. With `seeds` (train.Seeds), key, m_params and data carry a leading axis of
    seeds (data's "rows": each seed's own row count, as for M; `limits`: each one's step count)."""
    vcfg, arrays = cfg.verifier, data
    latent = cfg.vae.latent
    params, key_train = train_lib.split_init(key, lambda k: init(k, vcfg, latent, cfg.transition.hidden), seeds)
    seeds = None if seeds is None else dataclasses.replace(seeds, shared_data=False)  # each seed has its own M
    return train_lib.fit(
        "verifier", vcfg.train, train_lib.Bound(_loss, vcfg.static()), train_lib.Bound(_sample, cfg.static()),
        _data(m_params, arrays, seeds is not None), params, key_train, out_dir, model_config(cfg, latent), progress,
        seeds, limits,
    )


def _sample(cfg: Config, key: jax.Array, d: dict[str, Any]) -> dict[str, Any]:
    key_b, key_e = jax.random.split(key)
    batch = transition.sequence_batch(key_b, d, cfg.verifier.train.batch, cfg.verifier.seq_len)
    return examples(cfg, key_e, d["m_params"], batch, d["latent_std"])


def _loss(cfg: VerifierConfig, params: Params, key: jax.Array, ex: dict[str, Any], step: jax.Array):
    return loss(cfg, params, ex)


def load(cfg: Config, out_dir, identity: dict[str, Any] | None = None, seeds: int | None = None) -> Params:
    """K trained by `train` into out_dir (exactly the recorded step with `identity`; with `seeds`,
    a seed-batched training's [seeds] of them)."""
    latent = cfg.vae.latent
    like = train_lib.seeds_like(init(jax.random.key(0), cfg.verifier, latent, cfg.transition.hidden), seeds)
    return train_lib.load_params(cfg.verifier.train, like, out_dir, model_config(cfg, latent), identity,
                                 batched=seeds is not None)


def evaluate(
    cfg: Config, key: jax.Array, m_params: Params, k_params: Params, arrays: dict[str, Any],
    drifts: tuple[int, ...] = (1, 5, 20), batches: int = 16,
) -> dict[str, Any]:
    """Held-out AUC of real vs imagined transitions: per open-loop drift k, per negative kind, counts."""
    vcfg = cfg.verifier
    if max(drifts) >= vcfg.seq_len + 1:
        raise ValueError(f"drift {max(drifts)} needs verifier.seq_len >= {max(drifts)}, got {vcfg.seq_len}")
    d = _data(m_params, arrays)

    @jax.jit
    def scores(k):
        key_b, key_e = jax.random.split(k)
        batch = transition.sequence_batch(key_b, d, vcfg.train.batch, vcfg.seq_len)
        ex = examples(cfg, key_e, m_params, batch, d["latent_std"])
        return {name: (logit(vcfg, k_params, *ex[name][:4]), ex[name][4]) for name in ex}

    parts = [jax.device_get(scores(jax.random.fold_in(key, i))) for i in range(batches)]
    cat = {name: (np.concatenate([p[name][0] for p in parts]), np.concatenate([p[name][1] for p in parts]))
           for name in parts[0]}
    pos = cat["positive"][0][cat["positive"][1]]
    out: dict[str, Any] = {"positives": int(pos.size)}
    for kind in NEGATIVE_KINDS:
        s, m = cat[kind]
        out[f"auc/{kind}"] = stats.auc(pos, s[m])
    s, m = cat["open_loop"]
    for k in drifts:  # window step k - 1 carries k steps of drift
        neg = s[:, k - 1][m[:, k - 1]]
        out[f"auc/drift_{k}"] = stats.auc(pos, neg)
        out[f"count/drift_{k}"] = int(neg.size)
    return out
