"""Tests for wm_jax.models.vae: shapes, the KL ramp, determinism, jit, and that training lowers the loss."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax import stats
from wm_jax.models import vae
from wm_jax.store import collection, data
from wm_jax.models import train as train_lib
from wm_jax.config import Config, TrainConfig, VAEConfig

LATENT = 8
FILTERS = (4, 4, 8, 8)


def _cfg(steps: int = 60, kl_ramp_steps: int = 10, chunk: int = 10, checkpoint_every: int = 60) -> VAEConfig:
    return VAEConfig(
        latent=LATENT,
        filters=FILTERS,
        kl_ramp_steps=kl_ramp_steps,
        train=TrainConfig(steps=steps, batch=8, chunk=chunk, checkpoint_every=checkpoint_every),
    )


@pytest.fixture(scope="module")
def cfg() -> VAEConfig:
    return _cfg()


@pytest.fixture(scope="module")
def params(cfg):
    return vae.init(jax.random.key(0), cfg)


@pytest.fixture(scope="module")
def stacks() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (3, 64, 64, 4), 0, 256).astype(jnp.uint8)


@pytest.fixture(scope="module")
def dataset():
    arrays = collection.collect_arrays(jax.random.key(0), 10, progress=False)
    idx = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    return arrays["frame"], idx.stack_rows


def test_encode_decode_shapes(cfg, params, stacks):
    mean, logvar = vae.encode(cfg, params, stacks)
    assert mean.shape == logvar.shape == (3, LATENT)
    assert mean.dtype == logvar.dtype == jnp.float32
    assert np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(logvar)).all()
    z = stats.gaussian_sample(jax.random.key(2), mean, logvar)
    assert z.shape == (3, LATENT)
    recon = vae.decode(cfg, params, z)
    assert recon.shape == (3, 64, 64, 4)
    r = np.asarray(recon)
    assert r.min() >= 0.0 and r.max() <= 1.0


def test_encode_decode_extra_batch_dims(cfg, params, stacks):
    mean, _ = vae.encode(cfg, params, stacks[None])
    assert mean.shape == (1, 3, LATENT)
    assert vae.decode(cfg, params, mean).shape == (1, 3, 64, 64, 4)
    # one example at a time agrees with the batch
    m0, _ = vae.encode(cfg, params, stacks[:1])
    np.testing.assert_allclose(np.asarray(m0[0]), np.asarray(mean[0, 0]), rtol=1e-5, atol=1e-5)


def test_to_float_range():
    x = vae.to_float(jnp.array([0, 128, 255], jnp.uint8))
    np.testing.assert_allclose(np.asarray(x), [0.0, 128 / 255, 1.0])


def test_sample_reparameterisation():
    mean = jnp.full((200_000, 2), 3.0)
    logvar = jnp.broadcast_to(jnp.log(jnp.array([4.0, 0.25])), mean.shape)
    z = np.asarray(stats.gaussian_sample(jax.random.key(0), mean, logvar))
    np.testing.assert_allclose(z.mean(0), [3.0, 3.0], atol=0.02)
    np.testing.assert_allclose(z.std(0), [2.0, 0.5], rtol=0.02)
    # a (near-)zero variance returns the mean
    np.testing.assert_allclose(
        np.asarray(stats.gaussian_sample(jax.random.key(1), mean[:4], jnp.full((4, 2), -60.0))), 3.0, atol=1e-6
    )


def test_kl_weight_ramp():
    cfg = VAEConfig(latent=LATENT, filters=FILTERS, kl_ramp_steps=10_000, train=TrainConfig(steps=10_000))
    got = [float(vae.kl_weight(cfg, s)) for s in (0, 2500, 5000, 10_000, 10_001, 50_000)]
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 1.0, 1.0, 1.0], atol=1e-7)
    # traced step (inside jit) gives the same values
    jitted = jax.jit(partial(vae.kl_weight, cfg))
    np.testing.assert_allclose(float(jitted(jnp.int32(5000))), 0.5)
    # ramp of 0: beta is 1 from the start
    cfg0 = VAEConfig(latent=LATENT, filters=FILTERS, kl_ramp_steps=0, train=TrainConfig(steps=10))
    assert float(vae.kl_weight(cfg0, 0)) == 1.0


def test_loss_terms_and_determinism(cfg, params, stacks):
    key = jax.random.key(3)
    step = jnp.int32(5)
    total, m = vae.loss(cfg, params, key, stacks, step)
    total2, m2 = vae.loss(cfg, params, key, stacks, step)
    assert float(total) == float(total2)  # fixed key => identical loss
    for k in m:
        assert np.array_equal(np.asarray(m[k]), np.asarray(m2[k])), k
    assert np.isfinite(float(total))
    assert float(m["beta"]) == pytest.approx(0.5)
    # with free_bits == 0 the total is recon + beta * KL
    np.testing.assert_allclose(float(total), float(m["loss/recon"] + m["beta"] * m["loss/kl"]), rtol=1e-6)
    assert float(m["loss/kl"]) >= 0.0
    # a different key samples a different eps
    total3, _ = vae.loss(cfg, params, jax.random.key(4), stacks, step)
    assert float(total3) != float(total)


def test_free_bits_floor(params, stacks):
    cfg = VAEConfig(latent=LATENT, filters=FILTERS, kl_ramp_steps=0, free_bits=1000.0, train=TrainConfig(steps=10))
    total, m = vae.loss(cfg, params, jax.random.key(3), stacks, jnp.int32(0))
    # every example's KL is far below the floor, so the KL term is the floor itself
    np.testing.assert_allclose(float(total), float(m["loss/recon"]) + 1000.0 * LATENT, rtol=1e-6)


def test_loss_under_jit(cfg, params, stacks):
    key = jax.random.key(3)
    eager, _ = vae.loss(cfg, params, key, stacks, jnp.int32(7))
    fn = jax.jit(lambda p, k, x, s: jax.value_and_grad(lambda p: vae.loss(cfg, p, k, x, s)[0])(p))
    value, grads = fn(params, key, stacks, jnp.int32(7))
    value2, _ = fn(params, key, stacks, jnp.int32(7))
    assert float(value) == float(value2)
    np.testing.assert_allclose(float(value), float(eager), rtol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path, dataset):
    frames, stack_rows = dataset
    cfg = _cfg(steps=60, kl_ramp_steps=10, chunk=10, checkpoint_every=60)
    params, info = vae.train(Config(vae=cfg), jax.random.key(0), {"frame": frames, "stack_rows": stack_rows}, tmp_path,
                             progress=False)
    assert info["steps"] == 60 and info["resumed_from"] == 0 and info["skipped_updates"] == 0
    metrics = train_lib.read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"]
    assert last["loss/recon"] < first["loss/recon"]
    assert last["loss/recon"] < 0.8 * first["loss/recon"]
    assert last["beta"] == 1.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # the trained model encodes the dataset to finite posteriors of the right shape
    mean, logvar = vae.encode_all(cfg, params, frames, stack_rows, batch=128)
    assert mean.shape == logvar.shape == (frames.shape[0], LATENT)
    assert np.isfinite(mean).all() and np.isfinite(logvar).all()


def test_float32_is_the_plain_network(cfg, params, stacks):
    """compute_dtype float32 (the default) adds no operation: bit for bit the network itself."""
    mean, logvar = vae.encode(cfg, params, stacks)
    ref = vae.model(cfg).apply(params, vae.to_float(stacks), method=vae.ConvVAE.encode)
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(logvar), np.asarray(ref[1]))


@pytest.mark.slow
def test_bfloat16_loss_and_float32_gradients(cfg, params, stacks):
    """bf16 compute: the loss is float32 and near fp32's; gradients come back float32."""
    bcfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    key = jax.random.key(5)
    fp32 = float(vae.loss(cfg, params, key, stacks, 5)[0])
    (loss, metrics), grads = jax.value_and_grad(lambda p: vae.loss(bcfg, p, key, stacks, 5), has_aux=True)(params)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    assert float(loss) == pytest.approx(fp32, rel=1e-2)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    mean, _ = vae.encode(bcfg, params, stacks)
    assert mean.dtype == jnp.float32 and vae.decode(bcfg, params, mean).dtype == jnp.float32
    assert vae.model_config(bcfg) == vae.model_config(cfg)


@pytest.mark.slow
def test_training_again_with_another_learning_rate_reuses_the_compiled_chunk(tmp_path, dataset, caplog):
    """V's loss and sampler reach train.fit as values (train.Bound over the static config), so a
    second training with another learning rate compiles no new training chunk."""
    import logging

    frames, stack_rows = dataset
    compiles = []
    for i, lr in enumerate((1e-3, 3e-3)):
        cfg = _cfg(steps=10, kl_ramp_steps=5, chunk=10, checkpoint_every=10)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))
        caplog.clear()
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            params, _ = vae.train(Config(vae=cfg), jax.random.key(0), {"frame": frames, "stack_rows": stack_rows},
                                  tmp_path / str(i), progress=False)
        compiles.append(sum("run_chunk" in r.getMessage() and "Compiling" in r.getMessage() for r in caplog.records))
    assert compiles == [1, 0], compiles
