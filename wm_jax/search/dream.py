"""Imagined rollouts: C acts on (z, h), M steps, z' is sampled at temperature tau.

`dream` is M's `imagination.imagine` (one `lax.scan`) under C, then scored; `score_population`
vmaps it over rollouts and over the CMA-ES population so that one call scores a whole generation. Reward is the reward head's prediction,
and a dream ends when the done head says p > 0.5 (Ha's rule); steps after the end are masked.
Start states are latents sampled from stored encoder posteriors of real observations (Ha's
initial_z), with M's carry at zero; with grounding (the traced share evolve.grounding > 0) a
share of them comes from a pool of states the current controller reached in the real
environment instead.
M's matmuls take cfg.transition.compute_dtype inputs (float32 results); the controller, sampling,
p_done and returns are float32.

Every jitted function here takes the static config (`cfg.static()`) and the traced
hyperparameters (`hp = cfg.hyper()`: tau, the verifier's threshold, the grounding share) apart,
so a new tau or share reuses the compiled program and a grid of them is one `jax.vmap`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from wm_jax import sharding, stats
from wm_jax.models import controller, imagination, transition, verifier
from wm_jax.config import Config, grounded_count

Pool = tuple[jax.Array, jax.Array, jax.Array]  # (mean, logvar [R, latent], valid [R]) of real states


def _dream(
    cfg: Config, hp: dict[str, Any], key: jax.Array, m_params: Any, ctrl: jax.Array, start: jax.Array, horizon: int,
    k_params: Any = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    tcfg, ccfg, vcfg = cfg.transition, cfg.controller, cfg.verifier
    if vcfg.mode != "off" and k_params is None:
        raise ValueError(f"verifier.mode={vcfg.mode!r} needs the verifier's parameters (k_params)")

    def policy(carry, z):
        return controller.act(ccfg, ctrl, z, transition.hidden(carry))

    _, im = imagination.imagine(tcfg, m_params, key, transition.initial_carry(tcfg), start, horizon,
                               hp["evolve"]["tau"], policy=policy)
    out = outcome(cfg, hp, k_params, im["h"], im["z"], im["action"], im["z_next"], im["pred"])
    # Ha's rule: the step where p_done > 0.5 still counts, every later step is dead (a mask, not a
    # branch); in cutoff mode the first unverified step earns nothing and ends the dream too.
    alive = transition.alive(out["ends"]) * jnp.cumprod(out["verified"])
    traj = {"z": im["z"], "action": im["action"], "p_done": out["p_done"]}
    reward = out["reward"]
    if vcfg.mode != "off":
        traj["confidence"] = out["confidence"]
    traj.update(reward=reward * alive, alive=alive)
    return traj, jnp.sum(traj["reward"])


def outcome(cfg: Config, hp: dict[str, Any], k_params: Any, h: jax.Array, z: jax.Array, a: jax.Array,
            z_next: jax.Array, pred: transition.Prediction) -> dict[str, jax.Array]:
    """What a dream makes of imagined steps (h, z, a) -> z' with M's prediction (any leading shape):
    reward (the reward head's, times K's confidence in verifier mode "weight"), p_done, ends (1.0
    where p_done > 0.5: Ha's rule, the step itself still counts), verified (in mode "cutoff" 1.0
    where K's confidence >= the threshold, else all ones: an unverified step earns nothing and
    ends the dream) and, with a verifier, confidence. Shared by `dream` and the PPO dream env."""
    vcfg = cfg.verifier
    p_done = transition.p_done(pred)
    out = {"reward": pred.reward, "p_done": p_done, "ends": transition.ends(p_done),
           "verified": jnp.ones_like(p_done)}
    if vcfg.mode != "off":
        conf = verifier.confidence(vcfg, k_params, h, z, a, z_next)
        out["confidence"] = conf
        if vcfg.mode == "weight":
            out["reward"] = pred.reward * conf
        else:
            out["verified"] = (conf >= hp["verifier"]["threshold"]).astype(jnp.float32)
    return out


@partial(jax.jit, static_argnums=(0, 6))
def _dream_jit(cfg, hp, key, m_params, ctrl, start, horizon, k_params):
    return _dream(cfg, hp, key, m_params, ctrl, start, horizon, k_params)


def dream(
    cfg: Config, key: jax.Array, m_params: Any, ctrl: jax.Array, start: jax.Array, horizon: int | None = None,
    k_params: Any = None, hp: dict[str, Any] | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """One imagined episode of `horizon` steps (default cfg.evolve.horizon) from latent `start` [latent].

    Returns (trajectory, return): trajectory holds z [H, latent] (the latent each step acted on),
    action, reward (masked), p_done and alive [H], and the verifier's confidence [H] when
    cfg.verifier.mode is "weight" (reward * confidence) or "cutoff" (the dream ends at the first
    transition with confidence < threshold; that step earns nothing). k_params: K's parameters.
    hp: the traced hyperparameters (default cfg.hyper(): tau and the threshold come from there).
    """
    horizon = cfg.evolve.horizon if horizon is None else horizon
    return _dream_jit(cfg.static(), cfg.hyper() if hp is None else hp, key, m_params, ctrl, start, horizon, k_params)


def draw_starts(key: jax.Array, mean: jax.Array, logvar: jax.Array, num: int, rows: Any = None) -> jax.Array:
    """`num` start latents: random stored posteriors, each sampled once; from the first `rows`
    (traced; default all) when the arrays are padded beyond them, the same draws as unpadded."""
    key_r, key_z = jax.random.split(key)
    rows = jax.random.randint(key_r, (num,), 0, mean.shape[0] if rows is None else rows)
    return stats.gaussian_sample(key_z, mean[rows], logvar[rows])


def draw_grounded_starts(key: jax.Array, mean: jax.Array, logvar: jax.Array, num: int, pool: Pool | None,
                         share: jax.Array | float, rows: Any = None) -> jax.Array:
    """`num` start latents: the last grounded_count(share, num) of them (share * num, halves up)
    drawn from `pool` = (mean, logvar, valid) (rows with valid 0 are never drawn), the rest from
    the stored posteriors as `draw_starts`.

    The share is traced: both draws are made for all `num` rows and the share picks per row, so
    the stored rows are `draw_starts(key, ...)`'s and, with no pool or no grounded start, the
    result is `draw_starts` bit for bit.
    """
    stored = draw_starts(key, mean, logvar, num, rows)
    if pool is None:
        return stored
    p_mean, p_logvar, p_valid = pool
    key_r, key_z = jax.random.split(jax.random.fold_in(key, 1))
    rows = jax.random.categorical(key_r, jnp.where(p_valid > 0, 0.0, -jnp.inf), shape=(num,))
    grounded = stats.gaussian_sample(key_z, p_mean[rows], p_logvar[rows])
    first_grounded = num - grounded_count(share, num)
    i = jnp.arange(num)
    # Row i >= first_grounded takes grounded[i - first_grounded]: the pool's draws in their order.
    shifted = grounded[jnp.clip(i - first_grounded, 0, num - 1)]
    return jnp.where((i >= first_grounded)[:, None], shifted, stored)


def scores(
    cfg: Config, hp: dict[str, Any], key: jax.Array, m_params: Any, population: jax.Array, mean: jax.Array,
    logvar: jax.Array, rollouts: int, horizon: int, k_params: Any = None, pool: Pool | None = None,
    rows: Any = None,
) -> jax.Array:
    """Mean dream return of each candidate over `rollouts` dreams: float[P].

    Every candidate faces the same start states and the same sampling noise (common random
    numbers), so differences in fitness come from the controllers, not from luck. The population
    is split over the devices (wm_jax.sharding); the scores come back whole on every device.
    `pool` = (mean, logvar, valid) of real states reached by the current controller: a share
    hp["evolve"]["grounding"] of the dreams starts there (draw_grounded_starts); None: none does.
    `rows`: how many rows of mean and logvar exist (padded arrays; draw_starts).
    """
    key_s, key_d = jax.random.split(key)
    starts = draw_grounded_starts(key_s, mean, logvar, rollouts, pool, hp["evolve"]["grounding"], rows)
    keys = jax.random.split(key_d, rollouts)

    def one(ctrl):
        _, returns = jax.vmap(lambda k, s: _dream(cfg, hp, k, m_params, ctrl, s, horizon, k_params))(keys, starts)
        return jnp.mean(returns)

    size = population.shape[0]
    block = cpu_block(size, rollouts)
    if block == size:
        return sharding.replicated(jax.vmap(one)(sharding.shard_leading(population)))
    # One CPU: blocks of candidates one after the other, so a step's working set stays in cache
    # (docs/PERFORMANCE.md); every block sees the same starts and noise.
    blocks = population.reshape((size // block, block) + population.shape[1:])
    return jax.lax.map(jax.vmap(one), blocks).reshape(size)


CPU_BLOCK_ROWS = 1024  # dreams stepped together on a CPU: measured best on 2 cores (docs/PERFORMANCE.md)


def cpu_block(population: int, rollouts: int) -> int:
    """How many candidates one device scores together: on a single CPU device the largest divisor
    of `population` whose dreams fit CPU_BLOCK_ROWS (at least 1); elsewhere all of them (a GPU
    wants the largest matmul, and several devices split the population between them)."""
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        return population
    fits = max(1, CPU_BLOCK_ROWS // rollouts)
    return max(d for d in range(1, min(fits, population) + 1) if population % d == 0)


@partial(jax.jit, static_argnums=(0, 9, 10))
def _score_jit(cfg, hp, key, m_params, population, mean, logvar, k_params, pool, rollouts, horizon):
    return scores(cfg, hp, key, m_params, population, mean, logvar, rollouts, horizon, k_params, pool)


def score_population(
    cfg: Config, key: jax.Array, m_params: Any, population: jax.Array, mean: jax.Array, logvar: jax.Array,
    rollouts: int | None = None, horizon: int | None = None, k_params: Any = None, pool: Pool | None = None,
    hp: dict[str, Any] | None = None,
) -> jax.Array:
    """Jitted `scores` over every device: one call scores a whole generation.

    rollouts and horizon default to cfg.evolve's; hp (default cfg.hyper()) holds tau, the
    verifier's threshold and the grounding share."""
    rollouts = cfg.evolve.rollouts if rollouts is None else rollouts
    horizon = cfg.evolve.horizon if horizon is None else horizon
    hp = cfg.hyper() if hp is None else hp
    args = sharding.put_replicated((hp, key, m_params, population, mean, logvar, k_params, pool))
    return _score_jit(cfg.static(), *args, rollouts, horizon)
