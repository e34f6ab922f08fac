"""What every way of searching C in the dream shares: the world it dreams in and checks against,
the fitness and the real check, the check of a candidate (with its confirming episodes), the
metrics a check logs, and the interface a trainer has.

A trainer (CMA-ES in wm_jax.search.evolve, PPO in wm_jax.search.ppo) is a `Trainer`: `init(cfg, hp, key, world,
init_mean) -> state` and `period(cfg, hp, world, state, key, gens, score, check, batched) ->
(state, metrics)`, a pure state machine whose state has the fields the driver reads (best,
best_real, generation, real_env_steps, pool). wm_jax.search.driver keeps the registry and drives either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from wm_jax import envs
from wm_jax.search import dream, rollout
from wm_jax.config import Config, ConfigError


@struct.dataclass
class World:
    """What a controller search dreams in and checks against: shared by every cell of a sweep or,
    with `cells` (a batch of seeds, each its own world), every leaf with a leading axis of cells;
    then `rows` [cells] counts each cell's stored posteriors (the rows after it pad `starts`)."""

    m_params: Any
    vae_params: Any  # for the real checks (encoding the pixels); unused by a custom `check`
    starts: tuple[jax.Array, jax.Array]  # stored encoder posteriors (mean, logvar) [N, latent]
    k_params: Any = None  # the verifier's, when cfg.verifier.mode is not "off"
    rows: Any = None  # how many rows of starts exist (None: all)
    cells: bool = struct.field(pytree_node=False, default=False)

    def axis(self) -> Any:
        """vmap's in_axes for this world over the cells: 0 for a world per cell, None for a shared one."""
        return 0 if self.cells else None


Score = Callable[[Config, dict, jax.Array, World, jax.Array, dream.Pool], jax.Array]
Check = Callable[[Config, dict, jax.Array, World, jax.Array], dict]




@dataclass(frozen=True)
class Trainer:
    """One way to search C in the dream, as the driver (wm_jax.search.driver.search) runs it."""

    init: Callable[..., Any]  # (cfg, hp, key, world, init_mean) -> state
    period: Callable[..., tuple[Any, dict[str, jax.Array]]]  # (cfg, hp, world, state, key, gens, score, check, batched)
    generation_metrics: tuple[str, ...]  # a period's per-generation metrics (generations.jsonl)
    imagined_steps_per_generation: Callable[[Config], int]  # dreamed steps a generation computes


def score_candidates(cfg: Config, hp: dict[str, Any], key: jax.Array, world: World, population: jax.Array,
                     pool: dream.Pool) -> jax.Array:
    """The default fitness: mean dream return of each candidate (dream.scores)."""
    ev = cfg.evolve
    return dream.scores(cfg, hp, key, world.m_params, population, *world.starts, ev.rollouts, ev.horizon,
                        world.k_params, pool, world.rows)


def real_check(cfg: Config, hp: dict[str, Any], key: jax.Array, world: World, ctrl: jax.Array) -> dict[str, Any]:
    """The default check: cfg.evolve.check_episodes real episodes of V + M + ctrl (pure, traceable).

    Returns return_mean, env_steps and latents = (mean, logvar, valid) of every visited step
    [check_episodes * eval.max_steps, ...], the next grounding pool. The episodes are those of
    rollout.evaluate(..., batch=check_episodes) with the same key.
    """
    params = {"vae": world.vae_params, "transition": world.m_params, "controller": ctrl}
    res = rollout.episodes(cfg, params, jax.random.fold_in(key, 0), cfg.evolve.check_episodes, cfg.eval.max_steps,
                           latents=True)
    rows = cfg.evolve.check_episodes * cfg.eval.max_steps
    return {
        "return_mean": jnp.mean(res["return"]),
        "env_steps": jnp.sum(res["length"]).astype(jnp.int32),
        "latents": (res["latent_mean"].reshape(rows, -1), res["latent_logvar"].reshape(rows, -1),
                    res["latent_valid"].reshape(rows)),
        "returns": res["return"], "lengths": res["length"],  # per episode, for sequential checks
    }


def played(returns: jax.Array, prior_sum: jax.Array, prior: int, total: int, need: float,
           ceiling: float) -> jax.Array:
    """Which of a sequential check's episodes (in order, float mask) it plays: each while the check
    of `total` episodes can still reach a mean of `need`, given the `prior` episodes' returns
    (`prior_sum`), those played before it and `ceiling` for every episode still to play."""
    before = prior_sum + jnp.cumsum(returns) - returns
    rest = total - prior - jnp.arange(returns.shape[0])
    return jnp.cumprod(before + rest * ceiling >= total * need).astype(jnp.float32)


def _sequential_candidate(cfg: Config, hp: dict[str, Any], world: World, key_c: jax.Array, candidate: jax.Array,
                          check: Check, real: dict[str, Any]) -> dict[str, Any]:
    """check_candidate's real check with evolve.sequential: its episodes, then (once they pass) its
    confirming ones, counted one after another until the check can no longer pass."""
    ev = cfg.evolve
    if "returns" not in real or "lengths" not in real:
        raise ConfigError("evolve.sequential needs a check that gives each episode's return and length "
                          "(\"returns\", \"lengths\"), as checks.real_check does")
    n, m, need = ev.check_episodes, ev.confirm_episodes, ev.stop_at
    ceiling = envs.most_return(cfg.env, cfg.eval.max_steps)
    mask = played(real["returns"], jnp.zeros(()), 0, n, need, ceiling)
    count, total = jnp.sum(mask), jnp.sum(mask * real["returns"])
    steps = jnp.sum(mask * real["lengths"]).astype(jnp.int32)
    mean, logvar, valid = real["latents"]  # the next dreams are grounded on the played episodes only
    latents = (mean, logvar, (valid * jnp.repeat(mask, valid.shape[0] // n)).astype(valid.dtype))
    passed = (count == n) & (total / n >= need)
    if m:
        def confirm(_):
            c = check(with_check_episodes(cfg, m), hp, jax.random.fold_in(key_c, 2), world, candidate)
            more = played(c["returns"], total, n, n + m, need, ceiling)
            return jnp.sum(more), jnp.sum(more * c["returns"]), jnp.sum(more * c["lengths"]).astype(jnp.int32)

        def skip(_):
            return jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32)

        c_count, c_total, c_steps = jax.lax.cond(passed, confirm, skip, None)
        count, total, steps = count + c_count, total + c_total, steps + c_steps
    out = {**real, "return_mean": total / jnp.maximum(count, 1.0), "env_steps": steps, "latents": latents,
           "episodes": count}
    if m:
        out["confirm_return"] = jnp.where(passed, c_total / jnp.maximum(c_count, 1.0), jnp.nan)
    return out


def check_candidate(cfg: Config, hp: dict[str, Any], world: World, pool: dream.Pool, key_run: jax.Array,
                    done: jax.Array, candidate: jax.Array, score: Score, check: Check) -> tuple[jax.Array, dict]:
    """A search's check after `done` generations: the candidate's dream return (scored like the
    generations before it, on `pool`) and its real check. Both trainers check this way."""
    key_c = jax.random.fold_in(key_run, 10_000_000 + done)
    dream_return = score(cfg, hp, key_c, world, candidate[None], pool)[0]
    real = check(cfg, hp, jax.random.fold_in(key_c, 1), world, candidate)
    ev = cfg.evolve
    if ev.sequential:
        return dream_return, _sequential_candidate(cfg, hp, world, key_c, candidate, check, real)
    if not ev.confirm_episodes:
        return dream_return, real
    # A check at stop_at is confirmed by confirm_episodes more episodes (the pool stays the first
    # check's); a check below it runs none (lax.cond: under a sweep's vmap both branches are
    # computed, but only a passing cell's confirming episodes are counted or used).
    more = with_check_episodes(cfg, ev.confirm_episodes)
    passed = real["return_mean"] >= ev.stop_at

    def confirm(_):
        c = check(more, hp, jax.random.fold_in(key_c, 2), world, candidate)
        return c["return_mean"].astype(jnp.float32), c["env_steps"].astype(jnp.int32)

    def skip(_):
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

    c_mean, c_steps = jax.lax.cond(passed, confirm, skip, None)
    n, m = ev.check_episodes, ev.confirm_episodes
    return dream_return, {**real, "return_mean": jnp.where(passed, (n * real["return_mean"] + m * c_mean) / (n + m),
                                                           real["return_mean"]),
                          "env_steps": real["env_steps"] + c_steps,
                          "confirm_return": jnp.where(passed, c_mean, jnp.nan)}


def with_check_episodes(cfg: Config, episodes: int) -> Config:
    """cfg (a static one: its traced fields are markers, which dataclasses.replace would
    validate) with evolve.check_episodes = episodes."""
    ev = copy.copy(cfg.evolve)
    object.__setattr__(ev, "check_episodes", episodes)
    out = copy.copy(cfg)
    object.__setattr__(out, "evolve", ev)
    return out


def check_metrics(real: dict[str, Any]) -> dict[str, jax.Array]:
    """A check's figures for the period's metrics (evolve.jsonl): its real return and steps, and
    the confirming episodes' mean when evolve.confirm_episodes is on (NaN where none ran)."""
    out = {"real_return": real["return_mean"], "env_steps": real["env_steps"],
           "grounding_states": jnp.sum(real["latents"][2], axis=-1).astype(jnp.int32)}
    if "confirm_return" in real:
        out["confirm_return"] = real["confirm_return"]
    if "episodes" in real:  # sequential checks: the episodes it played
        out["episodes"] = real["episodes"].astype(jnp.int32)
    return out
