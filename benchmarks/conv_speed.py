"""V's convolutions: flax's (XLA's convolution) against wm_jax.models.layers (gradients as matmuls), per layer.

    python benchmarks/conv_speed.py [--batch 32] [--forward-batch 1024] [--filters 8,16,32,64]

For every layer of the VAE at the given filters: milliseconds for forward + backward (gradient with
respect to the input and the parameters) at --batch, and for the forward alone at --forward-batch
(encoding a data set), median of repeated jitted calls of a 10-step `lax.scan`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dream_throughput

from wm_jax import run_dir
from wm_jax.models import layers

STEPS = 10


def _ms(f, *args, repeats: int = 5) -> float:
    return 1e3 * dream_throughput.median_seconds(f, *args, repeats=repeats) / STEPS


def _train_ms(module, params, x) -> float:
    @jax.jit
    def run(params, x):
        def body(p, i):
            g = jax.grad(lambda p, x: jnp.sum(jnp.square(module.apply(p, x))), argnums=(0, 1))(p, x * (1 + 1e-6 * i))
            return jax.tree.map(lambda a, b: a - 1e-9 * b, p, g[0]), jnp.sum(g[1])
        return jax.lax.scan(body, params, jnp.arange(STEPS))

    return _ms(run, params, x)


def _forward_ms(module, params, x) -> float:
    @jax.jit
    def run(params, x):
        return jax.lax.scan(lambda c, i: (c + jnp.sum(module.apply(params, x * (1 + 1e-6 * i))), None), 0.0,
                            jnp.arange(STEPS))[0]

    return _ms(run, params, x)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--forward-batch", type=int, default=1024)
    p.add_argument("--filters", default="8,16,32,64", help="the VAE's four filter counts (the cpu preset's)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args(argv)
    f = [int(n) for n in args.filters.split(",")]
    info = dream_throughput.machine()
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"conv_speed_{info['platform']}.json"
    # (name, flax module, ours, input [H, W, C]): the encoder's four convolutions, the decoder's four deconvolutions
    cases = [(f"conv {s}x{s}x{c}->{o}", nn.Conv(o, (4, 4), strides=(2, 2), padding="VALID"), layers.Conv(o, 4), (s, s, c))
             for s, c, o in ((64, 4, f[0]), (31, f[0], f[1]), (14, f[1], f[2]), (6, f[2], f[3]))]
    cases += [(f"deconv {s}x{s}x{c}->{o} k{k}", nn.ConvTranspose(o, (k, k), strides=(2, 2), padding="VALID"),
               layers.ConvTranspose(o, k), (s, s, c))
              for s, c, o, k in ((1, 4 * f[3], f[2], 5), (5, f[2], f[1], 5), (13, f[1], f[0], 6), (30, f[0], 4, 6))]
    print(f"Machine: {info['platform']} ({info['device_kind']}), {info['cpu_cores']} CPU cores, jax {info['jax']}")
    print(f"| layer | flax fwd+bwd ms (batch {args.batch}) | wm_jax.models.layers fwd+bwd ms | "
          f"flax fwd ms (batch {args.forward_batch}) | wm_jax.models.layers fwd ms |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name, ref, ours, shape in cases:
        x = jax.random.normal(jax.random.key(0), (args.batch,) + shape)
        xf = jax.random.normal(jax.random.key(1), (args.forward_batch,) + shape)
        params = ref.init(jax.random.key(2), x)
        row = {"layer": name, "flax_train_ms": _train_ms(ref, params, x), "layers_train_ms": _train_ms(ours, params, x),
               "flax_forward_ms": _forward_ms(ref, params, xf), "layers_forward_ms": _forward_ms(ours, params, xf)}
        rows.append(row)
        print(f"| {name} | {row['flax_train_ms']:.2f} | {row['layers_train_ms']:.2f} | {row['flax_forward_ms']:.2f} | "
              f"{row['layers_forward_ms']:.2f} |", flush=True)
    out = {"machine": info, "batch": args.batch, "forward_batch": args.forward_batch, "filters": f, "layers": rows}
    run_dir.write_json(args.json, out)
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
