"""Tests for the controller search over a seed axis: every cell in its own world (its own V, M and
stored posteriors, padded to one shape) and stopping on its own, each equal to its lone search.

The worlds are the smoke preset's sizes with freshly initialised V and M (random weights), so the
dreams and the real checks (pixel CartPole, V encoding, M's carry) are the real ones, only small.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import transition, vae
from wm_jax.search import checks, driver
from wm_jax.search.evolve import EvolveState
from wm_jax.config import ConfigError
from wm_jax.presets import get_preset, with_trainer

SMOKE = get_preset("smoke")
CFG = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, generations=3, check_every=1),
                          eval=dataclasses.replace(SMOKE.eval, max_steps=30))


def _world(seed: int, rows: int) -> checks.World:
    latent = CFG.vae.latent
    k1, k2 = jax.random.split(jax.random.key(100 + seed))
    return checks.World(
        m_params=transition.init(jax.random.key(seed), CFG.transition, latent),
        vae_params=vae.init(jax.random.key(50 + seed), CFG.vae),
        starts=(jax.random.normal(k1, (rows, latent)), -1.0 + 0.1 * jax.random.normal(k2, (rows, latent))),
    )


def _cells(worlds: list[checks.World]) -> checks.World:
    """The worlds stacked on a leading axis of cells, starts padded to the longest with zeros."""
    n = max(int(w.starts[0].shape[0]) for w in worlds)
    pad = lambda x: jnp.concatenate([x, jnp.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])  # noqa: E731
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[dataclasses.replace(w, starts=tuple(map(pad, w.starts)))
                                                      for w in worlds])
    return dataclasses.replace(stacked, rows=jnp.asarray([w.starts[0].shape[0] for w in worlds], jnp.int32),
                               cells=True)


def test_seeds_each_in_their_own_world_stopping_on_their_own_equal_their_lone_searches(tmp_path):
    """Two seeds' searches as one program: each dreams in its own M, draws starts from its own
    (padded) posteriors and checks through its own V; the first spends its real steps at its first
    check and stops there while the other runs on. Each equals its lone search up to float rounding."""
    worlds = [_world(0, 30), _world(1, 45)]
    keys = jnp.stack([jax.random.key(7), jax.random.key(8)])
    budgets = [1, 10_000]
    batched = driver.search(CFG, keys, _cells(worlds), tmp_path / "seeds", hp=jax.tree.map(
        lambda x: jnp.stack([x, x]), CFG.hyper()), progress=False, batched=True, real_steps=budgets)
    assert [len(r["checks"]) for r in batched] == [1, 3] and [r["generations"] for r in batched] == [1, 3]
    for i, (w, b) in enumerate(zip(worlds, budgets)):
        lone = driver.evolve(CFG, keys[i], w, tmp_path / f"lone{i}", progress=False, real_steps=b)
        assert [c["generation"] for c in batched[i]["checks"]] == [c["generation"] for c in lone["checks"]]
        for x, y in zip(batched[i]["checks"] + batched[i]["history"], lone["checks"] + lone["history"]):
            np.testing.assert_allclose([x[k] for k in y], [y[k] for k in y], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batched[i]["best"], lone["best"], rtol=1e-4, atol=1e-5)
        assert batched[i]["real_env_steps"] == lone["real_env_steps"]
    # resumed from its checkpoint, the finished batch returns the same
    again = driver.search(CFG, keys, _cells(worlds), tmp_path / "seeds", hp=jax.tree.map(
        lambda x: jnp.stack([x, x]), CFG.hyper()), progress=False, batched=True, real_steps=budgets)
    assert [r["checks"] for r in again] == [r["checks"] for r in batched]


def test_a_world_per_cell_needs_a_batched_search(tmp_path):
    worlds = _cells([_world(0, 5), _world(1, 6)])
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    with pytest.raises(ConfigError, match="needs a batched search"):
        driver.search(CFG, keys[0], worlds, tmp_path, progress=False)
    assert not tmp_path.joinpath("checkpoints").exists()


PPO = dataclasses.replace(with_trainer(CFG, "ppo"), ppo=dataclasses.replace(
    CFG.ppo, envs=16, steps=8, updates=2, epochs=2, minibatches=2))


def test_ppo_seeds_each_in_their_own_world_equal_their_lone_searches(tmp_path):
    """PPO as a batch of seeds (wm-jax run --seeds --trainer ppo): each cell trains in its own M
    from its own padded posteriors (never a padding row: the first world's rows are few) and
    checks through its own V, equal to its lone search up to float rounding."""
    worlds = [_world(0, 3), _world(1, 40)]
    keys = jnp.stack([jax.random.key(7), jax.random.key(8)])
    hp = jax.tree.map(lambda x: jnp.stack([x, x]), PPO.hyper())
    batched = driver.search(PPO, keys, _cells(worlds), tmp_path / "seeds", hp=hp, progress=False, batched=True)
    for i, w in enumerate(worlds):
        lone = driver.evolve(PPO, keys[i], w, tmp_path / f"lone{i}", progress=False)
        assert [c["generation"] for c in batched[i]["checks"]] == [c["generation"] for c in lone["checks"]] == [1, 2, 3]
        for x, y in zip(batched[i]["checks"] + batched[i]["history"], lone["checks"] + lone["history"]):
            np.testing.assert_allclose([x[k] for k in y], [y[k] for k in y], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batched[i]["best"], lone["best"], rtol=1e-4, atol=1e-5)


def test_a_cell_left_out_from_the_start_never_searches(tmp_path):
    worlds = [_world(0, 20), _world(1, 25)]
    keys = jnp.stack([jax.random.key(7), jax.random.key(8)])
    hp = jax.tree.map(lambda x: jnp.stack([x, x]), CFG.hyper())
    res = driver.search(CFG, keys, _cells(worlds), tmp_path, hp=hp, progress=False, batched=True,
                        cells_active=[True, False])
    assert [r["generations"] for r in res] == [3, 0] and [len(r["checks"]) for r in res] == [3, 0]
    assert res[1]["real_env_steps"] == 0 and res[1]["best_real"] == float("-inf")


def test_each_cell_stops_at_its_own_stop_at_or_budget():
    """driver.stopped: which cells need no more periods, each by its own best check and real steps."""
    state = EvolveState(es=None, pool=None, best=None, best_real=jnp.asarray([5.0, 1.0, 3.0, -jnp.inf]),
                                      generation=None, real_env_steps=jnp.asarray([10, 50, 20, 0]))
    ev = dataclasses.replace(CFG.evolve, stop_at=3.0)
    assert driver.stopped(ev, None, 1, state).tolist() == [True, False, True, False]
    assert driver.stopped(ev, [100, 40, 100, 100], 1, state).tolist() == [True, True, True, False]
    assert driver.stopped(ev, [100, 40, 100, 100], 0, state).tolist() == [True, False, True, False]  # a first period
    assert driver.stopped(CFG.evolve, None, 1, state, [True, True, False, True]).tolist() == [False, False, True, False]
