"""Evolve C inside M's dreams with evosax CMA-ES; check the CMA-ES mean in the real environment.

The search is a pure state machine (purejaxrl's `make_train` shape, evosax's static strategy with
traced params):
- `init(cfg, hp, key, world)` -> EvolveState: the CMA-ES state, the pool of grounded starts, the
  best checked candidate and its real return, the counters;
- `period(cfg, hp, world, state, key, gens)` -> (state, metrics): `gens` generations (a
  `lax.scan` over ask -> score in the dream -> tell), then the real check of the CMA-ES mean (real
  episodes are JAX too), the refresh of the grounding pool from the states it reached, and the
  update of the best candidate, all in one jitted program.
cfg is static (`cfg.static()`: population, horizon, rollouts, check sizes, verifier mode); hp
(`cfg.hyper()`) is traced: sigma, tau, the verifier's threshold and the grounding share, so a
new value never compiles again and `jax.vmap` runs a grid of them (and of seeds) as one program
(wm_jax.sweep). `search` (and `evolve`, one search) drives the periods from Python: it only
logs, draws the progress bar and checkpoints the state after every period, so a killed search
resumes where it stopped and ends with the same result. evosax minimizes, so the fitness handed to `tell` is the negated return.

`search` drives PPO in the dream (wm_jax.ppo, cfg.evolve.trainer = "ppo") the same way: ppo.init
and ppo.period have this module's signatures and metrics (`trainer(cfg)` picks the module).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES
from flax import struct
from tqdm.auto import tqdm

from wm_jax import checkpoint, controller, dream, interrupt, logs, rollout, run_dir, sharding
from wm_jax.config import Config


@struct.dataclass
class World:
    """What a controller search dreams in and checks against; shared by every cell of a sweep."""

    m_params: Any
    vae_params: Any  # for the real checks (encoding the pixels); unused by a custom `check`
    starts: tuple[jax.Array, jax.Array]  # stored encoder posteriors (mean, logvar) [N, latent]
    k_params: Any = None  # the verifier's, when cfg.verifier.mode is not "off"


@struct.dataclass
class EvolveState:
    es: Any  # evosax CMA-ES state
    pool: dream.Pool  # real states the latest checked mean reached (grounded dream starts)
    best: jax.Array  # [dims]: the checked CMA-ES mean with the best real return so far
    best_real: jax.Array  # its real return (-inf before the first check)
    generation: jax.Array  # int32: generations done
    real_env_steps: jax.Array  # int32: env steps spent in real checks


GENERATION_METRICS = ("dream_mean", "dream_max")  # a period's per-generation metrics (generations.jsonl)

Score = Callable[[Config, dict, jax.Array, World, jax.Array, dream.Pool], jax.Array]
Check = Callable[[Config, dict, jax.Array, World, jax.Array], dict]


def num_dims(cfg: Config, world: World) -> int:
    return controller.num_params(cfg.controller, world.starts[0].shape[-1], cfg.transition.hidden)


def _strategy(cfg: Config, world: World) -> CMA_ES:
    """CMA-ES with population cfg.evolve.population: static, like evosax's strategy object."""
    return CMA_ES(population_size=cfg.evolve.population, solution=jnp.zeros((num_dims(cfg, world),), jnp.float32))


def _es_params(es: CMA_ES, hp: dict[str, Any]) -> Any:
    """evosax's traced params: the defaults with the initial step size sigma from hp."""
    return es.default_params.replace(std_init=jnp.asarray(hp["evolve"]["sigma"], jnp.float32))


def score_candidates(cfg: Config, hp: dict[str, Any], key: jax.Array, world: World, population: jax.Array,
                     pool: dream.Pool) -> jax.Array:
    """The default fitness: mean dream return of each candidate (dream.scores)."""
    ev = cfg.evolve
    return dream.scores(cfg, hp, key, world.m_params, population, *world.starts, ev.rollouts, ev.horizon,
                        world.k_params, pool)


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
    }


def init(cfg: Config, hp: dict[str, Any], key: jax.Array, world: World, init_mean: jax.Array | None = None
         ) -> EvolveState:
    """The search's start: CMA-ES around init_mean (default zeros) with step size sigma; the pool
    a random draw of the stored posteriors, in the shape the real checks refresh it with."""
    dims = num_dims(cfg, world)
    es = _strategy(cfg, world)
    key_init, _ = jax.random.split(key)
    mean0 = jnp.zeros((dims,), jnp.float32) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    rows = jax.random.randint(jax.random.fold_in(key_init, 1), (cfg.evolve.check_episodes * cfg.eval.max_steps,), 0,
                              world.starts[0].shape[0])
    return EvolveState(
        # evosax leaves some fields weakly typed, which a period's output is not: without the
        # explicit dtypes the first period would compile a second program (6 s on the cpu preset)
        es=jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), es.init(key_init, mean0, _es_params(es, hp))),
        pool=(world.starts[0][rows], world.starts[1][rows], jnp.ones(rows.shape, jnp.float32)),
        best=mean0,
        best_real=jnp.asarray(-jnp.inf, jnp.float32),
        generation=jnp.zeros((), jnp.int32),
        real_env_steps=jnp.zeros((), jnp.int32),
    )


def _generation_keys(key_run: jax.Array, start: jax.Array, gens: int, block: int) -> jax.Array:
    """Keys of generations start .. start + gens - 1: blocks of `block` (cfg.evolve.gens_per_call)
    generations draw split(fold_in(key_run, block start), block), as the earlier chunked loop did,
    so searches keep their results (a shorter split is a prefix of a longer one)."""
    return jnp.stack([jax.random.split(jax.random.fold_in(key_run, start + (j // block) * block), block)[j % block]
                      for j in range(gens)])


def period(cfg: Config, hp: dict[str, Any], world: World, state: EvolveState, key: jax.Array, gens: int,
           score: Score = score_candidates, check: Check = real_check, batched: bool = False,
           ) -> tuple[EvolveState, dict[str, jax.Array]]:
    """`gens` CMA-ES generations, then the real check of the mean, the pool refresh and the best update.

    key is the search's key (the same for every period): generation g and the check after it fold
    their counters into it, so the result does not depend on how the search is cut into calls.
    A check's dream_return is scored like the generations before it: on the previous check's pool.

    With `batched`, hp, state and key carry a leading axis of cells (wm_jax.sweep): the dreams and
    the real checks of every cell are vmapped, while CMA-ES's own ask and tell run cell by cell
    (`lax.map`), shaped as in a lone search. The eigendecomposition of a nearly isotropic
    covariance turns last-bit differences into other eigenvectors and so other candidates; mapped,
    a cell's first generation equals its lone search, and the parting comes later (from the
    fitness's own rounding, docs/RESULTS.md section 7) than with a vmapped CMA-ES (generation 2).
    """
    def each(fn, *xs):  # per cell, a lone search's arithmetic
        return jax.lax.map(lambda x: fn(*x), xs) if batched else fn(*xs)

    def every(fn, *xs):  # all cells at once
        return jax.vmap(fn)(*xs) if batched else fn(*xs)

    es = _strategy(cfg, world)
    es_params = every(lambda h: _es_params(es, h), hp)
    key_run = every(lambda k: jax.random.split(k)[1], key)
    keys = every(lambda k, g: _generation_keys(k, g, gens, cfg.evolve.gens_per_call), key_run, state.generation)

    def generation(es_state, key_g):
        split = every(lambda k: jax.random.split(k, 3), key_g)
        key_ask, key_eval, key_tell = split[..., 0], split[..., 1], split[..., 2]
        population, es_state = each(es.ask, key_ask, es_state, es_params)
        # Only the scoring is split over the devices: CMA-ES's update runs whole on every device,
        # as on one device (split, its sums would add up in another order).
        population = sharding.replicated(population)
        returns = every(lambda h, k, p, pool: score(cfg, h, k, world, p, pool), hp, key_eval, population, state.pool)
        es_state, _ = each(es.tell, key_tell, population, -returns, es_state, es_params)  # evosax minimizes
        return es_state, {"dream_mean": jnp.mean(returns, axis=-1), "dream_max": jnp.max(returns, axis=-1)}

    es_state, history = jax.lax.scan(generation, state.es, jnp.swapaxes(keys, 0, 1) if batched else keys)
    history = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), history) if batched else history  # cells first
    done = state.generation + gens
    mean = es_state.mean  # the CMA-ES mean (es.get_mean)
    dream_return, real = every(lambda h, pool, k, d, m: check_candidate(cfg, h, world, pool, k, d, m, score, check),
                               hp, state.pool, key_run, done, mean)
    better = real["return_mean"] > state.best_real
    new = EvolveState(
        es=es_state,
        pool=real["latents"],
        best=jnp.where(better[..., None], mean, state.best),
        best_real=jnp.where(better, real["return_mean"], state.best_real),
        generation=done,
        real_env_steps=state.real_env_steps + real["env_steps"],
    )
    metrics = {**history, "generation": done, "dream_return": dream_return, **check_metrics(real)}
    return new, metrics


def check_candidate(cfg: Config, hp: dict[str, Any], world: World, pool: dream.Pool, key_run: jax.Array,
                    done: jax.Array, candidate: jax.Array, score: Score, check: Check) -> tuple[jax.Array, dict]:
    """A search's check after `done` generations: the candidate's dream return (scored like the
    generations before it, on `pool`) and its real check. Both trainers check this way."""
    key_c = jax.random.fold_in(key_run, 10_000_000 + done)
    dream_return = score(cfg, hp, key_c, world, candidate[None], pool)[0]
    real = check(cfg, hp, jax.random.fold_in(key_c, 1), world, candidate)
    ev = cfg.evolve
    if not ev.confirm_episodes:
        return dream_return, real
    # A check at stop_at is confirmed by confirm_episodes more episodes (the pool stays the first
    # check's); a check below it runs none (lax.cond: under a sweep's vmap both branches are
    # computed, but only a passing cell's confirming episodes are counted or used).
    more = _with_check_episodes(cfg, ev.confirm_episodes)
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


def _with_check_episodes(cfg: Config, episodes: int) -> Config:
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
    return out


def trainer(cfg: Config) -> Any:
    """The module whose `init` and `period` search C under cfg.evolve.trainer: this one (CMA-ES)
    or wm_jax.ppo."""
    if cfg.evolve.trainer == "ppo":
        from wm_jax import ppo  # it imports this module

        return ppo
    import sys

    return sys.modules[__name__]


def imagined_steps(cfg: Config, generations: int, checks: int) -> int:
    """Imagined steps a search computes in `generations` generations and `checks` checks (dreams
    that end early are masked, not cut short, so every step of the horizon is computed)."""
    ev = cfg.evolve
    if ev.trainer == "ppo":
        from wm_jax import ppo

        per_generation = ppo.imagined_steps_per_generation(cfg)
    else:
        per_generation = ev.population * ev.rollouts * ev.horizon
    return generations * per_generation + checks * ev.rollouts * ev.horizon


@partial(jax.jit, static_argnums=(0, 5))
def _init_cells(cfg, hp, keys, world, init_mean, batched):
    init_fn = trainer(cfg).init
    if not batched:
        return init_fn(cfg, hp, keys, world, init_mean)
    return jax.vmap(lambda h, k, m: init_fn(cfg, h, k, world, m))(hp, keys, init_mean)


@partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _period_cells(cfg, hp, world, state, keys, gens, score, check, batched):
    if batched:  # one cell per (seed, hyperparameters), split over the devices
        hp, state, keys = sharding.shard_leading((hp, state, keys))
    return sharding.replicated(trainer(cfg).period(cfg, hp, world, state, keys, gens, score, check, batched))


def _read_jsonl(path: Path, upto: int) -> list[dict[str, Any]]:
    """The lines of a log whose generation is <= upto, rewritten atomically (a resumed search
    drops what was logged after its checkpoint; a torn last line from a crash is dropped too)."""
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("generation", upto + 1) <= upto:
                keep.append(entry)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
    os.replace(tmp, path)
    return keep


def search(
    cfg: Config,
    keys: jax.Array,
    world: World,
    out_dir: Path | str,
    hp: dict[str, Any] | None = None,
    init_mean: jax.Array | None = None,
    progress: bool = True,
    score: Score = score_candidates,
    check: Check = real_check,
    batched: bool = False,
    real_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Drive `period` to cfg.evolve.generations for one search or, with `batched`, for a batch of
    cells (keys [N], every leaf of hp and init_mean with a leading N) vmapped as one program.

    Checks land every check_every generations and at the end; with evolve.stop_at, the search ends
    after the first check at which every cell's best real return reaches it; with real_steps, after
    the first check at which every cell's checks have spent that many real env steps (the run's
    budget left, rounds.budget). Writes
    out_dir/evolve.jsonl (one line per check and cell), out_dir/generations.jsonl (one per
    generation and cell) and a checkpoint of the state after every period (out_dir/checkpoints; a
    rerun resumes from it). Returns one dict per cell: best, best_real, checks, history, real_env_steps, generations (done), wall_s.
    """
    ev = cfg.evolve
    hp = cfg.hyper() if hp is None else hp
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = int(keys.shape[0]) if batched else 1
    static = cfg.static()
    world, hp, keys, init_mean = sharding.put_replicated((world, hp, keys, init_mean))
    state = _init_cells(static, hp, keys, world, init_mean, batched)
    stored = {"config": cfg.to_dict(), "hyper": jax.tree.map(lambda x: np.asarray(x).tolist(), hp),
              "cells": cells, "score": getattr(score, "__qualname__", str(score)),
              "check": getattr(check, "__qualname__", str(check))}
    restored = checkpoint.restore_latest(out_dir / "checkpoints", state, stored, set_aside=True)
    done = 0 if restored is None else int(restored[0])
    # committed as the periods' outputs are (the world's restored parameters are): otherwise the
    # second period compiles the program again (7 s a round on the cpu preset)
    state = sharding.commit(state if restored is None else restored[1])
    checks = _read_jsonl(out_dir / "evolve.jsonl", done)
    history = _read_jsonl(out_dir / "generations.jsonl", done)
    mngr = checkpoint.manager(out_dir / "checkpoints")
    t0 = time.perf_counter()
    bar = tqdm(total=ev.generations, initial=done, desc=ev.trainer, unit="gen", disable=not progress, leave=False)

    per_generation = trainer(cfg).GENERATION_METRICS  # logged in generations.jsonl

    def solved() -> bool:  # every cell's best check reached evolve.stop_at: no more real checks needed
        return ev.stop_at is not None and bool(np.all(np.asarray(jax.device_get(state.best_real)) >= ev.stop_at))

    def spent() -> bool:  # every cell's checks spent the real steps allowed: no more real checks
        return (real_steps is not None and done > 0
                and bool(np.all(np.asarray(jax.device_get(state.real_env_steps)) >= real_steps)))

    try:
        while done < ev.generations and not solved() and not spent():
            interrupt.check()  # Ctrl-C between periods: the last checkpoint is whole
            gens = min(ev.check_every - done % ev.check_every, ev.generations - done)
            state, m = _period_cells(static, hp, world, state, keys, gens, score, check, batched)
            m = jax.device_get(m)
            m = m if batched else jax.tree.map(lambda x: np.asarray(x)[None], m)
            new_history, new_checks = [], []
            for c in range(cells):
                cell = {"cell": c} if batched else {}
                for i in range(gens):
                    new_history.append({**cell, "generation": done + i + 1,
                                        **{k: float(m[k][c][i]) for k in per_generation}})
                new_checks.append({**new_history[-1], "dream_return": float(m["dream_return"][c]),
                                   "real_return": float(m["real_return"][c]), "env_steps": int(m["env_steps"][c]),
                                   "grounding_states": int(m["grounding_states"][c]),
                                   **({"confirm_return": run_dir.finite_or_none(float(m["confirm_return"][c]))}
                                      if "confirm_return" in m else {})})
            for path, entries in (("generations.jsonl", new_history), ("evolve.jsonl", new_checks)):
                logs.append(out_dir / path, entries, step="generation")
            history += new_history
            checks += new_checks
            done += gens
            checkpoint.save(mngr, done, state, stored)
            bar.update(gens)
            if not batched:
                e = new_checks[0]
                bar.write(f"  gen {done:4d}  dream {e['dream_return']:7.2f}  real {e['real_return']:7.2f}")
    finally:
        bar.close()
        mngr.close()
    wall = time.perf_counter() - t0
    state = jax.device_get(state)
    out = []
    for c in range(cells):
        best, best_real, steps = (np.asarray(x)[c] if batched else np.asarray(x)
                                  for x in (state.best, state.best_real, state.real_env_steps))
        mine = [{k: v for k, v in e.items() if k != "cell"} for e in checks if e.get("cell", 0) == c]
        out.append({
            "best": best,
            "best_real": float(best_real),
            "checks": mine,
            "history": [{k: v for k, v in e.items() if k != "cell"} for e in history if e.get("cell", 0) == c],
            "real_env_steps": int(steps),
            "generations": done,
            "wall_s": wall,
        })
    return out


def evolve(
    cfg: Config, key: jax.Array, world: World, out_dir: Path | str, init_mean: jax.Array | None = None,
    progress: bool = True, hp: dict[str, Any] | None = None, score: Score = score_candidates,
    check: Check = real_check, real_steps: int | None = None,
) -> dict[str, Any]:
    """One controller search (see `search`): cfg.evolve.generations generations from init_mean.

    Returns {"best", "best_real", "checks", "history", "real_env_steps", "generations", "wall_s"}; the best is
    the checked CMA-ES mean with the best real return.
    """
    return search(cfg, key, world, out_dir, hp, init_mean, progress, score, check, real_steps=real_steps)[0]
