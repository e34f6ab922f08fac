"""The recipe on every task of wm_jax.envs: configs per task (presets.with_env / check_env), the
datasets' schema and validation per task, discrete and continuous actions through M, K and C, the
real episodes, the solved verdict, and `wm-jax run --preset smoke --env NAME` end to end (slow)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax import cli, envs, pipeline, run_dir
from wm_jax.agent import Agent
from wm_jax.config import ConfigError, ControllerConfig
from wm_jax.models import controller, imagination, transition, verifier
from wm_jax.presets import check_env, get_preset, with_env, with_trainer
from wm_jax.search import macro, rollout
from wm_jax.store import collection, data

SMOKE = get_preset("smoke")


@pytest.mark.parametrize("name", envs.names())
def test_with_env_sets_what_follows_from_the_task(name):
    cfg = with_env(SMOKE, name)
    check_env(cfg)
    spec = envs.spec(name)
    space = spec.action_space
    count = space.n if space.kind == "discrete" else int(np.prod(space.shape))
    for section in (cfg.transition, cfg.verifier, cfg.controller):
        assert (section.actions, section.continuous) == (count, space.kind == "continuous")
    assert cfg.env == name and cfg.eval.solved_at == spec.solved_threshold
    assert cfg.data.max_steps == spec.max_steps  # smoke collects whole episodes: the task's own limit
    assert cfg.eval.max_steps == min(50, spec.max_steps)  # smoke's short evaluation stays short
    assert cfg.evolve.stop_at is None  # a 50-step check says nothing against a whole episode's threshold
    assert with_env(cfg, name) is cfg


def test_with_env_stops_at_the_tasks_threshold_where_checks_play_whole_episodes():
    cfg = with_env(get_preset("frugal"), "Acrobot-v1")
    assert (cfg.eval.max_steps, cfg.evolve.stop_at, cfg.evolve.confirm_episodes) == (500, -100.0, 4)
    assert cfg.evolve.sequential  # frugal's sequential checks stop against the task's threshold
    cfg = with_env(get_preset("frugal"), "Pendulum-v1")  # no threshold: no stop, nothing to confirm
    assert (cfg.eval.max_steps, cfg.evolve.stop_at, cfg.evolve.confirm_episodes) == (200, None, 0)
    assert not cfg.evolve.sequential  # nothing to stop against (a sequential check needs stop_at)


@pytest.mark.parametrize("name", envs.names())
def test_the_default_preset_plays_every_task(name):
    check_env(with_env(get_preset("frugal"), name))  # sequential checks only where a check can reach stop_at


def test_check_env_refuses_a_config_that_does_not_play_its_task():
    cfg = dataclasses.replace(SMOKE, env="Acrobot-v1")  # the name alone: M, K and C still play 2 actions
    with pytest.raises(ConfigError, match="Acrobot-v1 plays"):
        check_env(cfg)
    with pytest.raises(ConfigError, match="unknown environment 'Nope-v0'"):
        check_env(dataclasses.replace(SMOKE, env="Nope-v0"))
    with pytest.raises(ConfigError, match="step limit"):
        check_env(dataclasses.replace(with_env(SMOKE, "MountainCar-v0"), data=dataclasses.replace(
            SMOKE.data, max_steps=500)))
    check_env(with_trainer(with_env(SMOKE, "Acrobot-v1"), "ppo"))  # PPO plays any task, discrete
    check_env(with_trainer(with_env(SMOKE, "Pendulum-v1"), "ppo"))  # ... or continuous


def test_macro_actions_are_refused_off_cartpole_in_one_line():
    with pytest.raises(ValueError, match="continuous actions \\(macro-actions need discrete ones\\)"):
        macro.style_config(with_env(SMOKE, "Pendulum-v1"), "twice", macro.MACROS)
    with pytest.raises(ValueError, match="Acrobot-v1 has discrete actions"):
        macro.style_config(with_env(SMOKE, "Acrobot-v1"), "twice", macro.MACROS)


# --------------------------------------------------------------------------------------------
# Actions through C, M and K


def _world(cfg, key=jax.random.key(0)):
    latent, hidden = cfg.vae.latent, cfg.transition.hidden
    m = transition.init(key, cfg.transition, latent)
    k = verifier.init(key, cfg.verifier, latent, hidden)
    flat = jax.random.normal(key, (controller.num_params(cfg.controller, latent, hidden),)) * 5.0
    return m, k, flat


def test_a_discrete_tasks_controller_picks_one_of_its_actions():
    cfg = with_env(SMOKE, "Acrobot-v1")
    m, _, _ = _world(cfg)
    latent, hidden = cfg.vae.latent, cfg.transition.hidden
    z, h = jax.random.normal(jax.random.key(1), (256, latent)), jax.random.normal(jax.random.key(2), (256, hidden))
    seen = set()
    for i in range(8):  # several controllers: between them every action is someone's argmax
        flat = jax.random.normal(jax.random.key(10 + i), (controller.num_params(cfg.controller, latent, hidden),))
        a = controller.act(cfg.controller, flat, z, h)
        assert a.dtype == jnp.int32 and a.shape == (256,)
        seen |= set(np.asarray(a).tolist())
    assert seen == {0, 1, 2}
    assert m["params"]["lstm"]["ii"]["kernel"].shape[0] == latent + 3  # M's one-hot has the task's 3 rows


@pytest.mark.parametrize("low, high", [(-2.0, 2.0), ((-1.0, 0.0), (3.0, 0.5))])
def test_a_continuous_controller_stays_within_the_bounds(low, high):
    ccfg = ControllerConfig(actions=2, continuous=True, low=low, high=high)
    latent, hidden = 4, 6
    flat = 100.0 * jax.random.normal(jax.random.key(0), (controller.num_params(ccfg, latent, hidden),))
    z, h = jax.random.normal(jax.random.key(1), (512, latent)), jax.random.normal(jax.random.key(2), (512, hidden))
    a = np.asarray(controller.act(ccfg, flat, z, h))
    lo, hi = np.broadcast_to(low, (2,)), np.broadcast_to(high, (2,))
    assert a.dtype == np.float32 and a.shape == (512, 2)
    assert (a >= lo).all() and (a <= hi).all()
    assert (a <= lo + 1e-3).any() and (a >= hi - 1e-3).any()  # saturated outputs reach the bounds, not past
    mid = controller.squash(ccfg, jnp.zeros((2,)))
    np.testing.assert_allclose(mid, (lo + hi) / 2, rtol=1e-6)


def test_controller_bounds_are_validated():
    with pytest.raises(ConfigError, match="bounds"):
        ControllerConfig(actions=2, continuous=True, low=1.0, high=-1.0)
    with pytest.raises(ConfigError, match="bounds"):
        ControllerConfig(actions=2, continuous=True, low=(-1.0, -1.0, -1.0), high=1.0)


def test_a_continuous_action_is_a_dense_map_into_m_and_k():
    """M's packed step equals flax's reference on a continuous action vector; the action moves the
    gates linearly (a dense map, not a lookup); K reads the vector too; imagine takes given vectors."""
    cfg = with_env(SMOKE, "Pendulum-v1")
    m, k, flat = _world(cfg)
    tcfg, latent = cfg.transition, cfg.vae.latent
    carry = transition.initial_carry(tcfg, 3)
    z = jax.random.normal(jax.random.key(3), (3, latent))
    a = jnp.asarray([[-2.0], [0.5], [1.75]], jnp.float32)
    _, pred = transition.step(tcfg, m, carry, z, a)
    _, ref = transition._Net(tcfg.hidden, latent, transition.components(tcfg), 1, True).apply(m, carry, z, a)
    np.testing.assert_allclose(pred.reward, ref.reward, rtol=1e-5, atol=1e-5)
    cell = transition.pack(tcfg, m)
    gates = [transition.action_gates(cell, jnp.asarray([v], jnp.float32)) for v in (0.0, 1.0, 2.0)]
    np.testing.assert_allclose(gates[2] - gates[1], gates[1] - gates[0], rtol=1e-5, atol=1e-6)
    conf = verifier.confidence(cfg.verifier, k, jnp.zeros((3, tcfg.hidden)), z, a, z)
    assert conf.shape == (3,) and np.isfinite(np.asarray(conf)).all()
    _, im = imagination.imagine(tcfg, m, jax.random.key(4), transition.initial_carry(tcfg), z[0], 5,
                                actions=jnp.full((5, 1), 1.5))
    assert im["action"].dtype == jnp.float32 and np.allclose(im["action"], 1.5)


def test_the_discrete_path_keeps_its_numerics():
    """CartPole's packed M has no action bias (the bias is folded into the lookup rows), and its
    checkpoints record neither the action count nor the kind, as before tasks had either."""
    m, _, _ = _world(SMOKE)
    cell = transition.pack(SMOKE.transition, m)
    assert cell.action_bias is None and cell.action.shape == (2, 4 * SMOKE.transition.hidden)
    recorded = transition.model_config(SMOKE.transition, SMOKE.vae.latent)
    assert "actions" not in recorded and "continuous" not in recorded
    assert "actions" not in verifier.model_config(SMOKE, SMOKE.vae.latent)
    acro = with_env(SMOKE, "Acrobot-v1")
    assert transition.model_config(acro.transition, 8)["actions"] == 3
    pend = with_env(SMOKE, "Pendulum-v1")
    assert transition.model_config(pend.transition, 8)["continuous"] is True


@pytest.mark.parametrize("name", ["Acrobot-v1", "Pendulum-v1"])
def test_real_episodes_and_the_collection_policy_play_the_task(name):
    cfg = with_env(SMOKE, name)
    m, _, flat = _world(cfg)
    from wm_jax.models import vae

    params = {"vae": vae.init(jax.random.key(5), cfg.vae), "transition": m, "controller": flat}
    ev = rollout.evaluate(cfg, params, jax.random.key(6), num_episodes=2, max_steps=12)
    low, high = envs.spec(name).reward_range
    assert ev["env_steps"] == 24 and ev["cut"] == 2  # 12 steps stop both short of the task's limit
    assert low * 12 <= ev["return_mean"] <= high * 12
    ds = collection.collect(jax.random.key(7), 2, policy=rollout.agent_policy(cfg), max_steps=12, chunk_size=2,
                            progress=False, params=params, env=name)
    assert ds.features == data.features(name)


# --------------------------------------------------------------------------------------------
# Datasets per task


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A few random episodes of a discrete and a continuous task, saved."""
    out = {}
    for name in ("Acrobot-v1", "Pendulum-v1"):
        ds = collection.collect(jax.random.key(0), 3, max_steps=20, chunk_size=3, progress=False, env=name)
        out[name] = (ds, data.save_dataset(ds, tmp_path_factory.mktemp("data") / name, env=name))
    return out


@pytest.mark.parametrize("name", envs.names())
def test_collected_frames_are_the_tasks_frames(name):
    """The frames drawn back from stored states equal the pixel environment's own observations."""
    ds = collection.collect(jax.random.key(1), 2, max_steps=6, chunk_size=2, progress=False, env=name)
    cols = data.to_arrays(ds)
    env = envs.make(name)
    obs, state = env.reset(jax.random.split(jax.random.split(jax.random.fold_in(jax.random.key(1), 0), 2)[0])[0])
    np.testing.assert_array_equal(cols["frame"][0], np.asarray(obs[..., -1]))
    assert cols["state"].shape[1] == envs.codec(name).size
    space = envs.spec(name).action_space
    if space.kind == "discrete":
        assert cols["action"].dtype == np.int32 and ((cols["action"] >= 0) & (cols["action"] < space.n)).all()
    else:
        assert cols["action"].shape[1:] == space.shape
        assert ((cols["action"] >= space.low) & (cols["action"] <= space.high)).all()


def test_a_saved_dataset_loads_as_its_task(saved):
    for name, (ds, path) in saved.items():
        assert data.task(path) == name
        loaded = data.load_dataset(path, name)
        assert loaded.features == data.features(name)
        np.testing.assert_array_equal(data.to_arrays(loaded)["action"], data.to_arrays(ds)["action"])
    with pytest.raises(data.DatasetError, match="holds Acrobot-v1 episodes, not CartPole-v1's"):
        data.load_dataset(saved["Acrobot-v1"][1], "CartPole-v1")


def _resave(ds, path, name, column, change):
    cols = data.to_arrays(ds)
    cols[column] = change(cols[column])
    return data.save_dataset(datasets.Dataset.from_dict(cols, features=data.features(name)), path, env=name)


@pytest.mark.parametrize("name, column, change, words", [
    ("Acrobot-v1", "action", lambda a: np.where(np.arange(a.size) == 2, 3, a), "Acrobot-v1 has actions 0 to 2"),
    ("Acrobot-v1", "reward", lambda r: np.where(np.arange(r.size) == 1, 1.0, r), "pays -1 to 0 per step"),
    ("Pendulum-v1", "action", lambda a: np.where(np.arange(len(a))[:, None] == 4, 2.5, a), "within [-2.0, 2.0]"),
    ("Pendulum-v1", "action", lambda a: np.where(np.arange(len(a))[:, None] == 4, np.nan, a), "within [-2.0, 2.0]"),
])
def test_load_refuses_values_the_task_cannot_make(saved, tmp_path, name, column, change, words):
    path = _resave(saved[name][0], tmp_path / "bad", name, column, change)
    with pytest.raises(data.DatasetError, match="row") as info:
        data.load_dataset(path)
    assert words in str(info.value)


def test_a_manifest_without_a_task_is_cartpoles(tmp_path):
    ds = collection.collect(jax.random.key(0), 2, max_steps=10, chunk_size=2, progress=False)
    path = data.save_dataset(ds, tmp_path / "old")
    manifest = json.loads((path / data.MANIFEST).read_text())
    del manifest["env"]
    (path / data.MANIFEST).write_text(json.dumps(manifest))
    assert data.task(path) == "CartPole-v1" and data.load_dataset(path, "CartPole-v1").num_rows == ds.num_rows


def test_cartpoles_collection_keeps_its_draws_and_schema():
    """CartPole's random actions are the Bernoulli draws its data always had, its frames are
    `cartpole.render(x, theta)`, and its schema is the four-number state and the int32 action."""
    from wm_jax.envs import cartpole

    key = jax.random.key(3)
    assert int(collection.random_action(envs.spec("CartPole-v1").action_space, key)) == int(jax.random.bernoulli(key))
    cols = data.to_arrays(collection.collect(jax.random.key(2), 3, max_steps=20, chunk_size=3, progress=False))
    frames = jax.vmap(cartpole.render)(cols["state"][:, 0], cols["state"][:, 2])
    np.testing.assert_array_equal(cols["frame"], np.asarray(frames))
    assert data.FEATURES["state"].length == 4 and data.FEATURES["action"] == datasets.Value("int32")


# --------------------------------------------------------------------------------------------
# The solved verdict, the CLI, and the whole recipe per task


@pytest.mark.parametrize("solved_at, cut, mean, verdict", [
    (475.0, 0, 480.0, True), (475.0, 0, 20.0, False), (-100.0, 2, -50.0, None), (None, 0, -3.0, None)])
def test_solved_needs_a_threshold_and_whole_episodes(solved_at, cut, mean, verdict):
    cfg = dataclasses.replace(SMOKE, eval=dataclasses.replace(SMOKE.eval, solved_at=solved_at))
    assert pipeline.solved(cfg, {"return_mean": mean, "cut": cut}) is verdict


def test_the_cli_offers_every_registered_task_and_names_its_directory(monkeypatch, tmp_path):
    assert cli.ENVS == envs.names()
    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda cfg, out: seen.update(cfg=cfg, out=out) or {
        "preset": cfg.preset, "wall_s": {}, "device": "cpu", **{k: 0.0 for k in (
            "seed", "real_return_mean", "real_return_std", "real_return_min", "real_episodes", "solved",
            "real_env_steps", "dream_real_corr", "latent_kl")}})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--preset", "smoke", "--env", "MountainCar-v0"]) == 0
    assert seen["out"] == Path("runs") / "smoke-MountainCar-v0" and seen["cfg"].transition.actions == 3
    assert cli.main(["run", "--preset", "smoke", "--env", "CartPole-v1"]) == 0
    assert seen["out"] == Path("runs") / "smoke" and seen["cfg"] == SMOKE
    with pytest.raises(SystemExit):
        cli.main(["run", "--env", "Nope-v0"])


@pytest.mark.slow
@pytest.mark.parametrize("name", envs.names())
def test_smoke_runs_end_to_end_on_every_task(name, tmp_path):
    """`wm-jax run --preset smoke --env NAME`: the whole recipe, its summary, and the agent loaded back."""
    out = tmp_path / name
    assert cli.main(["run", "--preset", "smoke", "--env", name, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"] == name and np.isfinite(summary["real_return_mean"])
    assert summary["solved"] in (None, False, True)
    if envs.spec(name).solved_threshold is None:
        assert summary["solved"] is None
    agent = Agent.load(out)
    assert agent.cfg.env == name
    action, _ = agent.act(agent.initial_carry(), np.zeros((64, 64, 4), np.uint8))
    space = envs.spec(name).action_space
    if space.kind == "continuous":
        assert np.asarray(action).shape == space.shape
        assert space.low <= float(np.asarray(action).ravel()[0]) <= space.high
    else:
        assert 0 <= int(action) < space.n


@pytest.mark.slow
def test_a_cartpole_run_directory_without_the_task_fields_keeps_working(smoke_run, tmp_path):
    """A run directory written before tasks existed (config.json without env and the action kinds,
    manifests without env) is CartPole's: the rerun returns its summary and the agent loads."""
    out = tmp_path / "old"
    shutil.copytree(smoke_run[0], out)
    saved = json.loads((out / "config.json").read_text())
    del saved["env"], saved["transition"]["continuous"], saved["verifier"]["continuous"]
    for key in ("continuous", "low", "high"):
        del saved["controller"][key]
    (out / "config.json").write_text(json.dumps(saved))
    for manifest in (out / "data").glob(f"round*/{data.MANIFEST}"):
        record = json.loads(manifest.read_text())
        del record["env"]
        manifest.write_text(json.dumps(record))
    assert run_dir.read_config(out) == SMOKE
    again = pipeline.run(SMOKE, out, progress=False)
    assert {k: again[k] for k in ("real_return_mean", "real_env_steps", "latent_kl")} == \
        {k: smoke_run[1][k] for k in ("real_return_mean", "real_env_steps", "latent_kl")}
    assert Agent.load(out).cfg == SMOKE
