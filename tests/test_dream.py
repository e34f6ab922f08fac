"""Tests for C (wm_jax.models.controller), the dream (wm_jax.search.dream) and CMA-ES in the dream (wm_jax.search.evolve).

Tiny configs only: the smoke preset and `dataclasses.replace` variants of it. Searches with a
known objective pass their own `score` and `check` functions to evolve (static arguments of the
jitted period, so each such function is traced on its own).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import controller, transition
from wm_jax.search import checks, dream, driver, evolve
from wm_jax.config import ConfigError, ControllerConfig
from wm_jax import presets
from wm_jax.presets import get_preset

SMOKE = get_preset("smoke")
LATENT = SMOKE.vae.latent  # 8
HIDDEN = SMOKE.transition.hidden  # 16
H = SMOKE.evolve.horizon  # 8


def _replace(cfg, **changes):
    """Config with fields replaced; a dict replaces fields of a section: _replace(cfg, evolve={"population": 4})."""
    return dataclasses.replace(cfg, **{
        name: dataclasses.replace(getattr(cfg, name), **value) if isinstance(value, dict) else value
        for name, value in changes.items()
    })


@pytest.fixture(scope="module")
def m_params():
    return transition.init(jax.random.key(0), SMOKE.transition, LATENT)


@pytest.fixture(scope="module")
def ctrl():
    dims = controller.num_params(SMOKE.controller, LATENT, HIDDEN)
    return jax.random.normal(jax.random.key(1), (dims,))


@pytest.fixture(scope="module")
def posteriors():
    """Stored encoder posteriors to start dreams from: mean, logvar [N, latent]."""
    k1, k2 = jax.random.split(jax.random.key(2))
    return jax.random.normal(k1, (20, LATENT)), -1.0 + 0.1 * jax.random.normal(k2, (20, LATENT))


def _with(params, path: tuple[str, ...], value) -> dict:
    """A copy of a params tree with one leaf replaced."""
    params = jax.tree.map(lambda x: x, params)  # new containers, shared leaves
    node = params["params"]
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = jnp.asarray(value, jnp.float32)
    return params


# ------------------------------------------------------------------------------------------------
# controller


@pytest.mark.parametrize(
    "kind, expected_shapes",
    [
        ("linear", [(LATENT + HIDDEN, 2), (2,)]),
        ("mlp", [(LATENT + HIDDEN, 5), (5,), (5, 2), (2,)]),
    ],
)
def test_controller_shapes(kind, expected_shapes):
    ccfg = ControllerConfig(kind=kind, mlp_hidden=5)
    n = controller.num_params(ccfg, LATENT, HIDDEN)
    assert n == sum(int(np.prod(s)) for s in expected_shapes)
    flat = jnp.arange(n, dtype=jnp.float32)
    parts = controller.unflatten(ccfg, flat, LATENT, HIDDEN)
    assert [p.shape for p in parts] == expected_shapes
    # slices in order, no gaps, no overlap
    np.testing.assert_array_equal(np.concatenate([np.asarray(p).ravel() for p in parts]), np.arange(n))

    z, h = jnp.ones((LATENT,)), jnp.ones((HIDDEN,))
    a = controller.act(ccfg, flat * 1e-3, z, h)
    assert a.shape == () and a.dtype == jnp.int32
    assert controller.logits(ccfg, flat, z, h).shape == (2,)
    zb, hb = jnp.ones((7, LATENT)), jnp.ones((7, HIDDEN))
    ab = controller.act(ccfg, flat * 1e-3, zb, hb)
    assert ab.shape == (7,) and ab.dtype == jnp.int32


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_controller_wrong_length_raises(kind, delta):
    ccfg = ControllerConfig(kind=kind, mlp_hidden=5)
    n = controller.num_params(ccfg, LATENT, HIDDEN)
    bad = jnp.zeros((n + delta,))
    with pytest.raises(ValueError, match="expected"):
        controller.unflatten(ccfg, bad, LATENT, HIDDEN)
    with pytest.raises(ValueError):
        controller.act(ccfg, bad, jnp.zeros((LATENT,)), jnp.zeros((HIDDEN,)))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_controller_act_is_argmax_of_logits(kind):
    ccfg = ControllerConfig(kind=kind, mlp_hidden=5)
    n = controller.num_params(ccfg, LATENT, HIDDEN)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    flat = jax.random.normal(k1, (n,))
    z, h = jax.random.normal(k2, (64, LATENT)), jax.random.normal(k3, (64, HIDDEN))
    x = np.concatenate([np.asarray(z), np.asarray(h)], axis=-1)
    parts = [np.asarray(p, np.float64) for p in controller.unflatten(ccfg, flat, LATENT, HIDDEN)]
    if kind == "linear":
        ref_logits = x @ parts[0] + parts[1]
    else:
        ref_logits = np.tanh(x @ parts[0] + parts[1]) @ parts[2] + parts[3]
    np.testing.assert_allclose(np.asarray(controller.logits(ccfg, flat, z, h)), ref_logits, rtol=1e-4, atol=1e-4)
    actions = np.asarray(controller.act(ccfg, flat, z, h))
    np.testing.assert_array_equal(actions, ref_logits.argmax(-1))
    assert 0 < actions.sum() < 64  # both actions occur: the check is not vacuous
    # per-row act agrees with the batched call
    for i in range(3):
        assert int(controller.act(ccfg, flat, z[i], h[i])) == actions[i]


def test_controller_bias_only_picks_larger_bias():
    ccfg = ControllerConfig()
    n = controller.num_params(ccfg, LATENT, HIDDEN)
    flat = jnp.zeros((n,)).at[-1].set(1.0)  # b = [0, 1]
    assert int(controller.act(ccfg, flat, jnp.ones((LATENT,)), jnp.ones((HIDDEN,)))) == 1
    flat = jnp.zeros((n,)).at[-2].set(1.0)  # b = [1, 0]
    assert int(controller.act(ccfg, flat, jnp.ones((LATENT,)), jnp.ones((HIDDEN,)))) == 0


# ------------------------------------------------------------------------------------------------
# dream


def _check_trajectory(traj, ret, horizon=H):
    traj = jax.device_get(traj)
    assert traj["z"].shape == (horizon, LATENT)
    for k in ("action", "reward", "p_done", "alive"):
        assert traj[k].shape == (horizon,), k
    assert traj["action"].dtype == np.int32
    assert set(np.unique(traj["action"])) <= {0, 1}
    for k in ("z", "reward", "p_done", "alive"):
        assert np.isfinite(traj[k]).all(), k
    np.testing.assert_allclose(float(ret), traj["reward"].sum(), rtol=1e-5, atol=1e-6)
    alive = traj["alive"]
    assert set(np.unique(alive)) <= {0.0, 1.0}
    assert alive[0] == 1.0
    assert np.all(np.diff(alive) <= 0), alive  # non-increasing
    # Ha's rule: the step where p_done > 0.5 still counts, every later step is dead
    expected = np.cumprod(np.concatenate([[1.0], (traj["p_done"][:-1] <= 0.5).astype(np.float64)]))
    np.testing.assert_array_equal(alive, expected)
    assert np.all(traj["reward"][alive == 0] == 0.0)
    return traj


def test_dream_shapes_and_masking(m_params, ctrl, posteriors):
    start = posteriors[0][0]
    traj, ret = dream.dream(SMOKE, jax.random.key(4), m_params, ctrl, start, H)
    traj = _check_trajectory(traj, ret)
    np.testing.assert_array_equal(traj["z"][0], np.asarray(start))  # z[0] is the start latent


def test_dream_ha_rule_mid_episode(m_params, ctrl, posteriors):
    """A sharp done head makes dreams end at various steps; the mask follows p_done exactly."""
    kernel = m_params["params"]["done_head"]["kernel"]
    params = _with(m_params, ("done_head", "kernel"), 25.0 * kernel)
    horizon = 16
    death_steps = []
    for i in range(12):
        traj, ret = dream.dream(SMOKE, jax.random.key(100 + i), params, ctrl, posteriors[0][i], horizon)
        traj = _check_trajectory(traj, ret, horizon)
        dead = np.nonzero(traj["alive"] == 0)[0]
        if dead.size:
            death_steps.append(int(dead[0]))
    # the property above was exercised on dreams that end mid-way, not only at the edges
    assert any(1 < d < horizon for d in death_steps), death_steps


@pytest.mark.parametrize("done_bias, expected_alive", [(10.0, [1.0] + [0.0] * (H - 1)), (-10.0, [1.0] * H)])
def test_dream_done_head_extremes(m_params, ctrl, posteriors, done_bias, expected_alive):
    params = _with(m_params, ("done_head", "kernel"), jnp.zeros((HIDDEN, 1)))
    params = _with(params, ("done_head", "bias"), jnp.full((1,), done_bias))
    params = _with(params, ("reward_head", "kernel"), jnp.zeros((HIDDEN, 1)))
    params = _with(params, ("reward_head", "bias"), jnp.ones((1,)))  # reward 1 per live step
    traj, ret = dream.dream(SMOKE, jax.random.key(5), params, ctrl, posteriors[0][0], H)
    traj = _check_trajectory(traj, ret)
    np.testing.assert_array_equal(traj["alive"], expected_alive)
    np.testing.assert_allclose(traj["reward"], expected_alive, rtol=1e-6)
    assert float(ret) == pytest.approx(sum(expected_alive))


def test_dream_determinism(m_params, ctrl, posteriors):
    start = posteriors[0][3]
    a, ra = dream.dream(SMOKE, jax.random.key(6), m_params, ctrl, start, H)
    b, rb = dream.dream(SMOKE, jax.random.key(6), m_params, ctrl, start, H)
    c, _ = dream.dream(SMOKE, jax.random.key(7), m_params, ctrl, start, H)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert float(ra) == float(rb)
    np.testing.assert_array_equal(np.asarray(a["z"][0]), np.asarray(c["z"][0]))  # same start
    assert not np.allclose(np.asarray(a["z"][1:]), np.asarray(c["z"][1:]))  # different sampling noise


def test_dream_temperature_changes_samples(m_params, ctrl, posteriors):
    start = posteriors[0][3]
    a, _ = dream.dream(SMOKE, jax.random.key(6), m_params, ctrl, start, H)
    b, _ = dream.dream(_replace(SMOKE, evolve={"tau": 0.5}), jax.random.key(6), m_params, ctrl, start, H)
    assert not np.allclose(np.asarray(a["z"][1:]), np.asarray(b["z"][1:]))


ROLLOUTS = SMOKE.evolve.rollouts  # 2: the smoke config's static shapes, so compiled scorers are shared


@pytest.fixture(scope="module")
def scored(m_params, posteriors):
    """A population of 6 random controllers and their scores from one score_population call."""
    dims = controller.num_params(SMOKE.controller, LATENT, HIDDEN)
    pop = 0.5 * jax.random.normal(jax.random.key(8), (6, dims))
    key = jax.random.key(9)
    mean, logvar = posteriors
    scores = np.asarray(dream.score_population(SMOKE, key, m_params, pop, mean, logvar, ROLLOUTS, H))
    return pop, key, scores


def test_score_population_matches_one_candidate_at_a_time(m_params, posteriors, scored):
    """Common random numbers: a candidate's score does not depend on who else is in the population."""
    pop, key, full = scored
    mean, logvar = posteriors
    assert full.shape == (6,) and np.isfinite(full).all()
    loop = np.array([
        float(dream.score_population(SMOKE, key, m_params, pop[i : i + 1], mean, logvar, ROLLOUTS, H)[0])
        for i in range(pop.shape[0])
    ])
    np.testing.assert_allclose(full, loop, rtol=1e-5, atol=1e-6)
    assert np.unique(np.round(full, 5)).size > 1  # candidates differ: the comparison is not vacuous
    # permuting the population permutes the scores
    perm = np.array([3, 0, 5, 1, 4, 2])
    permuted = np.asarray(dream.score_population(SMOKE, key, m_params, pop[perm], mean, logvar, ROLLOUTS, H))
    np.testing.assert_allclose(permuted, full[perm], rtol=1e-5, atol=1e-6)


def test_score_population_is_mean_of_dreams(m_params, posteriors, scored):
    """The score is the mean return of `dream` over the drawn starts and per-rollout keys."""
    pop, key, scores = scored
    mean, logvar = posteriors
    key_s, key_d = jax.random.split(key)
    starts = dream.draw_starts(key_s, mean, logvar, ROLLOUTS)
    keys = jax.random.split(key_d, ROLLOUTS)
    for i in range(2):
        rets = [float(dream.dream(SMOKE, keys[r], m_params, pop[i], starts[r], H)[1]) for r in range(ROLLOUTS)]
        assert scores[i] == pytest.approx(np.mean(rets), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# A hand-made M whose dream reward is +r per step for action 1 and -r for action 0.


def _action_rewarding_m(latent: int = LATENT, hidden: int = HIDDEN, tcfg=SMOKE.transition):
    """LSTM with forget gate ~0 and input/output gates ~1, so h' = tanh(tanh(+-3)) depends only on
    the action taken; the reward head averages h'; the done head never fires. With a continuous
    `tcfg` (one action number a in [-1, 1]): h' = tanh(tanh(3 a)), best at a = 1."""
    p = transition.init(jax.random.key(12), tcfg, latent)
    lstm = p["params"]["lstm"]
    for gate in ("ii", "if", "ig", "io"):
        lstm[gate]["kernel"] = jnp.zeros_like(lstm[gate]["kernel"])
    for gate in ("hi", "hf", "hg", "ho"):
        lstm[gate]["kernel"] = jnp.zeros_like(lstm[gate]["kernel"])
    lstm["hi"]["bias"] = jnp.full((hidden,), 10.0)
    lstm["ho"]["bias"] = jnp.full((hidden,), 10.0)
    lstm["hf"]["bias"] = jnp.full((hidden,), -10.0)
    lstm["hg"]["bias"] = jnp.zeros((hidden,))
    # input x = [z (latent), one_hot(a) (2)]: action 1 pushes g up, action 0 pushes it down
    if tcfg.continuous:
        lstm["ig"]["kernel"] = lstm["ig"]["kernel"].at[latent, :].set(3.0)
    else:
        lstm["ig"]["kernel"] = lstm["ig"]["kernel"].at[latent, :].set(-3.0).at[latent + 1, :].set(3.0)
    p["params"]["reward_head"]["kernel"] = jnp.full((hidden, 1), 1.0 / hidden)
    p["params"]["reward_head"]["bias"] = jnp.zeros((1,))
    p["params"]["done_head"]["kernel"] = jnp.zeros((hidden, 1))
    p["params"]["done_head"]["bias"] = jnp.full((1,), -10.0)
    # next latents ~ N(0, exp(-7)^2): the controller sees (almost) only h and its bias after step 0
    bias = jnp.zeros((latent, tcfg.mixtures, 3)).at[..., 2].set(-7.0)
    p["params"]["latent_head"]["kernel"] = jnp.zeros_like(p["params"]["latent_head"]["kernel"])
    p["params"]["latent_head"]["bias"] = bias.reshape(-1)
    return p


R_STEP = float(np.tanh(np.tanh(3.0)) / (1 + np.exp(-10.0)) ** 2)  # reward per step of action 1


def test_score_population_rewards_the_right_action(posteriors):
    m = _action_rewarding_m()
    dims = controller.num_params(SMOKE.controller, LATENT, HIDDEN)
    always1 = jnp.zeros((dims,)).at[-1].set(5.0)
    always0 = jnp.zeros((dims,)).at[-2].set(5.0)
    mean, logvar = posteriors
    s = [float(dream.score_population(SMOKE, jax.random.key(13), m, c[None], mean, logvar, ROLLOUTS, H)[0])
         for c in (always1, always0)]
    np.testing.assert_allclose(s, [H * R_STEP, -H * R_STEP], rtol=1e-3)


def _check_with(objective, env_steps: int = 0, latents=None):
    """An evolve `check` (a pure function, traced into the period) returning objective(ctrl) as the
    real return; latents(i_check) -> (mean, logvar, valid) of the visited states (default zeros)."""

    def check(cfg, hp, key, world, ctrl):
        rows = cfg.evolve.check_episodes * cfg.eval.max_steps
        zeros = jnp.zeros((rows, world.starts[0].shape[-1]))
        return {"return_mean": objective(ctrl), "env_steps": jnp.int32(env_steps),
                "latents": (zeros, zeros, jnp.ones(rows)) if latents is None else latents(world, ctrl)}

    return check


def _world(m, starts):
    return checks.World(m_params=m, vae_params=None, starts=tuple(jnp.asarray(x) for x in starts))


@pytest.mark.slow
def test_evolve_in_dream_finds_the_rewarded_action(tmp_path, posteriors):
    """End to end with the real dream: CMA-ES (minimising -return) must learn to pick action 1.

    Near the zero start every candidate's return is 0 up to rounding (ties) and the first action
    follows the random start z, so a population of 8 with sigma 0.1 and 2 dreams each wanders on
    float noise; 16 candidates with sigma 0.5 and 8 dreams each see the slope."""
    cfg = _replace(SMOKE, evolve={"population": 16, "generations": 8, "gens_per_call": 2, "check_every": 2,
                                  "rollouts": 8, "horizon": H, "sigma": 0.5})
    m = _action_rewarding_m()
    mean, logvar = posteriors

    def check(cfg, hp, key, world, ctrl):  # the "real" return: the dream score of the checked mean
        ret = checks.score_candidates(cfg, hp, key, world, ctrl[None], None)[0]
        return _check_with(lambda c: ret, env_steps=3)(cfg, hp, key, world, ctrl)

    res = driver.evolve(cfg, jax.random.key(14), _world(m, posteriors), tmp_path, progress=False, check=check)
    # the start (zeros) ties the logits, so argmax picks action 0 (return -H * R_STEP) or a mix
    assert res["history"][0]["dream_mean"] < 0.5 * H * R_STEP
    assert res["best_real"] > 0.8 * H * R_STEP, res["checks"]
    assert max(h["dream_max"] for h in res["history"]) > 0.8 * H * R_STEP
    # on 64 fresh dreams the kept controller picks action 1 in most (the zero start: none)
    best_score = float(dream.score_population(cfg, jax.random.key(15), m, jnp.asarray(res["best"])[None], mean, logvar,
                                              rollouts=64)[0])
    assert best_score > 0.5 * H * R_STEP
    assert res["real_env_steps"] == 3 * len(res["checks"])
    assert [c["generation"] for c in res["checks"]] == [2, 4, 6, 8]
    assert res["best_real"] == max(c["real_return"] for c in res["checks"])


# ------------------------------------------------------------------------------------------------
# evolve with a known objective (a toy score and check passed to the search)


TOY_LATENT, TOY_HIDDEN = 2, 2
TOY_DIMS = (TOY_LATENT + TOY_HIDDEN) * 2 + 2  # 10
TARGET = jnp.linspace(-0.5, 0.5, TOY_DIMS)


def _toy_score(cfg, hp, key, world, population, pool):
    """Dream 'return' = -||candidate - TARGET||^2: maximal (0) at TARGET."""
    return -jnp.sum(jnp.square(population - TARGET), axis=-1)


def _toy_distance(ctrl):
    return -jnp.linalg.norm(ctrl - TARGET)


_TOY_CHECK = _check_with(_toy_distance, env_steps=5)


def _toy_cfg(**evolve_fields):
    return _replace(SMOKE, transition={"hidden": TOY_HIDDEN}, evolve=evolve_fields)


def _toy_world():
    m = transition.init(jax.random.key(16), _toy_cfg().transition, TOY_LATENT)
    return _world(m, (np.zeros((4, TOY_LATENT), np.float32), np.zeros((4, TOY_LATENT), np.float32)))


def _dist(x) -> float:
    return float(jnp.linalg.norm(jnp.asarray(x) - TARGET))


@pytest.mark.slow
def test_evolve_maximises_the_return(tmp_path):
    cfg = _toy_cfg(population=16, generations=30, gens_per_call=5, check_every=10, sigma=0.1)
    res = driver.evolve(cfg, jax.random.key(17), _toy_world(), tmp_path, progress=False, score=_toy_score,
                        check=_TOY_CHECK)
    d0 = _dist(jnp.zeros(TOY_DIMS))
    assert _dist(res["best"]) < 0.2 * d0, (_dist(res["best"]), d0)
    assert res["best_real"] == pytest.approx(-_dist(res["best"]), rel=1e-5)
    # dream_return at each check is the (toy) score of the CMA-ES mean, and it improves
    dream_returns = [c["dream_return"] for c in res["checks"]]
    assert dream_returns[-1] > dream_returns[0]
    assert dream_returns[-1] > -(0.2 * d0) ** 2
    assert res["history"][-1]["dream_max"] > res["history"][0]["dream_max"]
    for h in res["history"]:
        assert h["dream_max"] >= h["dream_mean"]
    assert res["real_env_steps"] == 5 * len(res["checks"])


@pytest.mark.slow
def test_evolve_stops_at_the_first_check_that_reaches_stop_at(tmp_path):
    """evolve.stop_at: no generations (and no real steps) after the first check whose mean return
    reaches it; what was done equals the same search without it, and a rerun resumes as finished."""
    cfg = _toy_cfg(population=8, generations=12, gens_per_call=2, check_every=4, sigma=0.1)
    whole = driver.evolve(cfg, jax.random.key(30), _toy_world(), tmp_path / "whole", progress=False, score=_toy_score,
                          check=_TOY_CHECK)
    reals = [c["real_return"] for c in whole["checks"]]
    assert reals[1] > reals[0], reals  # the second check is the first to reach the bar below
    stop = _replace(cfg, evolve={"stop_at": (reals[0] + reals[1]) / 2})
    for _ in range(2):  # the second call restores the finished search from its checkpoint
        res = driver.evolve(stop, jax.random.key(30), _toy_world(), tmp_path / "stop", progress=False,
                            score=_toy_score, check=_TOY_CHECK)
        assert [c["generation"] for c in res["checks"]] == [4, 8] and res["generations"] == 8
        assert res["checks"] == whole["checks"][:2] and res["history"] == whole["history"][:8]
        assert res["real_env_steps"] == 10 and res["best_real"] == reals[1]
    assert whole["generations"] == 12 and whole["real_env_steps"] == 15


@pytest.mark.slow
@pytest.mark.parametrize("real_steps, checks", [(1, 1), (-3, 1), (10, 2), (11, 3), (100, 3)])
def test_evolve_starts_no_check_once_its_real_steps_are_spent(tmp_path, real_steps, checks):
    """real_steps (the run's budget left, rounds.budget): the search ends after the first check at
    which its checks have spent that many (5 each here); the first check always runs; what was
    done equals the same search without the limit."""
    cfg = _toy_cfg(population=4, generations=6, gens_per_call=2, check_every=2, sigma=0.1)
    whole = driver.evolve(cfg, jax.random.key(32), _toy_world(), tmp_path / "whole", progress=False,
                          score=_toy_score, check=_TOY_CHECK)
    for _ in range(2):  # the second call restores the finished search from its checkpoint
        res = driver.evolve(cfg, jax.random.key(32), _toy_world(), tmp_path / "limited", progress=False,
                            score=_toy_score, check=_TOY_CHECK, real_steps=real_steps)
        assert res["generations"] == 2 * checks and res["real_env_steps"] == 5 * checks
        assert res["checks"] == whole["checks"][:checks]


@pytest.mark.parametrize("spent, reserve, done, halted", [
    ([0, 60, 95, 100], 0, 1, [False, False, False, True]),  # without a reserve: until all 100 are spent
    ([0, 60, 95, 100], 40, 1, [False, False, True, True]),  # sequential checks: while 40 are left
    ([0, 60, 95, 100], 40, 0, [False, False, False, False]),  # the first period always runs
])
def test_a_search_stops_once_its_budget_left_is_below_its_reserve(spent, reserve, done, halted):
    state = evolve.EvolveState(es=None, pool=None, best=None, best_real=np.zeros(4, np.float32), generation=None,
                               real_env_steps=np.asarray(spent, np.int32))
    assert driver.stopped(_toy_cfg().evolve, 100, done, state, reserve=reserve).tolist() == halted


def _lucky_check(cfg, hp, key, world, ctrl):
    """A check whose first episodes are lucky: 2 episodes (the check) score 10 each, 3 (the
    confirming ones, evolve.confirm_episodes) 0 each; every episode costs 5 real steps."""
    n = cfg.evolve.check_episodes
    rows = n * cfg.eval.max_steps
    zeros = jnp.zeros((rows, world.starts[0].shape[-1]))
    return {"return_mean": jnp.float32(10.0 if n == 2 else 0.0), "env_steps": jnp.int32(5 * n),
            "latents": (zeros, zeros, jnp.ones(rows))}


@pytest.mark.slow
@pytest.mark.parametrize("stop_at, solved", [(5.0, False), (3.0, True), (11.0, False)])
def test_a_check_that_reaches_stop_at_is_confirmed_by_more_episodes(tmp_path, stop_at, solved):
    """evolve.confirm_episodes: a check at stop_at runs that many more episodes and counts their
    mean with its own (2 x 10 + 3 x 0) / 5 = 4: a lucky pass (stop_at 5) does not end the search;
    a check below stop_at (11) runs none; every episode run is counted once."""
    cfg = _toy_cfg(population=4, generations=6, gens_per_call=2, check_every=2, check_episodes=2,
                   stop_at=stop_at, confirm_episodes=3)
    res = driver.evolve(cfg, jax.random.key(31), _toy_world(), tmp_path, progress=False, score=_toy_score,
                        check=_lucky_check)
    passed = stop_at <= 10.0
    assert res["generations"] == (2 if solved else 6)
    for c in res["checks"]:
        assert c["real_return"] == (4.0 if passed else 10.0)
        assert c["confirm_return"] == (0.0 if passed else None)
        assert c["env_steps"] == (25 if passed else 10)
    assert res["real_env_steps"] == sum(c["env_steps"] for c in res["checks"])
    assert res["best_real"] == (4.0 if passed else 10.0)
    logged = [json.loads(line) for line in (tmp_path / "evolve.jsonl").read_text().splitlines()]
    assert logged == res["checks"]


def _episodes_check(check_returns, confirm_returns):
    """A check whose episodes return `check_returns` (evolve.check_episodes of them) or, asked for
    another count (the confirming episodes), `confirm_returns`; each episode lasts its return's
    steps (CartPole's one per step) and visits states whose latents are its index + 1."""

    def check(cfg, hp, key, world, ctrl):
        n, steps = cfg.evolve.check_episodes, cfg.eval.max_steps
        returns = jnp.asarray(check_returns if n == len(check_returns) else confirm_returns, jnp.float32)
        latent = jnp.repeat(jnp.arange(1, n + 1, dtype=jnp.float32), steps)[:, None] * jnp.ones(TOY_LATENT)
        return {"return_mean": jnp.mean(returns), "env_steps": jnp.sum(returns).astype(jnp.int32),
                "latents": (latent, latent, jnp.ones(n * steps)), "returns": returns,
                "lengths": returns.astype(jnp.int32)}

    return check


@pytest.mark.parametrize("returns, prior_sum, prior, total, mask", [
    ([50, 45, 50, 50], 0, 0, 4, [1, 1, 1, 1]),  # 195 of 4 x 48 = 192 still reachable after each
    ([50, 40, 50, 50], 0, 0, 4, [1, 1, 0, 0]),  # after 40, 90 + 2 x 50 < 192: it stops there
    ([30, 50, 50, 50], 0, 0, 4, [1, 0, 0, 0]),
    ([50, 50, 30, 50], 195, 4, 8, [1, 1, 1, 0]),  # the confirming ones: 8 x 48 = 384 in all
])
def test_a_sequential_check_plays_each_episode_while_it_can_still_pass(returns, prior_sum, prior, total, mask):
    got = checks.played(jnp.asarray(returns, jnp.float32), jnp.float32(prior_sum), prior, total, 48.0, 50.0)
    assert got.tolist() == mask


@pytest.mark.parametrize("stop_at, confirm, real, steps, episodes, grounded", [
    # all 4 played (195 >= 192): it passes, and its 3 confirming episodes stop after the second
    # (275 + 50 < 7 x 48): 275 of 6 episodes, 80 of them confirming; the pool is the 4 checked ones'
    (48.0, [50, 30, 50], 275 / 6, 275, 6, [1, 2, 3, 4]),
    # 49 x 4 = 196 is out of reach after the second (95 + 100): 2 played, none confirming
    (49.0, [50, 50, 50], 47.5, 95, 2, [1, 2]),
])
def test_a_sequential_check_counts_scores_and_grounds_only_the_episodes_it_played(
        stop_at, confirm, real, steps, episodes, grounded):
    cfg = _toy_cfg(check_episodes=4, confirm_episodes=3, stop_at=stop_at, sequential=True)
    check = _episodes_check([50, 45, 50, 50], confirm)
    _, got = checks.check_candidate(cfg, cfg.hyper(), _toy_world(), None, jax.random.key(0), jnp.int32(2),
                                    jnp.zeros(TOY_DIMS), _toy_score, check)
    assert float(got["return_mean"]) == pytest.approx(real) and int(got["env_steps"]) == steps
    assert int(got["episodes"]) == episodes
    assert (np.isnan(float(got["confirm_return"])) if episodes <= 4
            else float(got["confirm_return"]) == 40.0)
    mean, _, valid = got["latents"]
    assert sorted(set(np.asarray(mean[np.asarray(valid) > 0, 0]).tolist())) == grounded


def test_sequential_checks_need_stop_at_and_a_reachable_one():
    with pytest.raises(ConfigError, match="sequential stops a check once it cannot reach stop_at"):
        _toy_cfg(sequential=True)
    with pytest.raises(ConfigError, match="no check can reach evolve.stop_at=60"):
        presets.check_env(_toy_cfg(sequential=True, stop_at=60.0))  # SMOKE's 50-step episodes return 50 at most
    presets.check_env(_toy_cfg(sequential=True, stop_at=50.0))


def test_confirm_episodes_needs_stop_at():
    with pytest.raises(ConfigError, match="confirm_episodes=4 confirms checks that reach stop_at"):
        _toy_cfg(confirm_episodes=4)
    with pytest.raises(ConfigError, match="confirm_episodes must be >= 0"):
        _toy_cfg(confirm_episodes=-1, stop_at=1.0)


@pytest.mark.slow
def test_evolve_check_schedule_and_log(tmp_path):
    cfg = _toy_cfg(population=4, generations=7, gens_per_call=2, check_every=3)
    (tmp_path / "evolve.jsonl").write_text('{"generation": 99}\n')  # a previous search's log is replaced
    res = driver.evolve(cfg, jax.random.key(18), _toy_world(), tmp_path, progress=False, score=_toy_score,
                        check=_TOY_CHECK)
    # checks every check_every generations, and at the end
    assert [c["generation"] for c in res["checks"]] == [3, 6, 7]
    assert [h["generation"] for h in res["history"]] == list(range(1, 8))
    assert res["real_env_steps"] == 15
    lines = [json.loads(line) for line in (tmp_path / "evolve.jsonl").read_text().splitlines()]
    assert lines == res["checks"]
    for entry in lines:
        # the check's dream return is the toy score of the mean, its real return the toy distance
        assert entry["dream_return"] == pytest.approx(-(entry["real_return"] ** 2), rel=1e-4)
        assert {"dream_mean", "dream_max", "env_steps", "grounding_states"} <= entry.keys()
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert gens == res["history"]
    # the best is the checked mean with the highest real return
    assert res["best_real"] == max(c["real_return"] for c in res["checks"])
    assert res["best_real"] == pytest.approx(-_dist(res["best"]), rel=1e-5)


def test_evolve_init_mean_is_the_starting_point(tmp_path):
    cfg = _toy_cfg(population=4, generations=1, gens_per_call=1, check_every=1, sigma=1e-3)
    res = driver.evolve(cfg, jax.random.key(19), _toy_world(), tmp_path, init_mean=TARGET, progress=False,
                        score=_toy_score, check=_TOY_CHECK)
    assert _dist(res["best"]) < 1e-2


def _count_traces():
    traces = []

    def score(cfg, hp, key, world, population, pool):
        traces.append(1)  # runs once per trace, never per call
        return _toy_score(cfg, hp, key, world, population, pool)

    return score, traces


@pytest.mark.slow
def test_new_traced_hyperparameters_do_not_compile_again(tmp_path):
    """tau, sigma, the verifier threshold and the grounding share are traced: a search with new
    values reuses the compiled period (the score function is traced once, not once per value)."""
    score, traces = _count_traces()
    base = _toy_cfg(population=4, generations=2, gens_per_call=2, check_every=2)
    results = []
    for i, (tau, sigma, share, threshold) in enumerate([(1.0, 0.1, 0.0, 0.5), (1.3, 0.3, 0.5, 0.7)]):
        cfg = _replace(base, evolve={"tau": tau, "sigma": sigma, "grounding": share},
                       verifier={"threshold": threshold})
        results.append(driver.evolve(cfg, jax.random.key(21), _toy_world(), tmp_path / str(i), progress=False,
                                     score=score, check=_TOY_CHECK))
    # period traces the score twice (generations and the check of the mean); init never
    assert len(traces) == 2
    assert results[0]["history"] != results[1]["history"]  # sigma did change the search
    # a static field (the population) is a new program
    driver.evolve(_replace(base, evolve={"population": 6}), jax.random.key(21), _toy_world(), tmp_path / "p",
                  progress=False, score=score, check=_TOY_CHECK)
    assert len(traces) == 4


def test_traced_hyperparameter_read_from_the_static_config_is_named():
    with pytest.raises(TypeError, match="Config.evolve.tau is a traced hyperparameter"):
        float(SMOKE.static().evolve.tau)
    assert SMOKE.static() == _replace(SMOKE, evolve={"tau": 1.7, "sigma": 0.5}).static()
    assert SMOKE.static() != _replace(SMOKE, evolve={"horizon": 9}).static()


def test_evolve_resumes_after_a_kill_with_the_same_result(tmp_path, monkeypatch):
    """A search killed after its first period resumes from the checkpoint and ends bit for bit
    where an uninterrupted one does (history, checks, best)."""
    cfg = _toy_cfg(population=4, generations=6, gens_per_call=2, check_every=2)
    whole = driver.evolve(cfg, jax.random.key(22), _toy_world(), tmp_path / "whole", progress=False,
                          score=_toy_score, check=_TOY_CHECK)

    from wm_jax.store import checkpoint

    real_save, saves = checkpoint.save, []

    def save_then_die(mngr, step, state, config):
        real_save(mngr, step, state, config)
        saves.append(step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        driver.evolve(cfg, jax.random.key(22), _toy_world(), tmp_path / "cut", progress=False, score=_toy_score,
                      check=_TOY_CHECK)
    with open(tmp_path / "cut" / "generations.jsonl", "a") as f:
        f.write('{"generation": 5, "dream_m')  # a torn line, as a kill mid-write leaves
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = driver.evolve(cfg, jax.random.key(22), _toy_world(), tmp_path / "cut", progress=False,
                            score=_toy_score, check=_TOY_CHECK)
    assert resumed["history"] == whole["history"] and resumed["checks"] == whole["checks"]
    np.testing.assert_array_equal(resumed["best"], whole["best"])
    assert resumed["best_real"] == whole["best_real"] and resumed["real_env_steps"] == whole["real_env_steps"]


# ------------------------------------------------------------------------------------------------
# Grounding: a share of the dreams starts from states the controller reached for real


def _grounding_pools():
    stored = (jnp.full((6, LATENT), -100.0), jnp.full((6, LATENT), -30.0))  # every stored start is ~ -100
    pool = (jnp.stack([jnp.full((LATENT,), 100.0), jnp.full((LATENT,), 555.0), jnp.full((LATENT,), 100.0)]),
            jnp.full((3, LATENT), -30.0), jnp.asarray([1.0, 0.0, 1.0]))  # row 1 is past the episode's end
    return stored, pool


@pytest.mark.slow
@pytest.mark.parametrize("share, n_pool", [(0.25, 1), (0.5, 2), (1.0, 4)])
def test_draw_grounded_starts_mixes_the_pools(share, n_pool):
    stored, pool = _grounding_pools()
    starts = np.asarray(dream.draw_grounded_starts(jax.random.key(3), *stored, 4, pool, share))
    assert starts.shape == (4, LATENT)
    np.testing.assert_allclose(starts[: 4 - n_pool], -100.0, atol=1e-3)  # the stored posteriors first
    np.testing.assert_allclose(starts[4 - n_pool:], 100.0, atol=1e-3)  # then the pool's valid rows only
    # the stored rows are draw_starts' own
    np.testing.assert_array_equal(starts[: 4 - n_pool], np.asarray(dream.draw_starts(jax.random.key(3), *stored, 4))[: 4 - n_pool])


@pytest.mark.parametrize("pool_given, share", [(False, 0.5), (True, 0.0), (True, 0.1)])  # 0.1 * 4 rounds to 0
def test_draw_grounded_starts_without_grounding_is_draw_starts(pool_given, share):
    stored, pool = _grounding_pools()
    key = jax.random.key(4)
    got = dream.draw_grounded_starts(key, *stored, 4, pool if pool_given else None, share)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dream.draw_starts(key, *stored, 4)))


@pytest.mark.slow
def test_score_population_with_zero_grounding_ignores_the_pool(m_params, posteriors):
    pop = jax.random.normal(jax.random.key(5), (4, controller.num_params(SMOKE.controller, LATENT, HIDDEN)))
    args = (jax.random.key(6), m_params, pop, *posteriors, ROLLOUTS, H)
    pool = (posteriors[0] + 5.0, posteriors[1], jnp.ones(posteriors[0].shape[0]))
    base = np.asarray(dream.score_population(SMOKE, *args))
    np.testing.assert_array_equal(np.asarray(dream.score_population(SMOKE, *args, None, pool)), base)
    grounded = np.asarray(dream.score_population(_replace(SMOKE, evolve={"grounding": 1.0}), *args, None, pool))
    assert not np.array_equal(grounded, base)  # the pool's starts are used


def _pool_score(cfg, hp, key, world, population, pool):
    """Every candidate scores the mean of the pool's valid latents: the fitness shows which pool the period used."""
    p_mean, _, valid = pool
    return jnp.zeros(population.shape[0]) + jnp.sum(p_mean[:, 0] * valid) / jnp.sum(valid)


@pytest.mark.slow
def test_evolve_grounding_dreams_from_the_last_checks_states(tmp_path):
    cfg = _toy_cfg(population=4, generations=6, gens_per_call=2, check_every=2, grounding=0.5, check_episodes=1)
    cfg = _replace(cfg, eval={"max_steps": 5})

    def check(cfg, hp, key, world, ctrl):
        # The i-th check (i from the key: checks fold their generation in) reports 3 valid states at
        # i; the padding after the episode's end (valid 0) is far away and must never be used.
        i = jax.random.randint(key, (), 0, 1000).astype(jnp.float32)
        mean = jnp.full((5, TOY_LATENT), 1e6).at[:3].set(i)
        return {"return_mean": _toy_distance(ctrl), "env_steps": jnp.int32(3),
                "latents": (mean, jnp.zeros_like(mean), jnp.asarray([1.0, 1.0, 1.0, 0.0, 0.0]))}

    res = driver.evolve(cfg, jax.random.key(20), _toy_world(), tmp_path, progress=False, score=_pool_score,
                        check=check)
    # generations 1-2 dream from the first pool (a draw of the stored starts: all 0), then each
    # period from the states its previous check reached
    _, key_run = jax.random.split(jax.random.key(20))
    marks = [float(jax.random.randint(jax.random.fold_in(jax.random.fold_in(key_run, 10_000_000 + g), 1), (), 0, 1000))
             for g in (2, 4, 6)]
    np.testing.assert_allclose([h["dream_mean"] for h in res["history"]], [0, 0, marks[0], marks[0], marks[1], marks[1]])
    np.testing.assert_allclose([c["dream_return"] for c in res["checks"]], [0, marks[0], marks[1]])
    assert [c["grounding_states"] for c in res["checks"]] == [3, 3, 3]


def test_grounding_share_is_validated():
    from wm_jax.config import ConfigError

    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="grounding"):
            _replace(SMOKE, evolve={"grounding": bad})


# ------------------------------------------------------------------------------------------------
# Mixed precision: the dream with M in bfloat16


def _walls(n_episodes: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-row posteriors of a toy world: each action pushes z one way, an episode ends when
    |z[0]| > 1 (or after 60 steps), reward 1 per step."""
    from wm_jax.store import data

    rng = np.random.default_rng(seed)
    zs, acts, eps, ts = [], [], [], []
    for e in range(n_episodes):
        z = rng.normal(0, 0.1, LATENT).astype(np.float32)
        for t in range(60):
            a = int(rng.integers(2))
            zs.append(z.copy()), acts.append(a), eps.append(e), ts.append(t)
            z = 0.98 * z + (2 * a - 1) * 0.1 * np.linspace(1.0, 0.2, LATENT) + rng.normal(0, 0.02, LATENT)
            if abs(z[0]) > 1.0:
                break
    idx = data.EpisodeIndex.from_columns(np.asarray(eps, np.int32), np.asarray(ts, np.int32))
    n = len(ts)
    return {
        "mean": np.asarray(zs, np.float32), "logvar": np.full((n, LATENT), -6.0, np.float32),
        "action": np.asarray(acts, np.int32), "reward": np.ones(n, np.float32), "done": idx.is_last.copy(),
        "is_first": idx.is_first, "is_last": idx.is_last,
    }


@pytest.mark.slow
def test_bfloat16_dream_matches_float32():
    """A briefly trained M (300 steps on the toy world) scores a population of random controllers
    in bf16 as in fp32: the population's mean return within 1% (measured: 0.16%), each candidate
    within 5% of the horizon, and the ranking kept (correlation > 0.95; measured 0.999)."""
    from wm_jax.models import train as train_lib
    from wm_jax.presets import with_compute_dtype

    tcfg = _replace(SMOKE, transition={"train": dataclasses.replace(SMOKE.transition.train, batch=16, lr=3e-3)}).transition
    d = {k: jnp.asarray(v) for k, v in _walls().items()}
    state = train_lib.init_state(tcfg.train, transition.init(jax.random.key(0), tcfg, LATENT))
    state, metrics = train_lib.run_chunk(
        tcfg.train.hyper(), lambda p, k, b, s: transition.loss(tcfg, p, b),
        lambda k, dd: transition.sequence_batch(k, dd, tcfg.train.batch, tcfg.seq_len), 300, jax.random.key(1), d, state,
    )
    loss = np.asarray(metrics["loss"])
    assert loss[-20:].mean() < loss[:20].mean() - 5.0  # M did learn the toy world
    cfg = dataclasses.replace(SMOKE, transition=tcfg)
    dims = controller.num_params(cfg.controller, LATENT, HIDDEN)
    pop = jax.random.normal(jax.random.key(8), (32, dims))
    horizon = 20
    fp32, bf16 = (
        np.asarray(dream.score_population(c, jax.random.key(9), state.params, pop, d["mean"], d["logvar"], 16, horizon))
        for c in (cfg, with_compute_dtype(cfg, "bfloat16"))
    )
    assert np.isfinite(bf16).all()
    assert abs(bf16.mean() - fp32.mean()) <= 0.01 * abs(fp32.mean()), (bf16.mean(), fp32.mean())
    assert np.abs(bf16 - fp32).max() <= 0.05 * horizon
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.95


def _score_reading_m(cfg, hp, key, world, population, pool):
    """The toy score, reading M's parameters as the dream does (adding zero)."""
    return _toy_score(cfg, hp, key, world, population, pool) + 0.0 * jax.tree.leaves(world.m_params)[0].sum()


@pytest.mark.slow
@pytest.mark.parametrize("restored", [False, True])
def test_a_search_compiles_its_period_once(tmp_path, restored):
    """evosax's init leaves weakly typed fields that a period's output does not have: unless init
    fixes the dtypes, the second period compiles the program again. Likewise with M's parameters
    restored from a checkpoint (committed to the device, as the pipeline's are): a period's outputs
    are committed then, and the first period's inputs must be too."""
    cfg = _toy_cfg(population=8, generations=30, gens_per_call=5, check_every=10, sigma=0.1)
    world = _toy_world()
    if restored:
        world = world.replace(m_params=jax.device_put(world.m_params, jax.devices()[0]))
    before = driver._period_cells._cache_size()
    driver.evolve(cfg, jax.random.key(23), world, tmp_path, progress=False, score=_score_reading_m, check=_TOY_CHECK)
    assert driver._period_cells._cache_size() - before == 1


@pytest.mark.parametrize("population,rollouts,block", [(64, 16, 64), (256, 64, 16), (60, 30, 30), (7, 2048, 1), (8, 2, 8)])
def test_cpu_blocks_are_the_largest_divisor_that_fits(population, rollouts, block):
    assert dream.cpu_block(population, rollouts) == block  # one CPU device here (tests/test_sharding.py has 8)


@pytest.mark.slow
def test_scoring_in_blocks_gives_the_same_scores(monkeypatch):
    """Blocks of candidates scored one after the other see the same starts and noise as the whole
    population at once: the same scores up to float rounding."""
    cfg = SMOKE
    latent, hidden = cfg.vae.latent, cfg.transition.hidden
    m = transition.init(jax.random.key(0), cfg.transition, latent)
    pop = 0.5 * jax.random.normal(jax.random.key(1), (12, controller.num_params(cfg.controller, latent, hidden)))
    mean, logvar = jax.random.normal(jax.random.key(2), (20, latent)), jnp.full((20, latent), -1.0)
    whole = dream.score_population(cfg, jax.random.key(3), m, pop, mean, logvar, 4, 10)
    monkeypatch.setattr(dream, "CPU_BLOCK_ROWS", 8)  # blocks of 2 candidates x 4 rollouts
    jax.clear_caches()
    assert dream.cpu_block(12, 4) == 2
    blocked = dream.score_population(cfg, jax.random.key(3), m, pop, mean, logvar, 4, 10)
    jax.clear_caches()
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)
    assert len(set(np.round(np.asarray(whole), 4))) > 1
