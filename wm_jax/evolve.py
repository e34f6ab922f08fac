"""Evolve C inside M's dreams with evosax CMA-ES; check the CMA-ES mean in the real environment.

Several generations run per jitted call (`lax.scan` over ask -> score -> tell); Python drives the
calls, the progress bar and the periodic real checks. evosax minimizes, so the fitness handed to
`tell` is the negated dream return.
"""

from __future__ import annotations

import functools
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES
from tqdm.auto import tqdm

from wm_jax import controller, dream, sharding
from wm_jax.config import Config


@functools.lru_cache(maxsize=16)
def strategy(cfg: Config, num_dims: int) -> tuple[CMA_ES, Any]:
    """CMA-ES for cfg (cached: the strategy is a static jit argument, hashed by identity, so a
    fresh object per call would recompile the generation loop every time)."""
    es = CMA_ES(population_size=cfg.evolve.population, solution=jnp.zeros((num_dims,), jnp.float32))
    return es, es.default_params.replace(std_init=jnp.asarray(cfg.evolve.sigma, jnp.float32))


@partial(jax.jit, static_argnums=(0, 1, 7, 8))
def _generations(cfg, es, es_params, es_state, key, m_params, starts, num_gens, horizon, k_params, pool):
    mean, logvar = starts
    ev = cfg.evolve

    def gen(state, key_g):
        key_ask, key_eval, key_tell = jax.random.split(key_g, 3)
        population, state = es.ask(key_ask, state, es_params)
        # Only the scoring is split over the devices: CMA-ES's update runs whole on every device,
        # as on one device (split, its sums would add up in another order).
        population = sharding.replicated(population)
        returns = dream._score_population(
            cfg, key_eval, m_params, population, mean, logvar, ev.rollouts, horizon, jnp.asarray(ev.tau, jnp.float32),
            k_params, pool,
        )
        state, _ = es.tell(key_tell, population, -returns, state, es_params)  # evosax minimizes
        return state, {"dream_mean": jnp.mean(returns), "dream_max": jnp.max(returns)}

    return jax.lax.scan(gen, es_state, jax.random.split(key, num_gens))


def evolve(
    cfg: Config,
    key: jax.Array,
    m_params: Any,
    starts: tuple[jax.Array, jax.Array],
    real_check: Callable[[jax.Array, jax.Array], dict[str, float]],
    run_dir: Path | str,
    generations: int | None = None,
    init_mean: jax.Array | None = None,
    progress: bool = True,
    horizon: int | None = None,
    k_params: Any = None,
) -> dict[str, Any]:
    """Run CMA-ES for `generations` (default cfg.evolve.generations).

    starts = (mean, logvar) posteriors of real observations to start dreams from.
    real_check(key, ctrl) -> {"return_mean", "env_steps", ...} runs the candidate for real; with
    cfg.evolve.grounding > 0 it must also return "latents" (rollout.evaluate(..., latents=True)):
    the states it reached become the pool that share of the dreams starts from, until the next
    check. Before the first check (and at the start of every call: a later round starts afresh)
    the pool is a random draw of the stored posteriors, check_episodes x cfg.eval.max_steps rows,
    the shape of the pipeline's checks (another shape compiles the generation loop once more). A
    check's dream_return is scored like the generations before it: on the previous check's pool.
    `horizon` overrides cfg.evolve.horizon (the extra rounds' dreams may be longer); k_params are
    the verifier's parameters, needed when cfg.verifier.mode is not "off".
    Every check_every generations (and at the end) the CMA-ES mean is checked for real; the
    candidate with the best real return is kept. Appends to run_dir/evolve.jsonl.
    Returns {"best", "best_real", "checks", "history", "real_env_steps", "wall_s"}.
    """
    ev = cfg.evolve
    gens = ev.generations if generations is None else generations
    horizon = ev.horizon if horizon is None else horizon
    latent, hidden = starts[0].shape[-1], cfg.transition.hidden
    dims = controller.num_params(cfg.controller, latent, hidden)
    es, es_params = strategy(cfg, dims)
    key_init, key_run = jax.random.split(key)
    mean0 = jnp.zeros((dims,), jnp.float32) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    es_state = es.init(key_init, mean0, es_params)
    starts = (jnp.asarray(starts[0]), jnp.asarray(starts[1]))
    pool = None
    if ev.grounding > 0:  # one pool shape throughout (check_episodes x max_steps rows): one compile
        rows = jax.random.randint(jax.random.fold_in(key_init, 1), (ev.check_episodes * cfg.eval.max_steps,), 0,
                                  starts[0].shape[0])
        pool = (starts[0][rows], starts[1][rows], jnp.ones(rows.shape, jnp.float32))
    # The generation loop splits the population over every device (see dream._score_population).
    es_params, es_state, m_params, starts, k_params, pool = sharding.put_replicated(
        (es_params, es_state, m_params, starts, k_params, pool)
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "evolve.jsonl"
    log_path.unlink(missing_ok=True)

    history, checks = [], []
    best, best_real, real_steps = mean0, -np.inf, 0
    t0 = time.perf_counter()
    done = 0
    bar = tqdm(total=gens, desc="evolve", unit="gen", disable=not progress, leave=False)
    while done < gens:
        n = min(ev.gens_per_call, gens - done)
        # Stop each call at the next check so checks land exactly every check_every generations.
        n = min(n, ev.check_every - done % ev.check_every)
        es_state, stats = _generations(
            cfg, es, es_params, es_state, jax.random.fold_in(key_run, done), m_params, starts, n, horizon, k_params,
            pool,
        )
        stats = jax.device_get(stats)
        for i in range(n):
            history.append({"generation": done + i + 1, **{k: float(v[i]) for k, v in stats.items()}})
        done += n
        bar.update(n)
        bar.set_postfix(dream=f"{history[-1]['dream_mean']:.1f}")
        if done % ev.check_every == 0 or done == gens:
            mean = es.get_mean(es_state)
            key_c = jax.random.fold_in(key_run, 10_000_000 + done)
            dream_ret = float(
                dream.score_population(
                    cfg, key_c, m_params, mean[None], starts[0], starts[1], ev.rollouts, horizon, ev.tau, k_params, pool
                )[0]
            )
            real = real_check(jax.random.fold_in(key_c, 1), mean)
            real_steps += int(real["env_steps"])
            entry = {"generation": done, "dream_return": dream_ret, "real_return": float(real["return_mean"])}
            if pool is not None:
                if "latents" not in real:
                    raise ValueError(
                        "EvolveConfig.grounding > 0 needs real_check to return the states it reached under "
                        "'latents' (use rollout.evaluate(..., latents=True))"
                    )
                lat = real["latents"]
                pool = sharding.put_replicated(
                    (jnp.asarray(lat["mean"]), jnp.asarray(lat["logvar"]), jnp.asarray(lat["valid"], jnp.float32))
                )
                entry["grounding_states"] = int(np.sum(lat["valid"]))
            checks.append(entry)
            with open(log_path, "a") as f:
                f.write(json.dumps({**entry, **history[-1]}) + "\n")
            bar.write(f"  gen {done:4d}  dream {dream_ret:7.2f}  real {entry['real_return']:7.2f}")
            if entry["real_return"] > best_real:
                best, best_real = mean, entry["real_return"]
    bar.close()
    return {
        "best": np.asarray(best),
        "best_real": float(best_real),
        "checks": checks,
        "history": history,
        "real_env_steps": real_steps,
        "wall_s": time.perf_counter() - t0,
    }
