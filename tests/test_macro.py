"""Tests for wm_jax.search.macro: the macro set, macro-M's training arrays, the two macro dream styles, the
real macro rollout, and the action count of M and C (old checkpoints keep loading)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import controller, imagination, transition, vae, verifier
from wm_jax.search import macro
from wm_jax.store import checkpoint, data
from wm_jax.config import (
    Config,
    ConfigError,
    ControllerConfig,
    TrainConfig,
    TransitionConfig,
)
from wm_jax.presets import get_preset

LATENT = 8


def _tcfg(**kw) -> TransitionConfig:
    return TransitionConfig(hidden=16, mixtures=3, seq_len=8, **kw,
                            train=TrainConfig(steps=20, batch=4, chunk=10, checkpoint_every=20))


def _episodes(lengths, actions_seed=0):
    """Hand-made primitive rows of episodes with these lengths: latent mean = the row number,
    random actions, reward 1, done on the last row of every episode but a truncated last one."""
    rng = np.random.default_rng(actions_seed)
    episode = np.concatenate([np.full(n, e) for e, n in enumerate(lengths)])
    t = np.concatenate([np.arange(n) for n in lengths])
    index = data.EpisodeIndex.from_columns(episode, t)
    action = rng.integers(0, 2, episode.size)
    done = index.is_last.copy()
    done[-1] = False  # the last episode was cut short (truncated): no done
    cols = {"action": action, "reward": np.ones(episode.size, np.float32), "done": done}
    mean = np.repeat(np.arange(episode.size, dtype=np.float32)[:, None], LATENT, 1)
    return mean, mean - 100.0, cols, index


@pytest.mark.parametrize("lengths", [(5, 4, 1, 2, 7), (6, 3)])
def test_training_arrays_both_phases_and_terminal_done(lengths):
    mean, logvar, cols, index = _episodes(lengths)
    out = macro.training_arrays(mean, logvar, cols, index)
    assert all(v.shape[0] == mean.shape[0] for v in out.values())  # every primitive row starts one macro row
    pair = {m: i for i, m in enumerate(macro.MACROS)}
    row, start = 0, 0
    for e, n in enumerate(lengths):
        last_episode = e == len(lengths) - 1
        for phase in (0, 1):
            ts = list(range(phase, n, 2))
            for j, t in enumerate(ts):
                r, prim = row + j, start + t
                assert out["mean"][r, 0] == prim and out["logvar"][r, 0] == prim - 100.0
                assert out["is_first"][r] == (j == 0) and out["is_last"][r] == (j == len(ts) - 1)
                a = cols["action"][prim]
                if t + 1 < n:  # a full macro
                    assert out["action"][r] == pair[(a, cols["action"][prim + 1])]
                    assert out["reward"][r] == 2.0
                    ends = t + 1 == n - 1
                else:  # the trailing lone step: macro (a, a), one reward, the episode's own done
                    assert out["action"][r] == pair[(a, a)]
                    assert out["reward"][r] == 1.0
                    ends = True
                assert out["done"][r] == (ends and not last_episode)
            row += len(ts)
        start += n
    # every ended episode's terminal done appears once in each of its non-empty phases
    ended = [n for n in lengths[:-1]]
    assert out["done"].sum() == sum(1 + (n > 1) for n in ended)


def test_training_arrays_rows_are_transition_training_rows():
    """The arrays feed transition.sequence_batch: a window's next latent is the next macro's (t + 2)."""
    mean, logvar, cols, index = _episodes((9, 8))
    out = macro.training_arrays(mean, logvar, cols, index)
    d = {k: jnp.asarray(v) for k, v in out.items()}
    d["logvar"] = jnp.full_like(d["logvar"], -30.0)  # z = mean
    b = transition.sequence_batch(jax.random.key(0), d, 16, 3)
    z, z_next, nv = np.asarray(b["z"][..., 0]), np.asarray(b["z_next"][..., 0]), np.asarray(b["next_valid"])
    np.testing.assert_allclose(z_next[nv], z[nv] + 2.0, atol=1e-3)


def test_training_arrays_lone_step_without_the_repeat_macro():
    macros = ((0, 1), (1, 0))
    mean, logvar, _, index = _episodes((3,))
    cols = {"action": np.array([0, 1, 1]), "reward": np.ones(3, np.float32), "done": np.array([False, False, True])}
    with pytest.raises(ValueError, match=r"\(1, 1\)"):  # a pair of the data that no macro covers
        macro.training_arrays(mean, logvar, cols, index, macros)
    cols["action"] = np.array([0, 1, 0])
    out = macro.training_arrays(mean, logvar, cols, index, macros)
    # rows: phase 0 (t = 0: (0, 1); t = 2: lone 0 -> (0, 1), the first macro starting with 0, as
    # (0, 0) is missing), then phase 1 (t = 1: (1, 0)); both phases end with the terminal done
    np.testing.assert_array_equal(out["action"], [0, 0, 1])
    np.testing.assert_array_equal(out["done"], [False, True, True])
    np.testing.assert_array_equal(out["reward"], [2.0, 1.0, 2.0])


@pytest.mark.parametrize("bad", [(), ((0, 2),), ((0, 1), (0, 1)), ((0,),), 5, ((True, 0),), ((0.5, 1),)])
def test_bad_macro_sets(bad):
    with pytest.raises(ValueError):
        macro.validate(bad)


@pytest.mark.slow
def test_twice_is_2n_primitive_steps_of_m():
    """n macro steps of style "twice" = imagination.imagine's 2n steps under the flattened primitives,
    same key: the same noise, carries, samples and predictions."""
    tcfg = _tcfg()
    params = transition.init(jax.random.key(0), tcfg, LATENT)
    n, key = 6, jax.random.key(3)
    z0, carry = jax.random.normal(jax.random.key(1), (LATENT,)), transition.initial_carry(tcfg)
    macros = jax.random.randint(jax.random.key(2), (n,), 0, 4)
    flat = jnp.asarray(macro.primitive_table(macro.MACROS))[macros].reshape(-1)
    c_m, tr = jax.jit(lambda: imagination.imagine(tcfg, params, key, carry, z0, n, 0.8, actions=macros,
                                                  step=macro.twice(macro.MACROS), substeps=2))()
    c_p, ref = jax.jit(lambda: imagination.imagine(tcfg, params, key, carry, z0, 2 * n, 0.8, actions=flat))()
    np.testing.assert_allclose(tr["steps"]["z_next"].reshape(2 * n, LATENT), ref["z_next"], atol=1e-5)
    np.testing.assert_allclose(tr["steps"]["h"].reshape(2 * n, -1), ref["h"], atol=1e-5)
    np.testing.assert_array_equal(tr["steps"]["action"].reshape(-1), flat)
    np.testing.assert_allclose(tr["z_next"], ref["z_next"][1::2], atol=1e-5)
    np.testing.assert_allclose(tr["z"], ref["z"][0::2], atol=1e-5)
    for a, b in zip(jax.tree.leaves(tr["pred"]), jax.tree.leaves(ref["pred"])):
        np.testing.assert_allclose(a.reshape(b.shape), b, atol=1e-5)
    for a, b in zip(c_m, c_p):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_twice_dream_adds_rewards_and_a_done_after_the_first_move_ends_it():
    cfg = macro.style_config(Config(transition=_tcfg()), "twice", macro.MACROS)
    params = transition.init(jax.random.key(0), cfg.transition, LATENT)
    # the done head fires always: the first move of the first macro ends the dream; the second earns nothing
    params = jax.tree.map(lambda x: x, params)
    params["params"]["done_head"]["bias"] = jnp.full((1,), 50.0)
    params["params"]["reward_head"]["bias"] = jnp.full((1,), 1.0)
    params["params"]["reward_head"]["kernel"] = jnp.zeros_like(params["params"]["reward_head"]["kernel"])
    ctrl = jnp.zeros((controller.num_params(cfg.controller, LATENT, 16),))
    tr, ret = macro.dream(cfg, cfg.hyper(), jax.random.key(0), params, ctrl, jnp.zeros((LATENT,)), 5, "twice",
                          macro.MACROS)
    assert float(ret) == pytest.approx(1.0)
    np.testing.assert_allclose(tr["alive"], [1, 0, 0, 0, 0])
    params["params"]["done_head"]["bias"] = jnp.full((1,), -50.0)  # never done: two rewards per macro
    tr, ret = macro.dream(cfg, cfg.hyper(), jax.random.key(0), params, ctrl, jnp.zeros((LATENT,)), 5, "twice",
                          macro.MACROS)
    assert float(ret) == pytest.approx(10.0)


@pytest.mark.slow
def test_old_m_checkpoint_config_without_actions_loads(tmp_path):
    """M checkpoints written before TransitionConfig.actions existed record no "actions" in their
    model config: at the default (2) the config is the old one, so they keep loading."""
    tcfg = _tcfg()
    skip = {"train", "compute_dtype", "input_dropout", "z_penalty", "contrastive", "contrastive_temperature"}
    old_keys = set(dataclasses.asdict(tcfg)) - skip - {"actions", "continuous"}  # what the code before the fields wrote
    assert set(transition.model_config(tcfg, LATENT)) == old_keys | {"latent"}
    assert transition.model_config(dataclasses.replace(tcfg, actions=4), LATENT)["actions"] == 4
    full = Config(vae=dataclasses.replace(Config().vae, latent=LATENT), transition=tcfg)
    saved = transition.train(full, jax.random.key(1), _rows()[0], tmp_path, progress=False)[0]
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and b"done_pos_weight" in p.read_bytes()]
    assert stored and not any(b'"actions"' in p.read_bytes() for p in stored)
    loaded = transition.load(full, tmp_path)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError):  # a macro-M (4 actions) is another model: not loaded from there
        transition.load(dataclasses.replace(full, transition=dataclasses.replace(tcfg, actions=4),
                                            verifier=dataclasses.replace(full.verifier, actions=4)), tmp_path)


def _rows():
    mean, _, cols, index = _episodes((12, 9, 14))
    rng = np.random.default_rng(1)
    mean = rng.normal(size=mean.shape).astype(np.float32)
    return transition.training_arrays(mean, np.full_like(mean, -2.0), cols, index), (mean, cols, index)


@pytest.mark.slow
def test_macro_m_with_four_actions_trains_and_imagines(tmp_path):
    _, (mean, cols, index) = _rows()
    arrays = macro.training_arrays(mean, np.full_like(mean, -2.0), cols, index)
    base = Config(vae=dataclasses.replace(Config().vae, latent=LATENT), transition=_tcfg(),
                  controller=ControllerConfig())
    cfg = macro.style_config(base, "macro_m", macro.MACROS)
    assert cfg.transition.actions == 4 and cfg.controller.actions == 4
    params, info = transition.train(cfg, jax.random.key(0), arrays, tmp_path, progress=False)
    assert params["params"]["lstm"]["ii"]["kernel"].shape[0] == LATENT + 4
    assert np.isfinite(info["final"]["loss"])
    _, im = imagination.imagine(cfg.transition, params, jax.random.key(1), transition.initial_carry(cfg.transition),
                               jnp.zeros((LATENT,)), 5, actions=jnp.array([0, 1, 2, 3, 3]))
    assert im["z_next"].shape == (5, LATENT) and np.isfinite(np.asarray(im["z_next"])).all()
    pop = jnp.zeros((4, controller.num_params(cfg.controller, LATENT, 16)))
    s = macro.score_population(cfg, jax.random.key(2), params, pop, jnp.asarray(mean), jnp.full_like(mean, -2.0), 3,
                               4, "macro_m")
    assert s.shape == (4,) and np.isfinite(np.asarray(s)).all()
    with pytest.raises(ValueError, match="transition.actions"):
        macro.score_population(dataclasses.replace(cfg, transition=base.transition, verifier=base.verifier),
                               jax.random.key(2), params, pop, jnp.asarray(mean), jnp.full_like(mean, -2.0), 3, 4,
                               "macro_m")


@pytest.mark.slow
def test_macro_m_verifier_sees_every_macro(tmp_path):
    """K judges macro-M's transitions with a one-hot of all its macros (VerifierConfig.actions, set
    with M's by style_config): macros 2 and 3 are told apart; K's checkpoints at 2 actions record
    no "actions" (they keep loading), and K and M must agree on the count."""
    _, (mean, cols, index) = _rows()
    arrays = macro.training_arrays(mean, np.full_like(mean, -2.0), cols, index)
    base = Config(vae=dataclasses.replace(Config().vae, latent=LATENT), transition=_tcfg())
    cfg = macro.style_config(base, "macro_m", macro.MACROS)
    assert cfg.verifier.actions == 4 and macro.style_config(base, "twice", macro.MACROS).verifier.actions == 2
    m_params = transition.init(jax.random.key(0), cfg.transition, LATENT)
    small = dataclasses.replace(cfg, verifier=dataclasses.replace(
        cfg.verifier, hidden=8, seq_len=4, train=dataclasses.replace(cfg.verifier.train, steps=3, batch=2, chunk=3)))
    k_params, _ = verifier.train(small, jax.random.key(1), arrays, tmp_path, progress=False, m_params=m_params)
    h, z = jnp.zeros((16,)), jnp.zeros((LATENT,))
    conf = [float(verifier.confidence(small.verifier, k_params, h, z, a, z)) for a in range(4)]
    assert len(set(conf)) == 4  # each macro its own input
    assert verifier.model_config(small, LATENT)["actions"] == 4 and "actions" not in verifier.model_config(base, LATENT)
    with pytest.raises(ConfigError, match="verifier.actions"):
        dataclasses.replace(cfg, verifier=base.verifier)


def test_action_count_validated_and_controller_shapes():
    with pytest.raises(ConfigError):
        TransitionConfig(actions=0)
    with pytest.raises(ConfigError):
        ControllerConfig(actions=0)
    c = ControllerConfig(actions=4)
    assert controller.num_params(c, 8, 16) == 24 * 4 + 4
    flat = jnp.arange(controller.num_params(c, 8, 16), dtype=jnp.float32)
    assert controller.logits(c, flat, jnp.ones((8,)), jnp.ones((16,))).shape == (4,)


@pytest.mark.slow
@pytest.mark.parametrize("style", macro.STYLES)
def test_real_macro_rollout_runs_with_correct_lengths(style):
    pre = get_preset("smoke")
    cfg = macro.style_config(dataclasses.replace(pre, transition=_tcfg()), style, macro.MACROS)
    params = {"vae": vae.init(jax.random.key(0), cfg.vae),
              "transition": transition.init(jax.random.key(1), cfg.transition, cfg.vae.latent),
              "controller": 0.1 * jax.random.normal(jax.random.key(2),
                                                    (controller.num_params(cfg.controller, cfg.vae.latent, 16),))}
    steps = 12
    out = jax.device_get(macro.run_episodes(cfg, params, jax.random.key(3), 3, steps, style))
    assert out["latent_mean"].shape == (3, steps, cfg.vae.latent) and out["valid"].shape == (3, steps)
    # length in primitive steps: two per live macro, one fewer where the first move ended it
    live = out["valid"].sum(1)
    assert np.all((out["length"] == 2 * live) | (out["length"] == 2 * live - 1))
    np.testing.assert_allclose(out["return"], out["length"])  # CartPole pays 1 per step taken
    np.testing.assert_allclose(out["reward"].sum(1), out["return"])
    assert np.all(np.diff(out["valid"], axis=1) <= 0)  # once ended, stays ended
