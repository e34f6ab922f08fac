"""INT8 post-training quantization of V and M, for serving (`wm-jax serve --int8`).

    v8 = vae.quantize(cfg.vae, params["vae"])                 # V: encoder by qwix, decoder weight-only
    m8 = transition.quantize(cfg.transition, params["transition"])   # M: the packed Cell in int8
    params8 = {**params, "vae": v8, "transition": m8}         # rollout.agent_step, Agent, the server
    quant.nbytes(params8), quant.save(path, params8)          # size in memory / on disk (safetensors)

Weights are int8 with one float32 scale per output channel (symmetric, absmax). Where they meet
the activations:
  - V's encoder (four stride-2 convolutions and the two dense heads) runs through google's qwix
    (PTQ, int8 weights and dynamic per-example int8 activations: `lax.conv_general_dilated` and
    `dot_general` are intercepted inside the flax module).
  - M's LSTM and heads are not flax calls when the agent steps: `transition.pack` lays their
    weights out as two matrices outside any module, where qwix's interception cannot see them (its
    flax reference, `nn.OptimizedLSTMCell`, concatenates its kernels before the dot, so qwix leaves
    those float too). `matmul` below does the int8 dot itself: activations quantized per row,
    `lax.dot_general(..., preferred_element_type=int32)`, rescaled to float32.
  - V's decoder (for /v1/dream frames only) is weight-only: its transposed convolutions gather
    the kernel into sub-pixel phases before the dot (wm_jax.models.layers), which qwix does not follow, so
    its kernels are stored int8 and widened to float32 inside the jitted call.
Measured on 2-core x86 CPUs (docs/RESULTS.md, "INT8 serving", names the machine): XLA's int8 dot
is no faster than float32 at serving batch sizes, so INT8 here buys size, not speed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.store import checkpoint

INT8_MAX = 127.0


class QTensor(NamedTuple):
    """An int8 tensor with float32 scales broadcastable against it: value = q * scale."""

    q: jax.Array
    scale: jax.Array


def per_channel(w: jax.Array, axis: int = -1) -> QTensor:
    """Symmetric absmax int8 with one scale per index of `axis` (the output channels)."""
    w = jnp.asarray(w, jnp.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    scale = jnp.max(jnp.abs(w), axis=reduce, keepdims=True) / INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return QTensor(jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale)


def dequantize(t: QTensor) -> jax.Array:
    return t.q.astype(jnp.float32) * t.scale


def _is_q(x: Any) -> bool:
    return isinstance(x, QTensor)


def weight_only(tree: Any) -> Any:
    """Every floating leaf of rank >= 2 (kernels) as a per-output-channel QTensor; biases stay float32."""
    return jax.tree.map(lambda w: per_channel(w) if jnp.ndim(w) >= 2 else w, tree)


def widen(tree: Any) -> Any:
    """`weight_only`'s inverse up to rounding: every QTensor back to float32."""
    return jax.tree.map(lambda x: dequantize(x) if _is_q(x) else x, tree, is_leaf=_is_q)


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    """x [..., K] @ w [K, N] with float32 results. `scale` None: w in its own dtype (float32 or
    bfloat16). Otherwise w is int8 with per-column scales [N] and x is quantized per row (absmax)
    for an int8 x int8 -> int32 dot."""
    if scale is None:
        return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    x = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / INT8_MAX
    x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
    xq = jnp.clip(jnp.round(x / x_scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scale * scale


def ptq_model(model: Any, methods: tuple[str, ...]) -> Any:
    """`model` (flax linen) wrapped by qwix for int8 weights and int8 dynamic activations."""
    try:
        import qwix
    except ImportError as e:  # the optional extra
        raise ImportError("INT8 needs qwix: pip install -e '.[serve]'") from e
    except AttributeError as e:  # qwix imports flax.nnx, which fails at import on a jax newer than that flax knows
        import flax

        raise ImportError(f"INT8 needs qwix, which could not import flax.nnx: flax {flax.__version__} does not run on "
                          f"jax {jax.__version__} ({e}); install the flax made for this jax (with jax 0.11, flax "
                          "0.12.10 works and 0.12.8 does not)") from e
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)
    return qwix.quantize_model(model, qwix.PtqProvider([rule]), methods=methods)


def ptq_params(qmodel: Any, params: Any, *init_args: Any, method: str) -> Any:
    """`params` (float32, the {"params": ...} subtree qmodel's `method` uses) quantized as qmodel lays them out."""
    import qwix

    abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), *init_args, method=method))
    return qwix.quantize_params(params, abstract["params"], allow_extra_params=True)


def arrays(tree: Any) -> dict[str, np.ndarray]:
    """{path: host array} of every array leaf (qwix's quantized leaves open into their int8 values
    and scales), in a fixed order: what `save` writes and `nbytes` counts."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            out["/".join(map(checkpoint.key_name, path)) or "value"] = np.ascontiguousarray(np.asarray(leaf))
    return out


def nbytes(tree: Any) -> int:
    return sum(a.nbytes for a in arrays(tree).values())


def save(path: Any, tree: Any) -> int:
    """Every array of `tree` into one safetensors file (written beside, then renamed); its size in bytes."""
    import os

    from safetensors.numpy import save_file

    tmp = f"{path}.tmp"
    save_file(arrays(tree), tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)
