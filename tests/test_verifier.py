"""Tests for K (wm_jax.models.verifier) and the verifier-weighted dream (wm_jax.search.dream with cfg.verifier.mode)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wm_jax import stats
from wm_jax.models import controller, transition, verifier
from wm_jax.search import dream
from wm_jax.store import data
from wm_jax.config import ConfigError, VerifierConfig
from wm_jax.presets import get_preset

SMOKE = get_preset("smoke")
LATENT = SMOKE.vae.latent
HIDDEN = SMOKE.transition.hidden


def _mode(cfg, mode, **changes):
    return dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode=mode, **changes))


@pytest.fixture(scope="module")
def m_params():
    return transition.init(jax.random.key(0), SMOKE.transition, LATENT)


@pytest.fixture(scope="module")
def ctrl():
    return jax.random.normal(jax.random.key(1), (controller.num_params(SMOKE.controller, LATENT, HIDDEN),))


@pytest.fixture(scope="module")
def arrays():
    """Per-row arrays of 12 synthetic episodes (lengths 5..27) with random posteriors."""
    lengths = np.arange(5, 29, 2)
    episode = np.repeat(np.arange(len(lengths)), lengths)
    t = np.concatenate([np.arange(n) for n in lengths])
    index = data.EpisodeIndex.from_columns(episode, t)
    n = len(episode)
    rng = np.random.default_rng(0)
    cols = {"action": rng.integers(0, 2, n).astype(np.int32), "reward": np.ones(n, np.float32),
            "done": index.is_last.copy()}
    mean = rng.normal(size=(n, LATENT)).astype(np.float32)
    return transition.training_arrays(mean, np.full((n, LATENT), -2.0, np.float32), cols, index)


def _const_verifier(logit: float):
    """K params whose logit is `logit` for every input."""
    params = verifier.init(jax.random.key(0), SMOKE.verifier, LATENT, HIDDEN)
    params = jax.tree.map(jnp.zeros_like, params)
    params["params"]["logit"]["bias"] = jnp.full((1,), logit, jnp.float32)
    return params


def test_config_validation():
    with pytest.raises(ConfigError, match="mode"):
        VerifierConfig(mode="sometimes")
    with pytest.raises(ConfigError, match="threshold"):
        VerifierConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="seq_len"):
        VerifierConfig(seq_len=1)


def test_auc():
    assert stats.auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert stats.auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert stats.auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert np.isnan(stats.auc([], [1.0]))


@pytest.mark.slow
def test_examples_shapes_and_masks(m_params, arrays):
    cfg = SMOKE
    d = verifier._data(m_params, arrays)
    batch = transition.sequence_batch(jax.random.key(3), d, 6, cfg.verifier.seq_len)
    ex = verifier.examples(cfg, jax.random.key(4), m_params, batch, d["latent_std"])
    assert set(ex) == {"positive", *verifier.NEGATIVE_KINDS}
    for h, z, a, zn, m in ex.values():
        assert h.shape == (6, cfg.verifier.seq_len, HIDDEN)
        assert z.shape == zn.shape == (6, cfg.verifier.seq_len, LATENT)
        assert a.shape == m.shape == (6, cfg.verifier.seq_len)
    # the open loop starts from the real latent and never crosses into the next episode
    np.testing.assert_array_equal(ex["open_loop"][1][:, 0], batch["z"][:, 0])
    after_reset = np.cumsum(np.asarray(batch["reset"])[:, 1:], axis=1) > 0
    assert not np.any(np.asarray(ex["open_loop"][4])[:, 1:][after_reset])
    assert np.all(np.asarray(ex["open_loop"][4]) <= np.asarray(ex["positive"][4]))


def test_trivially_separable_toy_is_separated():
    """Positives: z' = z; negatives: z' = z + 3. A few hundred Adam steps separate them."""
    vcfg = VerifierConfig(hidden=16)
    k1, k2 = jax.random.split(jax.random.key(5))
    z = jax.random.normal(k1, (64, LATENT))
    h = jax.random.normal(k2, (64, HIDDEN))
    a = jnp.zeros((64,), jnp.int32)
    m = jnp.ones((64,), bool)
    ex = {"positive": (h, z, a, z, m), **{kind: (h, z, a, z + 3.0, m) for kind in verifier.NEGATIVE_KINDS}}
    params = verifier.init(jax.random.key(6), vcfg, LATENT, HIDDEN)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        (loss, _), g = jax.value_and_grad(lambda q: verifier.loss(vcfg, q, ex), has_aux=True)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(200):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    pos = verifier.logit(vcfg, params, h, z, a, z)
    neg = verifier.logit(vcfg, params, h, z, a, z + 3.0)
    assert stats.auc(np.asarray(pos), np.asarray(neg)) == 1.0
    assert losses[-1] < 0.05 < losses[0]


@pytest.mark.slow
def test_training_loss_falls_and_evaluate(m_params, arrays, tmp_path):
    cfg = dataclasses.replace(SMOKE, verifier=dataclasses.replace(
        SMOKE.verifier, hidden=32, seq_len=8,
        train=dataclasses.replace(SMOKE.verifier.train, steps=200, batch=16, chunk=50, checkpoint_every=200)))
    params, info = verifier.train(cfg, jax.random.key(7), arrays, tmp_path / "k", progress=False, m_params=m_params)
    from wm_jax.models import train as train_lib

    losses = [row["loss"] for row in train_lib.read_metrics(tmp_path / "k")]
    assert losses[-1] < losses[0]
    loaded = verifier.load(cfg, tmp_path / "k")
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), params, loaded))
    res = verifier.evaluate(cfg, jax.random.key(8), m_params, loaded, arrays, drifts=(1, 5), batches=2)
    for key in ("auc/one_step", "auc/open_loop", "auc/noise", "auc/drift_1", "auc/drift_5"):
        assert 0.0 <= res[key] <= 1.0, (key, res[key])
    assert res["count/drift_1"] >= res["count/drift_5"] > 0
    with pytest.raises(ValueError, match="seq_len"):
        verifier.evaluate(cfg, jax.random.key(8), m_params, loaded, arrays, drifts=(20,))


@pytest.mark.slow
def test_off_ignores_verifier_and_weight_by_one_is_off(m_params, ctrl):
    """mode off is the plain dream whatever K is; weight with confidence exactly 1 is bit-for-bit off."""
    mean = jax.random.normal(jax.random.key(9), (20, LATENT))
    logvar = jnp.full((20, LATENT), -1.0)
    pop = jnp.stack([ctrl, -ctrl, 0.5 * ctrl])
    args = (jax.random.key(10), m_params, pop, mean, logvar, 4, 8)
    off = dream.score_population(SMOKE, *args)
    off_with_k = dream.score_population(SMOKE, *args, _const_verifier(-3.0))
    weight_one = dream.score_population(_mode(SMOKE, "weight"), *args, _const_verifier(100.0))  # sigmoid -> 1.0f
    np.testing.assert_array_equal(off, off_with_k)
    np.testing.assert_array_equal(off, weight_one)
    cut_never = dream.score_population(_mode(SMOKE, "cutoff"), *args, _const_verifier(100.0))
    np.testing.assert_array_equal(off, cut_never)


def test_weight_multiplies_reward_by_confidence(m_params, ctrl):
    start = jnp.zeros((LATENT,))
    k_params = verifier.init(jax.random.key(11), SMOKE.verifier, LATENT, HIDDEN)
    traj_off, _ = dream.dream(SMOKE, jax.random.key(12), m_params, ctrl, start, 8)
    traj_w, ret_w = dream.dream(_mode(SMOKE, "weight"), jax.random.key(12), m_params, ctrl, start, 8, k_params)
    np.testing.assert_array_equal(traj_off["z"], traj_w["z"])  # K changes the fitness, never the dream
    np.testing.assert_allclose(traj_w["reward"], traj_off["reward"] * traj_w["confidence"], rtol=1e-6)
    np.testing.assert_allclose(ret_w, jnp.sum(traj_w["reward"]), rtol=1e-6)


def test_cutoff_ends_dreams_where_confidence_falls(m_params, ctrl):
    k_params = verifier.init(jax.random.key(13), SMOKE.verifier, LATENT, HIDDEN)
    start = jnp.zeros((LATENT,))
    traj, _ = dream.dream(_mode(SMOKE, "weight"), jax.random.key(14), m_params, ctrl, start, 8, k_params)
    conf, p_done = np.asarray(traj["confidence"]), np.asarray(traj["p_done"])
    threshold = float(np.sort(conf)[len(conf) // 2])  # some steps above, some below
    cfg = _mode(SMOKE, "cutoff", threshold=min(max(threshold, 1e-3), 0.999))
    traj_c, ret_c = dream.dream(cfg, jax.random.key(14), m_params, ctrl, start, 8, k_params)
    ok = conf >= cfg.verifier.threshold
    expected = np.array([np.all(ok[: t + 1]) and np.all(p_done[:t] <= 0.5) for t in range(8)], np.float32)
    np.testing.assert_array_equal(traj_c["alive"], expected)
    assert ret_c == pytest.approx(float(np.sum(np.asarray(traj_c["reward"]))))
    assert np.all(np.asarray(traj_c["reward"])[expected == 0] == 0)
    # a verifier that trusts nothing ends every dream before its first reward
    _, ret_none = dream.dream(_mode(SMOKE, "cutoff"), jax.random.key(14), m_params, ctrl, start, 8,
                              _const_verifier(-100.0))
    assert float(ret_none) == 0.0


def test_missing_verifier_params_is_a_named_error(m_params, ctrl):
    with pytest.raises(ValueError, match="k_params"):
        dream.dream(_mode(SMOKE, "weight"), jax.random.key(0), m_params, ctrl, jnp.zeros((LATENT,)), 4)
