"""Tests for wm_jax.models.transition: the recurrent interface, MDN sampling and density, masks, training,
mixed precision."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax import precision
from wm_jax.models import imagination, transition
from wm_jax.store import data
from wm_jax.models import train as train_lib
from wm_jax.config import Config, ConfigError, TrainConfig, TransitionConfig, VAEConfig
from wm_jax.models.transition import Prediction

LATENT = 8
HIDDEN = 16
K = 3


# Jitted entry points (cfg static): the tests reuse a few shapes, so each compiles once.
_observe = jax.jit(transition.observe, static_argnums=0)
_loss = jax.jit(transition.loss, static_argnums=0)
_latent_nll = jax.jit(transition.latent_nll)


@jax.jit
def _sample_many(keys, pred, tau):
    """One sample per key from the same prediction: [N, latent]."""
    return jax.vmap(lambda k: imagination.sample_latent(k, pred, tau))(keys)


def _cfg(head: str = "mdn", steps: int = 60) -> TransitionConfig:
    return TransitionConfig(
        hidden=HIDDEN,
        head=head,
        mixtures=K,
        seq_len=8,
        train=TrainConfig(steps=steps, batch=8, chunk=10, checkpoint_every=steps),
    )


@pytest.fixture(scope="module")
def cfg() -> TransitionConfig:
    return _cfg()


@pytest.fixture(scope="module")
def params(cfg):
    return transition.init(jax.random.key(0), cfg, LATENT)


def _inputs(b: int, key=1):
    kz, ka = jax.random.split(jax.random.key(key))
    return jax.random.normal(kz, (b, LATENT)), jax.random.bernoulli(ka, 0.5, (b,)).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The recurrent interface


@pytest.mark.slow
@pytest.mark.parametrize("head, comps", [("mdn", K), ("gaussian", 1)])
def test_step_shapes(head, comps):
    cfg = _cfg(head)
    params = transition.init(jax.random.key(0), cfg, LATENT)
    b = 5
    carry = transition.initial_carry(cfg, b)
    assert carry[0].shape == carry[1].shape == (b, HIDDEN)
    assert not np.asarray(carry[0]).any() and not np.asarray(carry[1]).any()
    z, a = _inputs(b)
    carry2, pred = transition.step(cfg, params, carry, z, a)
    assert isinstance(pred, Prediction)
    assert pred.logits.shape == pred.mean.shape == pred.logstd.shape == (b, LATENT, comps)
    assert pred.reward.shape == pred.done_logit.shape == (b,)
    assert carry2[0].shape == carry2[1].shape == (b, HIDDEN)
    assert transition.hidden(carry2).shape == (b, HIDDEN)
    assert transition.latent_nll(pred, z).shape == (b,)
    assert imagination.sample_latent(jax.random.key(0), pred).shape == (b, LATENT)
    m, v = transition.mixture_moments(pred)
    assert m.shape == v.shape == (b, LATENT)
    assert (np.asarray(v) > 0).all()
    # logstd is clipped into a finite range
    assert np.asarray(pred.logstd).min() >= -7.0 and np.asarray(pred.logstd).max() <= 3.0


def test_initial_carry_shapes(cfg):
    assert transition.initial_carry(cfg)[0].shape == (HIDDEN,)
    assert transition.initial_carry(cfg, (2, 3))[1].shape == (2, 3, HIDDEN)


def test_step_inside_scan_matches_python_loop(cfg, params):
    b, t = 4, 6
    kz, ka = jax.random.split(jax.random.key(5))
    zs = jax.random.normal(kz, (t, b, LATENT))
    acts = jax.random.bernoulli(ka, 0.5, (t, b)).astype(jnp.int32)

    def body(carry, x):
        return transition.step(cfg, params, carry, *x)

    carry_scan, preds = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))(transition.initial_carry(cfg, b), (zs, acts))
    assert preds.mean.shape == (t, b, LATENT, K)
    assert preds.reward.shape == (t, b)
    carry = transition.initial_carry(cfg, b)
    for i in range(t):
        carry, pred = transition.step(cfg, params, carry, zs[i], acts[i])
        np.testing.assert_allclose(np.asarray(pred.mean), np.asarray(preds.mean[i]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(carry[1]), np.asarray(carry_scan[1]), rtol=1e-5, atol=1e-5)


def test_step_under_vmap_matches_batch(cfg, params):
    b = 4
    z, a = _inputs(b)
    carry_b, pred_b = transition.step(cfg, params, transition.initial_carry(cfg, b), z, a)
    single = transition.initial_carry(cfg)  # unbatched carry [hidden]
    carry_v, pred_v = jax.vmap(lambda zz, aa: transition.step(cfg, params, single, zz, aa))(z, a)
    for x, y in zip(jax.tree.leaves((carry_b, pred_b)), jax.tree.leaves((carry_v, pred_v))):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_jitted_step_does_not_retrace(cfg, params):
    traces = []

    def fn(p, carry, z, a):
        traces.append(1)
        return transition.step(cfg, p, carry, z, a)

    jitted = jax.jit(fn)
    z, a = _inputs(3)
    carry = transition.initial_carry(cfg, 3)
    carry, _ = jitted(params, carry, z, a)
    z2, a2 = _inputs(3, key=9)
    carry, pred = jitted(params, carry, z2, a2)  # new values, same shapes: no retrace
    jax.block_until_ready(pred)
    assert len(traces) == 1


# --------------------------------------------------------------------------------------------
# Mixture density: sampling, moments, density


def _hand_prediction() -> Prediction:
    """latent 3, K = 2 with distinct means and a clear argmax component per dimension."""
    logits = jnp.array([[2.0, 0.0], [-1.0, 1.5], [0.3, 0.1]])
    mean = jnp.array([[1.0, 4.0], [-2.0, 3.0], [0.5, 2.5]])
    logstd = jnp.log(jnp.array([[0.5, 1.0], [0.3, 0.8], [1.2, 0.4]]))
    return Prediction(logits=logits, mean=mean, logstd=logstd, reward=jnp.zeros(()), done_logit=jnp.zeros(()))


def _np_moments(pred: Prediction):
    logits = np.asarray(pred.logits, np.float64)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    mu, sd = np.asarray(pred.mean, np.float64), np.exp(np.asarray(pred.logstd, np.float64))
    m = (w * mu).sum(-1)
    return m, (w * (sd**2 + mu**2)).sum(-1) - m**2


def test_mixture_moments_formula():
    pred = _hand_prediction()
    m, v = transition.mixture_moments(pred)
    m_np, v_np = _np_moments(pred)
    np.testing.assert_allclose(np.asarray(m), m_np, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(v), v_np, rtol=1e-5)


def test_sampling_collapses_to_argmax_means_at_low_temperature():
    pred = _hand_prediction()
    keys = jax.random.split(jax.random.key(0), 2000)
    z = np.asarray(_sample_many(keys, pred, 1e-6))
    expected = np.asarray(pred.mean)[np.arange(3), np.asarray(pred.logits).argmax(-1)]  # [1.0, 3.0, 0.5]
    np.testing.assert_allclose(expected, [1.0, 3.0, 0.5])
    assert z.shape == (2000, 3)
    np.testing.assert_allclose(z, np.broadcast_to(expected, z.shape), atol=0.01)


def test_sampling_matches_mixture_moments_at_tau_one():
    pred = _hand_prediction()
    n = 200_000
    keys = jax.random.split(jax.random.key(1), n)
    z = np.asarray(_sample_many(keys, pred, 1.0), np.float64)
    m, v = (np.asarray(x) for x in transition.mixture_moments(pred))
    np.testing.assert_allclose(z.mean(0), m, rtol=0.02, atol=0.01)
    np.testing.assert_allclose(z.var(0), v, rtol=0.03)
    # the mixture weights are honoured: dimension 0 is mostly near 1.0 (weight sigmoid(2) ~ 0.88)
    frac = np.mean(np.abs(z[:, 0] - 1.0) < np.abs(z[:, 0] - 4.0))
    assert 0.8 < frac < 0.95


def test_temperature_scales_sigma_and_sharpens_logits():
    # one component: variance scales with tau (sigma * sqrt(tau))
    pred1 = Prediction(
        logits=jnp.zeros((2, 1)), mean=jnp.array([[0.0], [5.0]]), logstd=jnp.log(jnp.array([[1.0], [0.5]])),
        reward=jnp.zeros(()), done_logit=jnp.zeros(()),
    )
    keys = jax.random.split(jax.random.key(2), 100_000)
    z = np.asarray(_sample_many(keys, pred1, 4.0))
    np.testing.assert_allclose(z.std(0), [2.0, 1.0], rtol=0.02)
    np.testing.assert_allclose(z.mean(0), [0.0, 5.0], atol=0.03)
    # logits / tau: at tau = 2 component weights are softmax(logits / 2)
    pred = _hand_prediction()
    z = np.asarray(_sample_many(keys, pred, 2.0))
    w0 = 1.0 / (1.0 + np.exp(-(2.0 - 0.0) / 2.0))  # weight of component 0 in dimension 0
    frac = np.mean(np.abs(z[:, 0] - 1.0) < np.abs(z[:, 0] - 4.0))
    assert abs(frac - w0) < 0.03, (frac, w0)


def _np_nll(pred: Prediction, z: np.ndarray) -> np.ndarray:
    logits = np.asarray(pred.logits, np.float64)
    mu = np.asarray(pred.mean, np.float64)
    sd = np.exp(np.asarray(pred.logstd, np.float64))
    log_w = logits - logits.max(-1, keepdims=True)
    log_w -= np.log(np.exp(log_w).sum(-1, keepdims=True))
    z = np.asarray(z, np.float64)[..., None]
    log_dens = log_w - 0.5 * ((z - mu) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))  # log(w_k N_k(z))
    top = log_dens.max(-1, keepdims=True)
    return -(top[..., 0] + np.log(np.exp(log_dens - top).sum(-1))).sum(-1)


def test_latent_nll_matches_numpy():
    pred = _hand_prediction()
    for z in ([1.0, 3.0, 0.5], [0.0, 0.0, 0.0], [4.2, -2.5, 1.7], [2.5, 0.5, -1.0]):
        got = float(transition.latent_nll(pred, jnp.array(z)))
        np.testing.assert_allclose(got, _np_nll(pred, np.array(z)), rtol=1e-5)
    # batched, with random predictions
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    pred_b = Prediction(
        logits=jax.random.normal(k1, (4, 5, 3)) * 2,
        mean=jax.random.normal(k2, (4, 5, 3)),
        logstd=jax.random.uniform(k3, (4, 5, 3), minval=-1.0, maxval=0.5),
        reward=jnp.zeros(4), done_logit=jnp.zeros(4),
    )
    z = jax.random.normal(k4, (4, 5))
    np.testing.assert_allclose(np.asarray(_latent_nll(pred_b, z)), _np_nll(pred_b, z), rtol=1e-5)


def test_latent_nll_stable_far_from_the_means():
    pred = _hand_prediction()
    nll = float(transition.latent_nll(pred, jnp.array([100.0, -100.0, 100.0])))
    assert np.isfinite(nll)
    np.testing.assert_allclose(nll, _np_nll(pred, np.array([100.0, -100.0, 100.0])), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Masks and episode boundaries


B, L, KB = 2, 8, 5  # batch, window length, first row of the next episode


def _batch(key) -> dict[str, jax.Array]:
    kz, kn, ka, kr, kd = jax.random.split(key, 5)
    pos = jnp.arange(L)[None, :].repeat(B, 0)
    return {
        "z": jax.random.normal(kz, (B, L, LATENT)),
        "z_next": jax.random.normal(kn, (B, L, LATENT)),
        "action": jax.random.bernoulli(ka, 0.5, (B, L)).astype(jnp.int32),
        "reward": jax.random.normal(kr, (B, L)),
        "done": jax.random.bernoulli(kd, 0.5, (B, L)),
        "reset": (pos == 0) | (pos == KB),
        "valid": jnp.ones((B, L), bool),
        "next_valid": pos != KB - 1,  # row KB-1 ends its episode: no latent target
    }


def _other_next_episode(batch, key) -> dict[str, jax.Array]:
    """A copy whose data from row KB on (and z_next of the boundary row KB-1) is different."""
    other = _batch(key)
    out = dict(batch)
    for name in ("z", "action", "reward", "done"):
        out[name] = batch[name].at[:, KB:].set(other[name][:, KB:])
    out["z_next"] = batch["z_next"].at[:, KB - 1 :].set(other["z_next"][:, KB - 1 :])
    return out


def _prefix_only(batch) -> dict[str, jax.Array]:
    out = dict(batch)
    pos = jnp.arange(L)[None, :]
    out["valid"] = batch["valid"] & (pos < KB)
    out["next_valid"] = batch["next_valid"] & (pos < KB)
    return out


def test_observe_predictions_before_the_boundary_ignore_the_next_episode(cfg, params):
    b1 = _batch(jax.random.key(10))
    b2 = _other_next_episode(b1, jax.random.key(11))
    p1 = _observe(cfg, params, b1["z"], b1["action"], b1["reset"])
    p2 = _observe(cfg, params, b2["z"], b2["action"], b2["reset"])
    assert p1.mean.shape == (B, L, LATENT, K)
    for x, y in zip(p1, p2):
        assert np.array_equal(np.asarray(x[:, :KB]), np.asarray(y[:, :KB]))
        assert not np.array_equal(np.asarray(x[:, KB:]), np.asarray(y[:, KB:]))
    # after the reset the carry restarts: the suffix is predicted as if it were a fresh sequence
    tail = _observe(cfg, params, b1["z"][:, KB:], b1["action"][:, KB:], b1["reset"][:, KB:])
    for x, y in zip(p1, tail):
        np.testing.assert_allclose(np.asarray(x[:, KB:]), np.asarray(y), rtol=1e-6, atol=1e-6)
    # and the prefix equals observing the prefix alone
    head = _observe(cfg, params, b1["z"][:, :KB], b1["action"][:, :KB], b1["reset"][:, :KB])
    for x, y in zip(p1, head):
        np.testing.assert_allclose(np.asarray(x[:, :KB]), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_reset_matters(cfg, params):
    """Sanity check for the test above: without the reset, the suffix depends on the prefix."""
    b1 = _batch(jax.random.key(10))
    no_reset = b1["reset"].at[:, KB].set(False)
    p1 = _observe(cfg, params, b1["z"], b1["action"], b1["reset"])
    p2 = _observe(cfg, params, b1["z"], b1["action"], no_reset)
    assert not np.allclose(np.asarray(p1.mean[:, KB:]), np.asarray(p2.mean[:, KB:]))


def test_loss_before_the_boundary_ignores_the_next_episode(cfg, params):
    b1 = _batch(jax.random.key(10))
    b2 = _other_next_episode(b1, jax.random.key(11))
    loss1, m1 = _loss(cfg, params, _prefix_only(b1))
    loss2, m2 = _loss(cfg, params, _prefix_only(b2))
    assert float(loss1) == float(loss2)
    for k in m1:
        assert float(m1[k]) == float(m2[k]), k
    # the full loss does see the next episode (the test is not vacuous)
    assert float(_loss(cfg, params, b1)[0]) != float(_loss(cfg, params, b2)[0])
    # and the masked loss equals the loss of the truncated window
    trunc = {k: v[:, :KB] for k, v in b1.items()}
    np.testing.assert_allclose(float(_loss(cfg, params, trunc)[0]), float(loss1), rtol=1e-6)


def test_boundary_step_latent_target_is_masked(cfg, params):
    """Row KB-1 is its episode's last step: z_next there (the next episode's frame) must not count."""
    b1 = _batch(jax.random.key(10))
    b2 = dict(b1)
    b2["z_next"] = b1["z_next"].at[:, KB - 1].set(123.0)
    l1, m1 = _loss(cfg, params, b1)
    l2, m2 = _loss(cfg, params, b2)
    assert float(l1) == float(l2)
    for k in m1:
        assert float(m1[k]) == float(m2[k]), k
    # but a latent target on a row with next_valid does count
    b3 = dict(b1)
    b3["z_next"] = b1["z_next"].at[:, KB - 2].set(123.0)
    assert float(_loss(cfg, params, b3)[1]["loss/latent_nll"]) > float(m1["loss/latent_nll"])
    # the boundary row's reward and done terms still count (valid) and depend on its own data only
    b4 = dict(b1)
    b4["reward"] = b1["reward"].at[:, KB - 1].add(10.0)
    assert float(_loss(cfg, params, b4)[1]["loss/reward"]) != float(m1["loss/reward"])


def test_masked_means(cfg, params):
    """Each term is a mean over its own mask (by hand from observe)."""
    b = _batch(jax.random.key(12))
    b["valid"] = b["valid"].at[:, -2:].set(False)
    b["next_valid"] = b["next_valid"] & b["valid"]
    _, m = _loss(cfg, params, b)
    pred = _observe(cfg, params, b["z"], b["action"], b["reset"])
    nll = np.asarray(transition.latent_nll(pred, b["z_next"]))
    nv, v = np.asarray(b["next_valid"]), np.asarray(b["valid"])
    np.testing.assert_allclose(float(m["loss/latent_nll"]), nll[nv].mean(), rtol=1e-5)
    rew = (np.asarray(pred.reward) - np.asarray(b["reward"])) ** 2
    np.testing.assert_allclose(float(m["loss/reward"]), rew[v].mean(), rtol=1e-5)
    x, d = np.asarray(pred.done_logit, np.float64), np.asarray(b["done"], np.float64)
    bce = -(cfg.done_pos_weight * d * -np.log1p(np.exp(-x)) + (1 - d) * -np.log1p(np.exp(x)))
    np.testing.assert_allclose(float(m["loss/done"]), bce[v].mean(), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Training


def _synthetic_arrays(n_episodes: int = 12) -> dict[str, np.ndarray]:
    """Per-row posteriors shaped like an encoded dataset, with learnable (smooth) dynamics."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(15, 40, n_episodes)
    episode = np.repeat(np.arange(n_episodes), lengths).astype(np.int32)
    t = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    n = episode.size
    action = rng.integers(0, 2, n).astype(np.int32)
    mean = np.zeros((n, LATENT), np.float32)
    for i in range(1, n):
        step = (2 * action[i - 1] - 1) * 0.1 * np.arange(1, LATENT + 1) / LATENT
        mean[i] = 0.0 if t[i] == 0 else 0.95 * mean[i - 1] + step
    idx = data.EpisodeIndex.from_columns(episode, t)
    return {
        "mean": mean,
        "logvar": np.full((n, LATENT), -6.0, np.float32),
        "action": action,
        "reward": np.ones(n, np.float32),
        "done": idx.is_last.copy(),
        "is_first": idx.is_first,
        "is_last": idx.is_last,
    }


def test_sequence_batch_shapes():
    arrays = {k: jnp.asarray(v) for k, v in _synthetic_arrays().items()}
    b = transition.sequence_batch(jax.random.key(0), arrays, 4, 8)
    assert b["z"].shape == b["z_next"].shape == (4, 8, LATENT)
    for k in ("action", "reward", "done", "reset", "valid", "next_valid"):
        assert b[k].shape == (4, 8), k
    assert np.asarray(b["reset"][:, 0]).all()


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path, cfg):
    arrays = _synthetic_arrays()
    full = Config(vae=VAEConfig(latent=LATENT), transition=cfg)
    params, info = transition.train(full, jax.random.key(0), arrays, tmp_path, progress=False)
    loaded = transition.load(full, tmp_path)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), params, loaded))
    assert info["steps"] == 60 and info["skipped_updates"] == 0
    metrics = train_lib.read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"]
    assert last["loss/latent_nll"] < first["loss/latent_nll"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.slow
@pytest.mark.parametrize("head", ["mdn", "gaussian"])
def test_float32_step_is_the_flax_network(cfg, head):
    """The packed step (one matmul of [z, h], the action as a row, the heads as one matmul, the
    tanh form of the sigmoid) computes flax's LSTM cell and dense heads up to float32 rounding;
    float32 adds no bfloat16 operation."""
    assert cfg.compute_dtype == "float32"
    cfg = dataclasses.replace(cfg, head=head)
    params = transition.init(jax.random.key(7), cfg, LATENT)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(8), x.shape), params)  # non-zero biases
    carry = (0.5 * jax.random.normal(jax.random.key(4), (3, cfg.hidden)), 0.5 * jax.random.normal(jax.random.key(5), (3, cfg.hidden)))
    z = jax.random.normal(jax.random.key(3), (3, LATENT))
    a = jnp.array([0, 1, 1], jnp.int32)
    (c, h), got = transition.step(cfg, params, carry, z, a)
    (c_ref, h_ref), ref = transition._net(cfg, LATENT).apply(params, carry, z, a)
    close = partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    for x, y in ((c, c_ref), (h, h_ref), (got.mean, ref.mean), (got.logstd, ref.logstd), (got.reward, ref.reward),
                 (got.done_logit, ref.done_logit)):
        close(np.asarray(x), np.asarray(y))
    # the mixture weights agree (a single Gaussian's logit is 0 in the packed step: its value never matters)
    close(np.asarray(jax.nn.log_softmax(got.logits)), np.asarray(jax.nn.log_softmax(ref.logits)))
    assert "bf16" not in str(jax.make_jaxpr(lambda p: transition.step(cfg, p, carry, z, a))(params))


def test_imagine_draws_the_noise_sample_latent_draws(cfg, params):
    """imagine draws every step's noise before its loop: the same bits as stepping M and calling
    sample_latent with each step's key."""
    key, length = jax.random.key(11), 6
    z0 = jax.random.normal(jax.random.key(12), (LATENT,))
    actions = jnp.array([0, 1, 1, 0, 1, 0], jnp.int32)
    _, traj = imagination.imagine(cfg, params, key, transition.initial_carry(cfg), z0, length, 0.8, actions=actions)
    carry, z = transition.initial_carry(cfg), z0
    for t, k in enumerate(jax.random.split(key, length)):
        carry, pred = transition.step(cfg, params, carry, z, actions[t])
        z = imagination.sample_latent(k, pred, 0.8)
        np.testing.assert_allclose(np.asarray(traj["z_next"][t]), np.asarray(z), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_training_keeps_float32_state_and_lowers_the_loss(cfg):
    """bf16 compute: float32 parameters, gradients and optimizer state; the loss falls."""
    bcfg = dataclasses.replace(cfg, compute_dtype="bfloat16", train=dataclasses.replace(cfg.train, lr=3e-3))
    d = {k: jnp.asarray(v) for k, v in _synthetic_arrays().items()}
    params = transition.init(jax.random.key(0), bcfg, LATENT)
    carry = transition.initial_carry(bcfg, 2)
    inner = str(jax.make_jaxpr(lambda p: transition.step(bcfg, p, carry, jnp.zeros((2, LATENT)), jnp.zeros(2, jnp.int32)))(params))
    assert "bf16" in inner  # the network does run in bfloat16
    state = train_lib.init_state(bcfg.train, params)

    def loss_fn(p, k, batch, step):
        return transition.loss(bcfg, p, batch)

    def sample_fn(k, dd):
        return transition.sequence_batch(k, dd, bcfg.train.batch, bcfg.seq_len)

    state, metrics = train_lib.run_chunk(bcfg.train.hyper(), loss_fn, sample_fn, 100, jax.random.key(1), d, state)
    loss = np.asarray(metrics["loss"])
    assert np.isfinite(loss).all() and bool(np.asarray(metrics["finite"]).all())
    assert loss[-20:].mean() < 0.8 * loss[:20].mean(), (loss[:20].mean(), loss[-20:].mean())
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)
    }


def test_checkpoints_do_not_depend_on_the_compute_dtype(cfg):
    bcfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    assert transition.model_config(bcfg, LATENT) == transition.model_config(cfg, LATENT)
    assert "compute_dtype" not in transition.model_config(cfg, LATENT)
    assert precision.cast({"a": jnp.ones(2), "i": jnp.ones(2, jnp.int32)}, "bfloat16")["i"].dtype == jnp.int32


# --------------------------------------------------------------------------------------------
# drift mitigations: input dropout and the z' penalty (both off by default)

def test_mitigations_off_is_the_plain_loss(cfg, params):
    batch = _batch(jax.random.key(20))
    plain, _ = transition.loss(cfg, params, batch)
    with_key, _ = transition.loss(cfg, params, batch, jax.random.key(21))
    assert float(plain) == float(with_key)


def test_input_dropout(cfg, params):
    dcfg = dataclasses.replace(cfg, input_dropout=0.5)
    batch = _batch(jax.random.key(22))
    with pytest.raises(ValueError, match="key"):
        transition.loss(dcfg, params, batch)
    a, _ = transition.loss(dcfg, params, batch, jax.random.key(23))
    b, _ = transition.loss(dcfg, params, batch, jax.random.key(23))
    c, _ = transition.loss(dcfg, params, batch, jax.random.key(24))
    plain, _ = transition.loss(cfg, params, batch)
    assert float(a) == float(b) and float(a) != float(c) and float(a) != float(plain)
    # dropping every input equals feeding zeros
    zeros = {**batch, "z": jnp.zeros_like(batch["z"])}
    almost_all = dataclasses.replace(cfg, input_dropout=1.0 - 1e-7)
    dropped, _ = transition.loss(almost_all, params, batch, jax.random.key(25))
    np.testing.assert_allclose(dropped, transition.loss(cfg, params, zeros)[0], rtol=1e-6)
    with pytest.raises(ConfigError, match="input_dropout"):
        dataclasses.replace(cfg, input_dropout=1.0)


def test_z_penalty_adds_the_weighted_term(cfg, params):
    batch = _batch(jax.random.key(26))
    plain, m_plain = transition.loss(cfg, params, batch)
    total, m = transition.loss(dataclasses.replace(cfg, z_penalty=0.5), params, batch)
    pred = transition.observe(cfg, params, batch["z"], batch["action"], batch["reset"])
    sq = np.mean(np.square(np.asarray(transition.mixture_moments(pred)[0])), axis=-1)
    nv = np.asarray(batch["next_valid"])
    np.testing.assert_allclose(m["loss/z_penalty"], sq[nv].mean(), rtol=1e-5)
    np.testing.assert_allclose(total, plain + 0.5 * m["loss/z_penalty"], rtol=1e-6)
    assert "loss/z_penalty" not in m_plain
    with pytest.raises(ConfigError, match="z_penalty"):
        dataclasses.replace(cfg, z_penalty=-1.0)


@pytest.mark.slow
def test_contrastive_weight_zero_adds_no_gradient(cfg, params):
    batch = _batch(jax.random.key(27))
    grad = jax.grad(lambda p, c: transition.loss(c, p, batch)[0])
    plain = grad(params, cfg)
    off = grad(params, dataclasses.replace(cfg, contrastive=0.0, contrastive_temperature=0.5))
    on = grad(params, dataclasses.replace(cfg, contrastive=1.0))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(off)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(on)))
    total, m = transition.loss(dataclasses.replace(cfg, contrastive=0.5), params, batch)
    np.testing.assert_allclose(total, transition.loss(cfg, params, batch)[0] + 0.5 * m["loss/contrastive"], rtol=1e-5)
    with pytest.raises(ConfigError, match="contrastive"):
        dataclasses.replace(cfg, contrastive=-1.0)


def test_contrastive_loss_matches_numpy_and_training_on_it_lowers_it(cfg, params):
    batch = _batch(jax.random.key(28))
    ccfg = dataclasses.replace(cfg, contrastive=1.0, contrastive_temperature=0.2)

    def term(p):
        carries, pred = transition.observe_carries(ccfg, p, batch["z"], batch["action"], batch["reset"])
        return transition.contrastive_loss(ccfg, p, carries, batch["z"], batch["action"], pred, batch["z_next"],
                                           batch["next_valid"])

    # against a direct numpy computation of the same InfoNCE
    carries, pred = transition.observe_carries(ccfg, params, batch["z"], batch["action"], batch["reset"])
    _, other = transition.step(ccfg, params, carries, batch["z"], 1 - batch["action"])
    q = np.asarray(transition.mixture_moments(pred)[0]).reshape(-1, LATENT)
    ko = np.asarray(transition.mixture_moments(other)[0]).reshape(-1, LATENT)
    k = np.asarray(batch["z_next"]).reshape(-1, LATENT)
    m = np.asarray(batch["next_valid"]).reshape(-1)
    def score(x, y):
        return -np.mean(np.square(x - y), -1) / 0.2

    losses = []
    for i in np.flatnonzero(m):
        cand = np.concatenate([score(q[i], k[m]), [score(q[i], ko[i])]])
        losses.append(np.log(np.sum(np.exp(cand))) - score(q[i], k[i]))
    np.testing.assert_allclose(float(term(params)), np.mean(losses), rtol=1e-4)
    # a toy problem: Adam on the term alone lowers it
    import optax

    opt = optax.adam(3e-3)
    state, p, first = opt.init(params), params, float(term(params))

    @jax.jit
    def step(p, s):
        updates, s = opt.update(jax.grad(term)(p), s)
        return optax.apply_updates(p, updates), s

    for _ in range(60):
        p, state = step(p, state)
    assert float(term(p)) < 0.8 * first


@pytest.mark.parametrize("head", ["mdn", "gaussian"])
def test_observe_is_stepping_the_cell(cfg, head):
    """observe's teacher forcing (inputs' matmul before the loop, heads after it) equals stepping
    M one step at a time with the same resets, up to float32 rounding."""
    cfg = dataclasses.replace(cfg, head=head)
    params = transition.init(jax.random.key(7), cfg, LATENT)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(8), x.shape), params)
    b, length = 3, 7
    z = jax.random.normal(jax.random.key(1), (b, length, LATENT))
    a = jax.random.bernoulli(jax.random.key(2), 0.5, (b, length)).astype(jnp.int32)
    reset = jnp.zeros((b, length), bool).at[:, 0].set(True).at[1, 3].set(True).at[2, 6].set(True)
    (c_got, h_got), got = transition.observe_carries(cfg, params, z, a, reset)
    for i in range(b):
        carry = transition.initial_carry(cfg)
        for t in range(length):
            if reset[i, t]:
                carry = transition.initial_carry(cfg)
            np.testing.assert_allclose(np.asarray(h_got[i, t]), np.asarray(carry[1]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(c_got[i, t]), np.asarray(carry[0]), rtol=1e-5, atol=1e-5)
            carry, pred = transition.step(cfg, params, carry, z[i, t], a[i, t])
            for x, y in zip(got, pred):
                np.testing.assert_allclose(np.asarray(x[i, t]), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_fine_tuning_from_loaded_parameters_compiles_nothing_new(tmp_path, cfg):
    """Parameters restored from a checkpoint are committed to a device and a training chunk's
    outputs are not: fit starts from host copies, so fine-tuning reuses the first training's program."""
    full = Config(vae=VAEConfig(latent=LATENT), transition=dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=20, chunk=10, checkpoint_every=10)))
    arrays = _synthetic_arrays()
    transition.train(full, jax.random.key(0), arrays, tmp_path / "a", progress=False)
    loaded = transition.load(full, tmp_path / "a")
    before = train_lib.run_chunk._cache_size()
    transition.train(full, jax.random.key(1), arrays, tmp_path / "b", progress=False, init_params=loaded)
    assert train_lib.run_chunk._cache_size() == before
