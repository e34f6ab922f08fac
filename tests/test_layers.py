"""The matmul convolutions agree with flax's: parameters, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import layers, vae
from wm_jax.config import VAEConfig

CASES = [  # (module, flax module, input shape): every layer shape of the VAE, and odd sizes
    (layers.Conv(8, 4), nn.Conv(8, (4, 4), strides=(2, 2), padding="VALID"), (3, 64, 64, 4)),
    (layers.Conv(5, 4), nn.Conv(5, (4, 4), strides=(2, 2), padding="VALID"), (2, 31, 30, 3)),
    (layers.ConvTranspose(8, 5), nn.ConvTranspose(8, (5, 5), strides=(2, 2), padding="VALID"), (3, 1, 1, 16)),
    (layers.ConvTranspose(6, 5), nn.ConvTranspose(6, (5, 5), strides=(2, 2), padding="VALID"), (2, 5, 5, 8)),
    (layers.ConvTranspose(4, 6), nn.ConvTranspose(4, (6, 6), strides=(2, 2), padding="VALID"), (2, 13, 11, 8)),
]


@pytest.mark.slow
@pytest.mark.parametrize("mine,ref,shape", CASES)
def test_same_parameters_outputs_and_gradients_as_flax(mine, ref, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    p_mine, p_ref = mine.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, p_mine) == jax.tree.map(jnp.shape, p_ref)
    for a, b in zip(jax.tree.leaves(p_mine), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(a, b)  # same initializers, same draws
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p_ref)
    out_mine, out_ref = mine.apply(params, x), ref.apply(params, x)
    assert out_mine.shape == out_ref.shape
    np.testing.assert_allclose(out_mine, out_ref, rtol=1e-5, atol=1e-5)

    def grads(module):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(params, x)

    for a, b in zip(jax.tree.leaves(grads(mine)), jax.tree.leaves(grads(ref))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_vae_keeps_its_parameter_layout():
    """Checkpoints written with flax's convolutions load unchanged: same names and shapes."""
    cfg = VAEConfig(filters=(8, 16, 32, 64))
    params = jax.eval_shape(lambda key: vae.init(key, cfg), jax.random.key(0))["params"]  # shapes only
    assert sorted(params["encoder"]) == ["Conv_0", "Conv_1", "Conv_2", "Conv_3", "logvar", "mean"]
    assert sorted(params["decoder"]) == ["ConvTranspose_0", "ConvTranspose_1", "ConvTranspose_2", "ConvTranspose_3",
                                         "Dense_0"]
    assert params["decoder"]["ConvTranspose_3"]["kernel"].shape == (6, 6, 8, 4)
    assert params["encoder"]["Conv_0"]["kernel"].shape == (4, 4, 4, 8)
