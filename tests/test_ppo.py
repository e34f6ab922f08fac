"""Tests for PPO in the dream (wm_jax.search.ppo): the dream env, GAE, learning a probe task with a known
optimum, kill and resume, and an agent trained with PPO end to end.

Tiny configs only (the smoke preset and variants of it); the probe is test_dream's M in which
only the action decides the reward (action 1 earns R_STEP a step, action 0 -R_STEP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dream import (
    HIDDEN,
    LATENT,
    R_STEP,
    SMOKE,
    _action_rewarding_m,
    _check_with,
    _replace,
    _world,
)

from wm_jax.models import controller, transition
from wm_jax.search import dream, driver, ppo
from wm_jax.store import checkpoint
from wm_jax.config import ConfigError, ControllerConfig
from wm_jax.presets import with_trainer

PPO_SMOKE = _replace(with_trainer(SMOKE, "ppo"), controller={"mlp_hidden": 8},
                     ppo={"envs": 32, "steps": 8, "updates": 2, "epochs": 2, "minibatches": 2})


@pytest.fixture(scope="module")
def starts():
    k1, k2 = jax.random.split(jax.random.key(2))
    return jax.random.normal(k1, (20, LATENT)), -1.0 + 0.1 * jax.random.normal(k2, (20, LATENT))


def _run_env(env, params, key, actions, envs):
    """Step `envs` dreams through `actions` [T]; returns the stacked step outputs."""
    k_reset, k_steps = jax.random.split(key)
    _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, envs), params)

    def body(state, xs):
        k, a = xs
        obs, state, reward, term, trunc, info = jax.vmap(env.step, in_axes=(0, 0, None, None))(
            jax.random.split(k, envs), state, a, params)
        return state, {"obs": obs, "reward": reward, "terminated": term, "truncated": trunc, "t": state.t, **info}

    return jax.device_get(jax.lax.scan(body, state, (jax.random.split(k_steps, len(actions)), jnp.asarray(actions)))[1])


@pytest.mark.slow
def test_dream_env_shapes_and_truncation(starts):
    env = ppo.DreamEnv(PPO_SMOKE, horizon=5)
    params = env.params(_action_rewarding_m(), starts)
    obs, state = env.reset(jax.random.key(0), params)
    assert obs.shape == (LATENT + HIDDEN,) == (env.observation_size(LATENT),)
    assert int(state.t) == 0 and float(state.ret) == 0.0
    np.testing.assert_array_equal(obs[LATENT:], 0.0)  # M's carry starts at zero
    out = _run_env(env, params, jax.random.key(1), [1] * 12, envs=3)
    assert out["obs"].shape == (12, 3, LATENT + HIDDEN) and out["reward"].shape == (12, 3)
    assert not out["terminated"].any()  # the done head never fires in this M
    # episodes of exactly 5 steps: truncated at steps 5 and 10, the env resetting itself
    np.testing.assert_array_equal(out["truncated"][:, 0], [t in (4, 9) for t in range(12)])
    np.testing.assert_array_equal(out["t"][:, 0], [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_allclose(out["reward"], R_STEP, rtol=1e-4)  # action 1 earns R_STEP every step
    np.testing.assert_allclose(out["episode_return"][4], 5 * R_STEP, rtol=1e-4)
    # the observation after a reset has M's zero carry; final_obs is the state the step reached
    np.testing.assert_array_equal(out["obs"][4][:, LATENT:], 0.0)
    assert np.all(np.abs(out["final_obs"][4][:, LATENT:]) > 0.5)
    with pytest.raises(ValueError, match=r"starts must be \(mean, logvar\) of shape \[N, 8\]"):
        env.params(_action_rewarding_m(), (starts[0][:, :3], starts[1][:, :3]))
    out0 = _run_env(env, params, jax.random.key(1), [0] * 3, envs=2)
    np.testing.assert_allclose(out0["reward"], -R_STEP, rtol=1e-4)


def test_dream_env_done_head_ends_the_episode_and_its_step_counts(starts):
    m = _action_rewarding_m()
    m["params"]["done_head"]["bias"] = jnp.full((1,), 10.0)  # p_done ~ 1 at every step
    env = ppo.DreamEnv(PPO_SMOKE, horizon=5)
    out = _run_env(env, env.params(m, starts), jax.random.key(3), [1, 1, 1], envs=2)
    assert out["terminated"].all() and not out["truncated"].any()
    np.testing.assert_array_equal(out["t"], 0)  # a new episode after every step
    np.testing.assert_allclose(out["reward"], R_STEP, rtol=1e-4)  # Ha's rule: the ending step still counts
    np.testing.assert_allclose(out["episode_return"], R_STEP, rtol=1e-4)


def _constant_verifier(logit: float):
    """K with zero weights and a final bias `logit`: the same confidence for every transition."""
    from wm_jax.models import verifier

    k = verifier.init(jax.random.key(9), SMOKE.verifier, LATENT, HIDDEN)
    k = jax.tree.map(jnp.zeros_like, k)
    k["params"]["logit"]["bias"] = jnp.full((1,), logit)
    return k


@pytest.mark.slow
def test_dream_env_verifier_weights_or_cuts_the_dream(starts):
    conf = float(jax.nn.sigmoid(0.5))
    weight = _replace(PPO_SMOKE, verifier={"mode": "weight"})
    env = ppo.DreamEnv(weight, horizon=5)
    out = _run_env(env, env.params(_action_rewarding_m(), starts, k_params=_constant_verifier(0.5)),
                   jax.random.key(10), [1, 1], envs=2)
    np.testing.assert_allclose(out["reward"], R_STEP * conf, rtol=1e-4)  # reward * K's confidence
    np.testing.assert_allclose(out["confidence"], conf, rtol=1e-6)
    assert not out["terminated"].any()
    cutoff = _replace(PPO_SMOKE, verifier={"mode": "cutoff", "threshold": 0.7})
    env = ppo.DreamEnv(cutoff, horizon=5)
    out = _run_env(env, env.params(_action_rewarding_m(), starts, k_params=_constant_verifier(0.5)),
                   jax.random.key(10), [1, 1], envs=2)
    assert out["terminated"].all() and np.all(out["reward"] == 0.0)  # an unverified step earns nothing, ends it
    with pytest.raises(ValueError, match="k_params"):
        env.params(_action_rewarding_m(), starts)


@pytest.mark.slow
def test_dream_env_grounding_starts_from_the_pool(starts):
    target = jnp.full((LATENT,), 7.0)
    pool = (jnp.stack([jnp.zeros(LATENT), target]), jnp.full((2, LATENT), -30.0), jnp.asarray([0.0, 1.0]))
    for share, expect_pool in ((1.0, True), (0.0, False)):
        cfg = _replace(PPO_SMOKE, evolve={"grounding": share})
        env = ppo.DreamEnv(cfg)
        params = env.params(_action_rewarding_m(), starts, pool)
        obs, _ = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.key(4), 16), params)
        near = np.all(np.abs(np.asarray(obs[:, :LATENT]) - 7.0) < 1e-3, axis=1)
        assert near.all() if expect_pool else not near.any()


def test_gae_against_a_hand_computed_example():
    reward = jnp.asarray([1.0, 1.0, 1.0])
    value = jnp.asarray([0.5, 0.4, 0.3])
    next_value = jnp.asarray([0.4, 0.3, 2.0])
    g, lam = 0.9, 0.8
    # step 1 truncated: it bootstraps from next_value[1], and no advantage flows back across it
    adv, ret = ppo.gae(reward, value, next_value, jnp.zeros(3), jnp.asarray([0.0, 1.0, 0.0]), g, lam)
    d0, d1, d2 = 1 + g * 0.4 - 0.5, 1 + g * 0.3 - 0.4, 1 + g * 2.0 - 0.3
    np.testing.assert_allclose(adv, [d0 + g * lam * d1, d1, d2], rtol=1e-6)
    np.testing.assert_allclose(ret, np.asarray(adv) + np.asarray(value), rtol=1e-6)
    # step 1 terminal: no bootstrap either
    adv, _ = ppo.gae(reward, value, next_value, jnp.asarray([0.0, 1.0, 0.0]), jnp.asarray([0.0, 1.0, 0.0]), g, lam)
    np.testing.assert_allclose(adv, [d0 + g * lam * (1 - 0.4), 1 - 0.4, d2], rtol=1e-6)
    # batched over envs (axis 1) as the update calls it
    adv_b, _ = ppo.gae(jnp.stack([reward] * 2, 1), jnp.stack([value] * 2, 1), jnp.stack([next_value] * 2, 1),
                       jnp.zeros((3, 2)), jnp.zeros((3, 2)), g, lam)
    np.testing.assert_allclose(adv_b[:, 0], adv_b[:, 1])


def _dream_check(cfg, hp, key, world, ctrl):
    """The 'real' return of a check: the dream score of the checked policy (64 dreams)."""
    ret = dream.scores(cfg, hp, key, world.m_params, ctrl[None], *world.starts, 64, cfg.evolve.horizon)[0]
    return _check_with(lambda c: ret, env_steps=3)(cfg, hp, key, world, ctrl)


def _probe_cfg(**evolve_fields):
    return _replace(PPO_SMOKE, evolve={"generations": 40, "check_every": 10, **evolve_fields}, ppo={"lr": 3e-3})


@pytest.mark.slow
def test_ppo_learns_the_probe_task(tmp_path, starts):
    """In the probe M every step of action 1 earns R_STEP and of action 0 -R_STEP: the optimum is
    H * R_STEP per dream. The near-uniform first policy scores about 0; within 80 updates PPO's
    greedy policy reaches the optimum."""
    cfg = _probe_cfg()
    H = cfg.evolve.horizon
    res = driver.search(cfg, jax.random.key(5), _world(_action_rewarding_m(), starts), tmp_path, progress=False,
                        check=_dream_check)[0]
    assert abs(res["history"][0]["dream_mean"]) < 0.5 * H * R_STEP  # random actions: about 0
    assert res["best_real"] > 0.95 * H * R_STEP, res["checks"]
    assert res["history"][-1]["dream_mean"] > 0.8 * H * R_STEP  # the stochastic policy too
    assert [c["generation"] for c in res["checks"]] == [10, 20, 30, 40]
    assert res["real_env_steps"] == 3 * 4 and res["best_real"] == max(c["real_return"] for c in res["checks"])
    best = jnp.asarray(res["best"])
    z, h = jax.random.normal(jax.random.key(6), (64, LATENT)), jax.random.uniform(jax.random.key(7), (64, HIDDEN))
    assert np.all(np.asarray(controller.act(cfg.controller, best, z, h)) == 1)  # C acts greedily: action 1
    assert driver.imagined_steps(cfg, 40, 4) == 40 * 2 * 32 * 8 + 4 * cfg.evolve.rollouts * H


def test_the_policys_log_probability_and_entropy():
    logits = jnp.asarray([[0.3, -1.2, 2.0], [0.0, 0.0, 0.0]])
    logp, ent = ppo.log_prob_entropy(logits, jnp.asarray([2, 1]))
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits)[jnp.arange(2), jnp.asarray([2, 1])], rtol=1e-6)
    np.testing.assert_allclose(ent[1], np.log(3.0), rtol=1e-6)  # uniform over 3
    mean, log_std, u = jnp.asarray([[0.5, -1.0]]), jnp.asarray([0.2, -0.7]), jnp.asarray([[1.1, -0.4]])
    logp, ent = ppo.log_prob_entropy(mean, u, log_std)
    want = jax.scipy.stats.norm.logpdf(u, mean, jnp.exp(log_std)).sum(-1)
    np.testing.assert_allclose(logp, want, rtol=1e-6)
    np.testing.assert_allclose(ent, [np.sum(0.5 * np.log(2 * np.pi * np.e) + np.asarray(log_std))], rtol=1e-6)


def test_a_continuous_policy_samples_within_the_bounds_around_the_controllers_action():
    ccfg = ControllerConfig(actions=2, continuous=True, low=(-2.0, 0.0), high=(2.0, 1.0))
    out = jnp.broadcast_to(jnp.asarray([0.4, -0.3]), (4000, 2))
    step, u, logp = ppo.sample_action(ccfg, jax.random.key(3), out, jnp.asarray([-1.0, 1.0]))
    step, u = np.asarray(step), np.asarray(u)
    assert np.all(step[:, 0] >= -2.0) and np.all(step[:, 0] <= 2.0) and np.all((step[:, 1] >= 0) & (step[:, 1] <= 1))
    np.testing.assert_allclose(step, controller.squash(ccfg, u), rtol=1e-6)  # the dream steps with squash(u)
    np.testing.assert_allclose(u.mean(0), [0.4, -0.3], atol=0.1)  # u ~ N(out, exp(log_std))
    np.testing.assert_allclose(u.std(0), np.exp([-1.0, 1.0]), rtol=0.05)
    assert logp.shape == (4000,)


@pytest.mark.slow
def test_ppo_learns_a_continuous_probe_task(tmp_path, starts):
    """The probe with one action number a in [-1, 1] (a dense input to M): reward tanh(tanh(3a))
    a step, best at a = 1. The Gaussian policy starts around a = 0 (about 0 a step); PPO's greedy
    policy, the controller's squashed output, reaches near the optimum."""
    action = {"actions": 1, "continuous": True}
    cfg = _replace(_probe_cfg(), transition=action, verifier=action,
                   controller={**action, "low": -1.0, "high": 1.0})
    H = cfg.evolve.horizon
    m = _action_rewarding_m(tcfg=cfg.transition)
    res = driver.search(cfg, jax.random.key(5), _world(m, starts), tmp_path, progress=False, check=_dream_check)[0]
    assert abs(res["history"][0]["dream_mean"]) < 0.5 * H * R_STEP
    assert res["best_real"] > 0.95 * H * R_STEP, res["checks"]
    z, h = jnp.asarray(starts[0]), jnp.zeros((starts[0].shape[0], HIDDEN))  # the dreams' first states
    a = np.asarray(controller.act(cfg.controller, jnp.asarray(res["best"]), z, h))
    assert a.shape == (20, 1) and np.all(a > 0.5) and np.all(a <= 1.0)  # toward a = 1, within the bounds


@pytest.mark.slow
def test_ppo_search_resumes_after_a_kill_with_the_same_result(tmp_path, starts, monkeypatch):
    cfg = _probe_cfg(generations=6, check_every=2)
    world = _world(_action_rewarding_m(), starts)
    whole = driver.search(cfg, jax.random.key(8), world, tmp_path / "whole", progress=False, check=_dream_check)[0]
    real_save, saves = checkpoint.save, []

    def save_then_die(mngr, step, state, config):
        real_save(mngr, step, state, config)
        saves.append(step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        driver.search(cfg, jax.random.key(8), world, tmp_path / "cut", progress=False, check=_dream_check)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = driver.search(cfg, jax.random.key(8), world, tmp_path / "cut", progress=False, check=_dream_check)[0]
    assert saves == [2, 4]
    assert resumed["history"] == whole["history"] and resumed["checks"] == whole["checks"]
    np.testing.assert_array_equal(resumed["best"], whole["best"])
    assert resumed["best_real"] == whole["best_real"] and resumed["real_env_steps"] == whole["real_env_steps"]


@pytest.mark.slow
def test_ppo_cells_search_side_by_side(tmp_path, starts):
    """A batch of cells (wm_jax.search.sweep's shape): two seeds vmapped, each learning the probe."""
    cfg = _probe_cfg(generations=30)
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    hp = jax.tree.map(lambda x: jnp.stack([x, x]), cfg.hyper())
    out = driver.search(cfg, keys, _world(_action_rewarding_m(), starts), tmp_path, hp=hp, progress=False,
                        check=_dream_check, batched=True)
    assert len(out) == 2 and out[0]["history"] != out[1]["history"]  # two seeds, two searches
    for res in out:
        assert res["best_real"] > 0.95 * cfg.evolve.horizon * R_STEP


def test_ppo_config_is_validated():
    with pytest.raises(ConfigError, match="minibatches"):
        _replace(PPO_SMOKE, ppo={"envs": 3, "steps": 1, "minibatches": 2})
    with pytest.raises(ConfigError, match="trainer"):
        _replace(SMOKE, evolve={"trainer": "sgd"})
    with pytest.raises(ConfigError, match="gamma"):
        _replace(PPO_SMOKE, ppo={"gamma": 1.5})
    assert with_trainer(PPO_SMOKE, "ppo") is PPO_SMOKE
    assert with_trainer(PPO_SMOKE, "cmaes").controller.kind == "linear"


@pytest.mark.slow
def test_an_agent_trained_with_ppo_runs_loads_and_acts(tmp_path):
    """The pipeline end to end with trainer ppo (one round): the summary names the trainer and
    counts its imagined steps, and the agent loads and acts as any other."""
    from wm_jax import pipeline
    from wm_jax.agent import Agent
    from wm_jax.envs.cartpole import PixelCartPole

    cfg = _replace(PPO_SMOKE, rounds={"rounds": 1})
    summary = pipeline.run(cfg, tmp_path / "run", progress=False)
    assert summary["trainer"] == "ppo"
    gens, checks = cfg.evolve.generations, cfg.evolve.generations // cfg.evolve.check_every
    assert summary["imagined_steps"] == driver.imagined_steps(cfg, gens, checks) > 0
    agent = Agent.load(tmp_path / "run")
    assert agent.cfg.evolve.trainer == "ppo" and agent.cfg.controller.kind == "mlp"
    obs, _ = PixelCartPole().reset(jax.random.key(0))
    assert agent.act(agent.initial_carry(), obs)[0] in (0, 1)
    ev = agent.evaluate()
    assert ev["return_mean"] == pytest.approx(summary["real_return_mean"])
    assert transition.hidden(agent.initial_carry()).shape == (cfg.transition.hidden,)
    # experiments/trainers.py tabulates it (and replaces its block in a results document)
    from test_sample_efficiency import _load

    trainers = _load("trainers")
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"intro\n{trainers.BEGIN}\nold table\n{trainers.END}\nafter\n")
    assert trainers.main([str(tmp_path / "run"), "--out", str(tmp_path / "res"), "--results-md", str(doc)]) == 0
    md = (tmp_path / "res" / "trainers.md").read_text()
    assert "| ppo (mlp 8) | 0 |" in md and f"{summary['real_return_mean']:.1f}" in md
    text = doc.read_text()
    assert "old table" not in text and md in text and text.startswith("intro") and text.endswith("after\n")
    assert trainers.main([str(tmp_path / "nothing")]) == 2
