"""The one driver of every controller search, and the registry of trainers.

    TRAINERS["cmaes" | "ppo"]        # checks.Trainer: init and period, a pure state machine each
    driver.evolve(cfg, key, world, out_dir)          # one search under cfg.evolve.trainer
    driver.search(cfg, keys, world, out_dir, batched=True)   # a batch of cells as one program (wm_jax.search.sweep)

`search` drives a trainer's `period` from Python: it only logs, draws the progress bar and
checkpoints the state after every period, so a killed search resumes where it stopped and ends
with the same result. Checks land every evolve.check_every generations; evolve.stop_at and a
budget of real steps end a search early.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from wm_jax import logs, sharding
from wm_jax.search import checks, evolve, ppo
from wm_jax.store.resume import Resumable
from wm_jax.config import Config, ConfigError

TRAINERS: dict[str, checks.Trainer] = {"cmaes": evolve.TRAINER, "ppo": ppo.TRAINER}  # config.TRAINERS names them


def trainer(cfg: Config) -> checks.Trainer:
    """The trainer cfg.evolve.trainer names."""
    return TRAINERS[cfg.evolve.trainer]


def imagined_steps(cfg: Config, generations: int, num_checks: int) -> int:
    """Imagined steps a search computes in `generations` generations and `num_checks` checks
    (dreams that end early are masked, not cut short, so every step of the horizon is computed)."""
    ev = cfg.evolve
    return generations * trainer(cfg).imagined_steps_per_generation(cfg) + num_checks * ev.rollouts * ev.horizon


@partial(jax.jit, static_argnums=(0, 5))
def _init_cells(cfg, hp, keys, world, init_mean, batched):
    init_fn = trainer(cfg).init
    if not batched:
        return init_fn(cfg, hp, keys, world, init_mean)
    return jax.vmap(lambda w, h, k, m: init_fn(cfg, h, k, w, m), in_axes=(world.axis(), 0, 0, 0))(
        world, hp, keys, init_mean)


@partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _period_cells(cfg, hp, world, state, keys, gens, score, check, batched):
    if batched:  # one cell per (seed, hyperparameters), split over the devices
        hp, state, keys = sharding.shard_leading((hp, state, keys))
    return sharding.replicated(trainer(cfg).period(cfg, hp, world, state, keys, gens, score, check, batched))


def _period_of(cfg, hp, world, state, keys, gens, score, check, idx):
    """A period of the batch's cells `idx` only (the others stopped and cost nothing): the program
    runs on those cells (one compile per count of cells), and their new state is written back."""
    take = lambda tree: jax.tree.map(lambda x: x[idx], tree)  # noqa: E731
    part, m = _period_cells(cfg, take(hp), take(world) if world.cells else world, take(state), keys[idx], gens,
                            score, check, True)
    state = jax.tree.map(lambda full, new: full.at[idx].set(new), state, part)
    m = jax.device_get(m)
    full = jax.tree.map(lambda x: np.zeros((len(state.best_real),) + np.shape(x)[1:], np.asarray(x).dtype), m)
    for k in full:
        full[k][idx] = m[k]
    return state, full


def stopped(ev: Any, real_steps: Any, done: int, state: Any, active: Any = None, reserve: int = 0) -> np.ndarray:
    """Which cells need no more periods (bool[cells], or a 0-d bool for a lone search): the best
    check reached evolve.stop_at, or (after the first period) the real steps allowed, `real_steps`
    (one count, or one per cell; None: no limit), leave less than `reserve` (Config.check_reserve)
    or none, or `active` marks it False."""
    best, steps = (np.asarray(jax.device_get(x)) for x in (state.best_real, state.real_env_steps))
    out = np.zeros(best.shape, bool) if active is None else ~np.asarray(active, bool)
    if ev.stop_at is not None:
        out |= best >= ev.stop_at
    if real_steps is not None and done > 0:
        out |= np.asarray(real_steps) - steps < max(reserve, 1)
    return out


def _period_rows(tr: checks.Trainer, m: dict[str, Any], done: int, gens: int, cells: int, batched: bool,
                 active: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A period's log rows: one per generation and active cell (generations.jsonl) and one per
    check and active cell (evolve.jsonl), from its metrics."""
    m = m if batched else jax.tree.map(lambda x: np.asarray(x)[None], m)
    history, logged = [], []
    for c in range(cells):
        if not active[c]:
            continue
        cell = {"cell": c} if batched else {}
        for i in range(gens):
            history.append({**cell, "generation": done + i + 1,
                            **{k: float(m[k][c][i]) for k in tr.generation_metrics}})
        logged.append({**history[-1], "dream_return": float(m["dream_return"][c]),
                       "real_return": float(m["real_return"][c]), "env_steps": int(m["env_steps"][c]),
                       "grounding_states": int(m["grounding_states"][c]),
                       **({"confirm_return": logs.finite_or_none(float(m["confirm_return"][c]))}
                          if "confirm_return" in m else {}),
                       **({"episodes": int(m["episodes"][c])} if "episodes" in m else {})})
    return history, logged


def search(
    cfg: Config,
    keys: jax.Array,
    world: checks.World,
    out_dir: Path | str,
    hp: dict[str, Any] | None = None,
    init_mean: jax.Array | None = None,
    progress: bool = True,
    score: checks.Score = checks.score_candidates,
    check: checks.Check = checks.real_check,
    batched: bool = False,
    real_steps: Any = None,
    cells_active: Any = None,
) -> list[dict[str, Any]]:
    """Drive `period` to cfg.evolve.generations for one search or, with `batched`, for a batch of
    cells (keys [N], every leaf of hp and init_mean with a leading N) vmapped as one program.

    Checks land every check_every generations and at the end. A search (each cell of a batch on its
    own: its state then stands still and logs nothing more) ends after its first check whose best
    real return reaches evolve.stop_at, or whose checks have spent `real_steps` real env steps (the
    run's budget left, rounds.budget; one count per cell allowed; with evolve.sequential, once what is
    left cannot cover a check's worst case, Config.check_reserve); `cells_active` (bool[N]) leaves
    out the cells it marks False. With world.cells each cell searches in its own world (a batch of
    seeds, wm_jax.seeds). Writes out_dir/evolve.jsonl (one line per check and cell),
    out_dir/generations.jsonl (one per generation and cell) and a checkpoint of the state after
    every period (out_dir/checkpoints; a rerun resumes from it). Returns one dict per cell: best,
    best_real, checks, history, real_env_steps, generations (done), wall_s.
    """
    ev = cfg.evolve
    if world.cells and not batched:
        raise ConfigError("a world per cell (World.cells) needs a batched search")
    hp = cfg.hyper() if hp is None else hp
    cells = int(keys.shape[0]) if batched else 1
    static = cfg.static()
    world, hp, keys, init_mean = sharding.put_replicated((world, hp, keys, init_mean))
    stored = {"config": cfg.to_dict(), "hyper": jax.tree.map(lambda x: np.asarray(x).tolist(), hp),
              "cells": cells, "score": getattr(score, "__qualname__", str(score)),
              "check": getattr(check, "__qualname__", str(check))}
    loop = Resumable(out_dir, _init_cells(static, hp, keys, world, init_mean, batched), stored,
                     ("generations.jsonl", "evolve.jsonl"), "generation", ev.generations, ev.trainer, "gen", progress)
    # committed as the periods' outputs are (the world's restored parameters are): otherwise the
    # second period compiles the program again (7 s a round on the cpu preset)
    state = sharding.commit(loop.state)
    t0 = time.perf_counter()
    with loop:
        for done in loop.chunks():
            halted = stopped(ev, real_steps, done, state, cells_active, cfg.check_reserve())
            if halted.all():
                break
            gens = min(ev.check_every - done % ev.check_every, ev.generations - done)
            idx = np.flatnonzero(~halted) if batched and halted.any() else None  # only the cells still searching
            state, m = (_period_cells(static, hp, world, state, keys, gens, score, check, batched) if idx is None
                        else _period_of(static, hp, world, state, keys, gens, score, check, idx))
            history, checks_logged = _period_rows(trainer(cfg), jax.device_get(m), done, gens, cells, batched,
                                                  ~halted.reshape(-1))
            loop.record(gens, state, {"generations.jsonl": history, "evolve.jsonl": checks_logged}, save=True)
            if not batched:
                e = checks_logged[0]
                loop.bar.write(f"  gen {loop.done:4d}  dream {e['dream_return']:7.2f}  real {e['real_return']:7.2f}")
    return _results(loop, jax.device_get(state), cells, batched, time.perf_counter() - t0)


def _results(loop: Resumable, state: Any, cells: int, batched: bool, wall: float) -> list[dict[str, Any]]:
    """One dict per cell: its best candidate and real return, its logged checks and generations."""
    def mine(name: str, c: int) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "cell"} for e in loop.logged[name] if e.get("cell", 0) == c]

    out = []
    for c in range(cells):
        best, best_real, steps, gens = (np.asarray(x)[c] if batched else np.asarray(x)
                                        for x in (state.best, state.best_real, state.real_env_steps, state.generation))
        out.append({"best": best, "best_real": float(best_real), "checks": mine("evolve.jsonl", c),
                    "history": mine("generations.jsonl", c), "real_env_steps": int(steps),
                    "generations": int(gens), "wall_s": wall})
    return out


def evolve(
    cfg: Config, key: jax.Array, world: checks.World, out_dir: Path | str, init_mean: jax.Array | None = None,
    progress: bool = True, hp: dict[str, Any] | None = None, score: checks.Score = checks.score_candidates,
    check: checks.Check = checks.real_check, real_steps: int | None = None,
) -> dict[str, Any]:
    """One controller search (see `search`): cfg.evolve.generations generations from init_mean.

    Returns {"best", "best_real", "checks", "history", "real_env_steps", "generations", "wall_s"}; the best is
    the checked candidate (CMA-ES's mean, PPO's greedy actor) with the best real return.
    """
    return search(cfg, key, world, out_dir, hp, init_mean, progress, score, check, real_steps=real_steps)[0]
