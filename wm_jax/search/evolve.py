"""Evolve C inside M's dreams with evosax CMA-ES: the first trainer (`TRAINER`, a checks.Trainer).

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
(wm_jax.search.sweep). wm_jax.search.driver drives the periods. evosax minimizes, so the fitness handed to
`tell` is the negated return.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from evosax.algorithms import CMA_ES
from flax import struct

from wm_jax import sharding
from wm_jax.models import controller
from wm_jax.search import checks, dream
from wm_jax.config import Config


@struct.dataclass
class EvolveState:
    es: Any  # evosax CMA-ES state
    pool: dream.Pool  # real states the latest checked mean reached (grounded dream starts)
    best: jax.Array  # [dims]: the checked CMA-ES mean with the best real return so far
    best_real: jax.Array  # its real return (-inf before the first check)
    generation: jax.Array  # int32: generations done
    real_env_steps: jax.Array  # int32: env steps spent in real checks


GENERATION_METRICS = ("dream_mean", "dream_max")  # a period's per-generation metrics (generations.jsonl)


def num_dims(cfg: Config, world: checks.World) -> int:
    return controller.num_params(cfg.controller, world.starts[0].shape[-1], cfg.transition.hidden)


def _strategy(cfg: Config, world: checks.World) -> CMA_ES:
    """CMA-ES with population cfg.evolve.population: static, like evosax's strategy object."""
    return CMA_ES(population_size=cfg.evolve.population, solution=jnp.zeros((num_dims(cfg, world),), jnp.float32))


def _es_params(es: CMA_ES, hp: dict[str, Any]) -> Any:
    """evosax's traced params: the defaults with the initial step size sigma from hp."""
    return es.default_params.replace(std_init=jnp.asarray(hp["evolve"]["sigma"], jnp.float32))


def init(cfg: Config, hp: dict[str, Any], key: jax.Array, world: checks.World, init_mean: jax.Array | None = None
         ) -> EvolveState:
    """The search's start: CMA-ES around init_mean (default zeros) with step size sigma; the pool
    a random draw of the stored posteriors, in the shape the real checks refresh it with."""
    dims = num_dims(cfg, world)
    es = _strategy(cfg, world)
    key_init, _ = jax.random.split(key)
    mean0 = jnp.zeros((dims,), jnp.float32) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    rows = jax.random.randint(jax.random.fold_in(key_init, 1), (cfg.evolve.check_episodes * cfg.eval.max_steps,), 0,
                              world.starts[0].shape[0] if world.rows is None else world.rows)
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


def period(cfg: Config, hp: dict[str, Any], world: checks.World, state: EvolveState, key: jax.Array, gens: int,
           score: checks.Score = checks.score_candidates, check: checks.Check = checks.real_check, batched: bool = False,
           ) -> tuple[EvolveState, dict[str, jax.Array]]:
    """`gens` CMA-ES generations, then the real check of the mean, the pool refresh and the best update.

    key is the search's key (the same for every period): generation g and the check after it fold
    their counters into it, so the result does not depend on how the search is cut into calls.
    A check's dream_return is scored like the generations before it: on the previous check's pool.

    With `batched`, hp, state and key carry a leading axis of cells (wm_jax.search.sweep): the dreams and
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

    def in_world(fn, *xs):  # all cells at once, each in its own world when the world has cells
        return jax.vmap(fn, in_axes=(world.axis(),) + (0,) * len(xs))(world, *xs) if batched else fn(world, *xs)

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
        returns = in_world(lambda w, h, k, p, pool: score(cfg, h, k, w, p, pool), hp, key_eval, population, state.pool)
        es_state, _ = each(es.tell, key_tell, population, -returns, es_state, es_params)  # evosax minimizes
        return es_state, {"dream_mean": jnp.mean(returns, axis=-1), "dream_max": jnp.max(returns, axis=-1)}

    es_state, history = jax.lax.scan(generation, state.es, jnp.swapaxes(keys, 0, 1) if batched else keys)
    history = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), history) if batched else history  # cells first
    done = state.generation + gens
    mean = es_state.mean  # the CMA-ES mean (es.get_mean)
    dream_return, real = in_world(lambda w, h, pool, k, d, m: checks.check_candidate(cfg, h, w, pool, k, d, m, score,
                                                                                    check),
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
    metrics = {**history, "generation": done, "dream_return": dream_return, **checks.check_metrics(real)}
    return new, metrics


def imagined_steps_per_generation(cfg: Config) -> int:
    """Every candidate dreams evolve.rollouts dreams of the full horizon (an ended one is masked)."""
    ev = cfg.evolve
    return ev.population * ev.rollouts * ev.horizon


TRAINER = checks.Trainer(init=init, period=period, generation_metrics=GENERATION_METRICS,
                         imagined_steps_per_generation=imagined_steps_per_generation)
