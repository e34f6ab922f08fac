"""Tests for wm_jax.search.sweep: a grid of controller searches as one vmapped program.

The world is the smoke preset's sizes with freshly initialised V and M (random weights), so the
dreams and the real checks (pixel CartPole, V encoding, M's carry) are the real ones, only small.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import transition, vae
from wm_jax.search import checks, driver, sweep
from wm_jax.config import ConfigError
from wm_jax.presets import get_preset

SMOKE = get_preset("smoke")
CFG = dataclasses.replace(SMOKE, evolve=dataclasses.replace(SMOKE.evolve, generations=3, check_every=2),
                          eval=dataclasses.replace(SMOKE.eval, max_steps=30))
ONE_GEN = dataclasses.replace(CFG, evolve=dataclasses.replace(CFG.evolve, generations=1, check_every=1))


@pytest.fixture(scope="module")
def world():
    latent = CFG.vae.latent
    k1, k2 = jax.random.split(jax.random.key(3))
    return checks.World(
        m_params=transition.init(jax.random.key(1), CFG.transition, latent),
        vae_params=vae.init(jax.random.key(0), CFG.vae),
        starts=(jax.random.normal(k1, (40, latent)), -1.0 + 0.1 * jax.random.normal(k2, (40, latent))),
    )


def _same(swept: dict, lone: dict) -> None:
    """A swept cell against its lone search: equal up to float rounding of the batched program."""
    for a, b in ((swept["history"], lone["history"]), (swept["checks"], lone["checks"])):
        assert [e["generation"] for e in a] == [e["generation"] for e in b]
        for x, y in zip(a, b):
            np.testing.assert_allclose([x[k] for k in y], [y[k] for k in y], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(swept["best"], lone["best"], rtol=1e-5, atol=1e-6)
    assert swept["best_real"] == lone["best_real"] and swept["real_env_steps"] == lone["real_env_steps"]


@pytest.mark.slow
def test_sweep_over_seeds_and_taus_equals_separate_searches(world, tmp_path):
    """3 seeds x 2 taus in one program equal the 6 searches run one by one: a generation, the real
    check of the mean (pixel episodes) and the best update, with the real dream.

    One generation only: CMA-ES's update batched by vmap rounds its covariance differently in the
    last bit (measured 5e-10 in C, 1.2e-7 in p_std), and with M's random weights the argmax
    controllers of later generations turn such bits into other actions. The multi-generation
    equality is checked on a smooth objective below."""
    cells = sweep.grid(ONE_GEN, seeds=[0, 1, 2], **{"evolve.tau": [1.0, 1.3]})
    assert [(c.seed, c.values["evolve.tau"]) for c in cells] == [(s, t) for s in (0, 1, 2) for t in (1.0, 1.3)]
    swept = sweep.run(ONE_GEN, cells, world, tmp_path / "sweep", progress=False)
    assert len(swept) == 6
    for i, (cell, res) in enumerate(zip(cells, swept)):
        assert res["seed"] == cell.seed and res["evolve.tau"] == cell.values["evolve.tau"]
        lone = driver.evolve(cell.config, jax.random.key(cell.seed), world, tmp_path / f"lone{i}", progress=False)
        _same(res, lone)
    # not vacuous: the seeds' searches differ, and so do the taus' dreams
    assert swept[0]["history"] != swept[2]["history"]
    assert swept[0]["checks"][0]["dream_return"] != swept[1]["checks"][0]["dream_return"]


TARGET = jnp.linspace(-0.5, 0.5, 10)


def _quadratic(cfg, hp, key, world, population, pool):
    """A smooth fitness whose optimum moves with tau: -||c - tau * TARGET||^2."""
    return -jnp.sum(jnp.square(population - hp["evolve"]["tau"] * TARGET), axis=-1)


def _distance(cfg, hp, key, world, ctrl):
    rows = cfg.evolve.check_episodes * cfg.eval.max_steps
    z = jnp.zeros((rows, world.starts[0].shape[-1]))
    return {"return_mean": -jnp.linalg.norm(ctrl - hp["evolve"]["tau"] * TARGET), "env_steps": jnp.int32(1),
            "latents": (z, z, jnp.ones(rows))}


@pytest.mark.slow
def test_sweep_equals_separate_searches_over_many_generations(tmp_path):
    """On a smooth objective, 2 seeds x 2 taus x 2 sigmas in one program against the 8 lone
    searches: the first generations equal within rtol 1e-5; after that the last-bit differences
    of the vmapped fitness reach CMA-ES's covariance and, through the eigendecomposition of a
    nearly isotropic matrix, the candidates (measured: the first cell parts from its lone search
    at generation 7). Both then head for the same optimum: the cell's own tau * TARGET."""
    cfg = dataclasses.replace(SMOKE, transition=dataclasses.replace(SMOKE.transition, hidden=2),
                              evolve=dataclasses.replace(SMOKE.evolve, generations=30, check_every=10))
    toy = checks.World(m_params=None, vae_params=None, starts=(jnp.zeros((4, 2)), jnp.zeros((4, 2))))
    cells = sweep.grid(cfg, seeds=[0, 1], **{"evolve.tau": [1.0, 2.0], "evolve.sigma": [0.1, 0.3]})
    swept = sweep.run(cfg, cells, toy, tmp_path / "sweep", progress=False, score=_quadratic, check=_distance)
    for i, (cell, res) in enumerate(zip(cells, swept)):
        lone = driver.evolve(cell.config, cell.key(), toy, tmp_path / f"lone{i}", progress=False, score=_quadratic,
                             check=_distance)
        for x, y in zip(res["history"][:2], lone["history"][:2]):
            np.testing.assert_allclose([x[k] for k in y], [y[k] for k in y], rtol=1e-5, atol=1e-6)
        optimum = cell.values["evolve.tau"] * np.asarray(TARGET)
        for best in (res["best"], lone["best"]):  # much closer than the zero start
            assert np.linalg.norm(best - optimum) < 0.3 * np.linalg.norm(optimum)
    assert len({tuple(np.round(r["best"], 3)) for r in swept}) == len(swept)  # every cell its own search


@pytest.mark.slow
def test_sweep_resumes_from_its_checkpoint(world, tmp_path, monkeypatch):
    """A sweep killed after its first period resumes and ends as an uninterrupted one, bit for bit."""
    cells = sweep.grid(CFG, seeds=[4], **{"evolve.sigma": [0.05, 0.2]})
    whole = sweep.run(CFG, cells, world, tmp_path / "whole", progress=False)
    from wm_jax.store import checkpoint

    real_save = checkpoint.save

    def die(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", die)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(CFG, cells, world, tmp_path / "cut", progress=False)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = sweep.run(CFG, cells, world, tmp_path / "cut", progress=False)
    assert [len(r["history"]) for r in resumed] == [3, 3]
    for a, b in zip(resumed, whole):
        assert a["history"] == b["history"] and a["checks"] == b["checks"]
        np.testing.assert_array_equal(a["best"], b["best"])


def test_grid_validates_values_and_refuses_static_fields():
    with pytest.raises(ConfigError, match="grounding"):
        sweep.grid(CFG, **{"evolve.grounding": [0.0, 1.5]})
    with pytest.raises(ConfigError, match="static"):
        sweep.grid(CFG, **{"evolve.horizon": [8, 16]})
    with pytest.raises(ConfigError, match="no config field"):
        sweep.grid(CFG, **{"evolve.taus": [1.0]})
    assert "evolve.tau" in sweep.traced_fields(CFG) and "verifier.threshold" in sweep.traced_fields(CFG)


def test_stacked_hyperparameters_are_one_leaf_per_cell():
    cells = sweep.grid(CFG, seeds=[0, 1], **{"evolve.tau": [1.0, 1.15, 1.3]})
    keys, hp = sweep.stack(cells)
    assert keys.shape == (6,)
    assert all(leaf.shape == (6,) for leaf in jax.tree.leaves(hp))
    np.testing.assert_allclose(hp["evolve"]["tau"], [1.0, 1.15, 1.3] * 2, rtol=1e-6)
    np.testing.assert_array_equal(hp["evolve"]["sigma"], jnp.full(6, CFG.evolve.sigma, jnp.float32))
