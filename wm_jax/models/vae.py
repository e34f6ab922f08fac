"""V: a convolutional VAE on 64x64x4 frame stacks (Ha & Schmidhuber 2018, appendix A.1).

Encoder: four stride-2 4x4 convolutions, then dense heads for the mean and log-variance of
z. Decoder: dense to 4 * filters[3] features, then four transposed convolutions (5, 5, 6, 6 kernels,
stride 2) back to 64x64x4 with a sigmoid, as in Ha's vae.py. Two deviations, both because CartPole
frames are a mostly black canvas: hidden layers use ELU where Ha used ReLU (the ReLU decoder died,
gradient norm 0, within 100 steps), and the reconstruction term is the Bernoulli log-likelihood on
the decoder's logits instead of squared error after the sigmoid (with squared error the decoder
saturated to the black mean image, recon SSE stuck at 270 per stack, on some seeds).
Loss: the negative ELBO, reconstruction (summed over pixels) plus beta * KL, beta ramped 0 -> 1.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wm_jax.store import data as data_lib
from wm_jax import interrupt, precision
from wm_jax.models import layers, quant
from wm_jax.models import train as train_lib
from wm_jax.config import Config, VAEConfig

Params = Any


class _Encoder(nn.Module):
    filters: tuple[int, ...]
    latent: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i, f in enumerate(self.filters):
            x = nn.elu(layers.Conv(f, 4, name=f"Conv_{i}")(x))
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.Dense(self.latent, name="mean")(x), nn.Dense(self.latent, name="logvar")(x)


class _Decoder(nn.Module):
    filters: tuple[int, ...]

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = nn.Dense(4 * self.filters[3])(z)[..., None, None, :]  # 1x1 spatial, as Ha
        for i, (f, k) in enumerate(zip((self.filters[2], self.filters[1], self.filters[0]), (5, 5, 6))):
            x = nn.elu(layers.ConvTranspose(f, k, name=f"ConvTranspose_{i}")(x))
        # 1 -> 5 -> 13 -> 30 -> 64 pixels
        return layers.ConvTranspose(4, 6, name="ConvTranspose_3")(x)  # logits


class ConvVAE(nn.Module):
    filters: tuple[int, ...]
    latent: int

    def setup(self) -> None:
        self.encoder = _Encoder(self.filters, self.latent)
        self.decoder = _Decoder(self.filters)

    def __call__(self, x: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reconstruction logits, mean, logvar)."""
        mean, logvar = self.encoder(x)
        z = mean + jnp.exp(0.5 * logvar) * eps
        return self.decoder(z), mean, logvar

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        return nn.sigmoid(self.decoder(z))


def model(cfg: VAEConfig) -> ConvVAE:
    return ConvVAE(filters=tuple(cfg.filters), latent=cfg.latent)


def to_float(stack: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [0, 1]."""
    return jnp.asarray(stack, jnp.float32) / 255.0


def init(key: jax.Array, cfg: VAEConfig) -> Params:
    return _init(key, cfg.static())


@partial(jax.jit, static_argnums=1)
def _init(key: jax.Array, cfg: VAEConfig) -> Params:
    # One program of the initializers only (lazy_init traces the model with abstract inputs): run
    # op by op, flax's init compiled every truncated-normal shape and every convolution slice apart
    # (9 s on the cpu preset; this is 5 s)
    x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
    return model(cfg).lazy_init(key, x, jax.ShapeDtypeStruct((1, cfg.latent), jnp.float32))


class Int8VAE(NamedTuple):
    """V for INT8 serving (`quantize`): `encode` and `decode` take it in place of the float params."""

    encoder: Any  # qwix's quantized tree of the encoder's parameters
    decoder: Any  # the decoder's parameters with int8 kernels (wm_jax.models.quant.QTensor)


@functools.cache
def _int8_model(filters: tuple[int, ...], latent: int) -> nn.Module:
    return quant.ptq_model(ConvVAE(filters=filters, latent=latent), ("encode",))


def quantize(cfg: VAEConfig, params: Params) -> Int8VAE:
    """Post-training INT8: the encoder through qwix (int8 weights per output channel, int8 dynamic
    activations), the decoder's kernels int8 per output channel, widened to float32 when it runs
    (qwix does not follow its kernels into the sub-pixel transposed convolutions; wm_jax.models.quant)."""
    if isinstance(params, Int8VAE):
        raise TypeError("vae.quantize needs V's float32 parameters, got an Int8VAE")
    qmodel = _int8_model(tuple(cfg.filters), cfg.latent)
    enc = {"encoder": params["params"]["encoder"]}
    enc = quant.ptq_params(qmodel, enc, jnp.zeros((1, 64, 64, 4), jnp.float32), method="encode")["encoder"]
    return Int8VAE(encoder=enc, decoder=quant.weight_only(params["params"]["decoder"]))


def encode(cfg: VAEConfig, params: Params, stack: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8[..., 64, 64, 4] -> (mean, logvar), each float32[..., latent] (computed in
    cfg.compute_dtype, or INT8 when params is an Int8VAE)."""
    if isinstance(params, Int8VAE):
        qmodel = _int8_model(tuple(cfg.filters), cfg.latent)
        x = to_float(stack)
        flat = x.reshape((-1,) + x.shape[-3:])  # qwix quantizes activations per example of a flat batch
        mean, logvar = qmodel.apply({"params": {"encoder": params.encoder}}, flat, method="encode")
        return mean.reshape(x.shape[:-3] + mean.shape[-1:]), logvar.reshape(x.shape[:-3] + logvar.shape[-1:])
    dt = cfg.compute_dtype
    out = model(cfg).apply(precision.cast(params, dt), precision.cast(to_float(stack), dt), method=ConvVAE.encode)
    return precision.cast(out, "float32")


def decode(cfg: VAEConfig, params: Params, z: jax.Array) -> jax.Array:
    """float32[..., latent] -> float32[..., 64, 64, 4] in [0, 1] (computed in cfg.compute_dtype;
    from int8 kernels widened to float32 when params is an Int8VAE)."""
    if isinstance(params, Int8VAE):
        return model(cfg).apply({"params": {"decoder": quant.widen(params.decoder)}}, jnp.asarray(z, jnp.float32),
                                method=ConvVAE.decode)
    dt = cfg.compute_dtype
    out = model(cfg).apply(precision.cast(params, dt), precision.cast(z, dt), method=ConvVAE.decode)
    return precision.cast(out, "float32")


def kl_weight(cfg: VAEConfig, step: jax.Array) -> jax.Array:
    """beta: linear ramp 0 -> 1 over cfg.kl_ramp_steps (1 from the start when the ramp is 0)."""
    if cfg.kl_ramp_steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / cfg.kl_ramp_steps, 0.0, 1.0)


def loss(
    cfg: VAEConfig, params: Params, key: jax.Array, stack: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative ELBO with the ramped KL weight; named terms, per-example means.

    The network runs in cfg.compute_dtype; the loss terms are float32.
    """
    x = to_float(stack)
    eps = jax.random.normal(key, stack.shape[:-3] + (cfg.latent,))
    dt = cfg.compute_dtype
    out = model(cfg).apply(precision.cast(params, dt), precision.cast(x, dt), precision.cast(eps, dt))
    logits, mean, logvar = precision.cast(out, "float32")
    recon = jax.nn.sigmoid(logits)
    batch = stack.shape[0]
    # Bernoulli likelihood on logits: its gradient (sigmoid - x) never vanishes, whereas Ha's squared
    # error through a sigmoid let a decoder saturated to the black background stop learning.
    rec = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=(1, 2, 3))
    kl = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)
    # Free bits (Ha's kl_tolerance): no pressure on the KL below cfg.free_bits nats per dimension.
    kl_floored = jnp.maximum(kl, cfg.free_bits * cfg.latent)
    assert rec.shape == kl.shape == (batch,), (rec.shape, kl.shape)
    beta = kl_weight(cfg, step)
    total = jnp.mean(rec) + beta * jnp.mean(kl_floored)
    metrics = {
        "loss": total,
        "loss/recon": jnp.mean(rec),
        "loss/kl": jnp.mean(kl),
        "beta": beta,
        "mse_per_pixel": jnp.mean(jnp.square(recon - x)),
    }
    return total, metrics


def train(cfg: Config, key: jax.Array, data: dict[str, Any], out_dir, progress: bool = True,
          seeds: train_lib.Seeds | None = None) -> tuple[Params, dict[str, Any]]:
    """Fit V (cfg.vae) on random frame stacks of data = {"frame": uint8[N, 64, 64], "stack_rows":
    int32[N, 4]}; resumable in out_dir. The signature V, M and K share: train(cfg, key, data, out_dir).
    With `seeds` (train.Seeds), key is [seeds] and one V per seed trains on the same data as one program."""
    frames, stack_rows, cfg = data["frame"], data["stack_rows"], cfg.vae
    params, key_train = train_lib.split_init(key, lambda k: init(k, cfg), seeds)
    return train_lib.fit(
        "vae",
        cfg.train,
        train_lib.Bound(loss, cfg.static()),
        train_lib.Bound(_sample, cfg.static()),
        {"frames": jnp.asarray(frames), "stack_rows": jnp.asarray(stack_rows)},
        params,
        key_train,
        out_dir,
        model_config(cfg),
        progress,
        seeds,
    )


def _sample(cfg: VAEConfig, key: jax.Array, d: dict[str, jax.Array]) -> jax.Array:
    return data_lib.sample_stacks(key, d["frames"], d["stack_rows"], cfg.train.batch)


def model_config(cfg: VAEConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded into `cfg` (training settings stored apart).

    Not the compute dtype: parameters are float32 whatever it is, and checkpoints written before
    it existed keep loading.
    """
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train", "compute_dtype")}


def load(cfg: Config, out_dir, identity: dict[str, Any] | None = None, seeds: int | None = None) -> Params:
    """Parameters of V trained by `train` into out_dir (exactly the recorded step with `identity`:
    train.load_params); with `seeds`, a seed-batched training's [seeds] of them."""
    cfg = cfg.vae
    like = init(jax.random.key(0), cfg)
    return train_lib.load_params(cfg.train, train_lib.seeds_like(like, seeds), out_dir, model_config(cfg), identity,
                                 batched=seeds is not None)


def reconstructions(cfg: VAEConfig, params: Params, frames, stack_rows, n: int = 6
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The newest frame of n stacks spread over the data and its reconstruction from the posterior
    mean: (real uint8[n, 64, 64], recon [n, 64, 64] in [0, 1], rows int32[n])."""
    rows = np.linspace(0, len(stack_rows) - 1, n).astype(np.int32)
    x = data_lib.stacks(jnp.asarray(frames), jnp.asarray(stack_rows), jnp.asarray(rows))
    recon = _reconstruct(cfg.static(), params, x)
    return np.asarray(x[..., -1]), np.asarray(recon)[..., -1], rows


@partial(jax.jit, static_argnums=0)
def _reconstruct(cfg: VAEConfig, params: Params, x: jax.Array) -> jax.Array:
    # jitted: eagerly, each of the convolutions' slices would be dispatched (and compiled) alone
    return decode(cfg, params, encode(cfg, params, x)[0])


@partial(jax.jit, static_argnums=0)
def _encode_rows(cfg: VAEConfig, params: Params, frames: jax.Array, stack_rows: jax.Array, rows: jax.Array):
    return encode(cfg, params, data_lib.stacks(frames, stack_rows, rows))


def encode_all(cfg: VAEConfig, params: Params, frames, stack_rows, batch: int = 1024) -> tuple:
    """Posterior (mean, logvar) for every dataset row, in fixed-size batches (one compile per
    config, the frames an argument of it, not a constant baked into it)."""
    frames = jnp.asarray(frames)
    stack_rows = jnp.asarray(stack_rows)
    static = cfg.static()
    n = stack_rows.shape[0]
    means, logvars = [], []
    for lo in range(0, n, batch):
        interrupt.check()  # Ctrl-C between batches
        rows = np.minimum(np.arange(lo, lo + batch), n - 1)
        m, lv = _encode_rows(static, params, frames, stack_rows, jnp.asarray(rows))
        means.append(np.asarray(m)[: n - lo])
        logvars.append(np.asarray(lv)[: n - lo])
    return np.concatenate(means), np.concatenate(logvars)
