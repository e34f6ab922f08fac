"""Stride-2 convolutions written as one matmul each, with flax's parameters and results.

XLA's CPU convolutions are fast forward but their gradients are not: the input gradient of a
strided convolution is a convolution with a dilated input, the kernel gradient one with a dilated
kernel, and both fall to slow generic loops (measured on the `cpu` preset's VAE: 80% of a training
step, docs/PERFORMANCE.md). Written as gathers of shifted, strided slices (im2col) and one dot, the
gradients are slices, pads and dots, which XLA runs at matmul speed. The forward of `conv_s2`
stays XLA's convolution (faster than the matmul form at large batches); its gradient is the
matmul form's, by a custom VJP.

`Conv` and `ConvTranspose` are drop-in replacements for `flax.linen.Conv` / `ConvTranspose` with
strides (2, 2), padding "VALID" and a square kernel: the same parameter names, shapes and
initializers, so checkpoints load either way and the outputs agree to float rounding
(tests/test_layers.py).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp


def _patches(x: jax.Array, k: int) -> jax.Array:
    """The k x k windows at stride 2 of [..., H, W, C], side by side: [..., OH, OW, k * k * C]."""
    oh, ow = (x.shape[-3] - k) // 2 + 1, (x.shape[-2] - k) // 2 + 1
    return jnp.concatenate([x[..., u:u + 2 * oh - 1:2, v:v + 2 * ow - 1:2, :] for u in range(k) for v in range(k)],
                           axis=-1)


@jax.custom_vjp
def conv_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Cross-correlation, stride 2, VALID: [..., H, W, C] x [k, k, C, D] -> [..., (H-k)//2+1, ..., D].

    Forward: XLA's convolution (fast forward on the CPU, where the matmul form is 3-6x slower at
    large batches); gradients: the matmul form's (`_patches` and dots).
    """
    batch = x.shape[:-3]
    y = jax.lax.conv_general_dilated(x.reshape((-1,) + x.shape[-3:]), kernel, (2, 2), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(batch + y.shape[1:])


def _conv_s2_fwd(x, kernel):
    return conv_s2(x, kernel), (x, kernel)


def _conv_s2_bwd(res, g):
    x, kernel = res
    k, d = kernel.shape[0], kernel.shape[-1]
    patches, patches_vjp = jax.vjp(partial(_patches, k=k), x)
    g2 = g.reshape(-1, d)
    d_kernel = (patches.reshape(-1, patches.shape[-1]).T @ g2).reshape(kernel.shape)
    (d_x,) = patches_vjp((g2 @ kernel.reshape(-1, d).T).reshape(patches.shape))
    return d_x, d_kernel


conv_s2.defvjp(_conv_s2_fwd, _conv_s2_bwd)


def conv_transpose_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """flax/lax `conv_transpose`, stride 2, VALID: [..., H, W, C] x [k, k, C, D] -> [..., 2H-2+k, 2W-2+k, D].

    Sub-pixel form: output row 2a + p is a stride-1 correlation of the input with the kernel's rows
    of parity 1 - p, so the four output phases are one dot of k/2 x k/2 input patches with the four
    phase kernels side by side, interleaved afterwards. An odd kernel is padded in front to even.
    """
    h_in, w_in = x.shape[-3], x.shape[-2]
    k = kernel.shape[0]
    out_h, out_w = 2 * h_in - 2 + k, 2 * w_in - 2 + k
    if h_in == w_in == 1:  # every output pixel sees the one input pixel (flipped kernel): a dense layer
        return jnp.einsum("...ijc,uvcd->...uvd", x, kernel[::-1, ::-1])
    if k % 2:
        kernel = jnp.pad(kernel, ((1, 0), (1, 0), (0, 0), (0, 0)))
        k += 1
    half = k // 2
    batch = x.shape[:-3]
    xp = jnp.pad(x, [(0, 0)] * len(batch) + [(half - 1, half - 1), (half - 1, half - 1), (0, 0)])
    ah, aw = h_in + half - 1, w_in + half - 1
    patches = jnp.concatenate([xp[..., i:i + ah, j:j + aw, :] for i in range(half) for j in range(half)], axis=-1)
    # phase kernel [i, j, p, q] = kernel[1 + 2i - p, 1 + 2j - q]
    rows = jnp.array([[1 + 2 * i - p for p in (0, 1)] for i in range(half)])
    phases = kernel[rows[:, None, :, None], rows[None, :, None, :]]  # [half, half, 2, 2, C, D]
    d = kernel.shape[-1]
    phases = jnp.moveaxis(phases, 4, 2).reshape(half * half * x.shape[-1], 4 * d)
    y = (patches @ phases).reshape(batch + (ah, aw, 2, 2, d))
    y = jnp.swapaxes(y, -4, -3).reshape(batch + (2 * ah, 2 * aw, d))
    return y[..., :out_h, :out_w, :]


class _Stride2(nn.Module):
    """A stride-2, VALID, square-kernel layer with flax's parameters (kernel [k, k, C, D], bias [D])."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        # no cast when the dtypes agree: a quantized kernel (qwix's PTQ, wm_jax.models.quant) cannot be cast
        kernel = kernel if kernel.dtype == x.dtype else kernel.astype(x.dtype)
        return self.op(x, kernel) + bias.astype(x.dtype)

    @staticmethod
    def op(x: jax.Array, kernel: jax.Array) -> jax.Array:
        raise NotImplementedError


class Conv(_Stride2):
    """`nn.Conv(features, (k, k), strides=(2, 2), padding="VALID")`, computed by `conv_s2`."""

    op = staticmethod(conv_s2)


class ConvTranspose(_Stride2):
    """`nn.ConvTranspose(features, (k, k), strides=(2, 2), padding="VALID")`, computed by `conv_transpose_s2`."""

    op = staticmethod(conv_transpose_s2)
