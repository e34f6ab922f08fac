"""Training speed of V and M at a preset: optimizer steps per second, compile time apart.

    python benchmarks/train_speed.py [--preset cpu] [--chunks 3] [--json PATH]

Times the library's own jitted chunk (wm_jax.models.train.run_chunk, what `fit` runs) on --episodes random
episodes (default 200), after one warm-up chunk that compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from wm_jax.models import train, transition, vae
from wm_jax.store import collection, data
from wm_jax.presets import get_preset


def _time(cfg_train, loss_fn, sample_fn, d, params, chunks: int) -> dict:
    state = train.init_state(cfg_train, params)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, _ = train.run_chunk(cfg_train.hyper(), loss_fn, sample_fn, cfg_train.chunk, key, d, state)
    jax.block_until_ready(state.params)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(chunks):
        state, _ = train.run_chunk(cfg_train.hyper(), loss_fn, sample_fn, cfg_train.chunk, key, d, state)
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - t0
    steps = chunks * cfg_train.chunk
    return {"first_chunk_s": compile_s, "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "examples_per_s": steps * cfg_train.batch / seconds, "batch": cfg_train.batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--episodes", type=int, default=200, help="random episodes to train on (seed 123)")
    p.add_argument("--json")
    args = p.parse_args()
    cfg = get_preset(args.preset)
    cols = collection.collect_arrays(jax.random.key(123), args.episodes, progress=False)
    index = data.EpisodeIndex.from_columns(cols["episode"], cols["t"])

    vcfg = cfg.vae
    vd = {"frames": jnp.asarray(cols["frame"]), "stack_rows": jnp.asarray(index.stack_rows)}
    v = _time(
        vcfg.train, lambda prm, k, x, s: vae.loss(vcfg, prm, k, x, s),
        lambda k, d: data.sample_stacks(k, d["frames"], d["stack_rows"], vcfg.train.batch),
        vd, vae.init(jax.random.key(1), vcfg), args.chunks,
    )
    latent = vcfg.latent
    n = len(cols["t"])
    tcfg = cfg.transition
    md = {
        "mean": jnp.zeros((n, latent)), "logvar": jnp.zeros((n, latent)), "action": jnp.asarray(cols["action"]),
        "reward": jnp.asarray(cols["reward"]), "done": jnp.asarray(cols["done"]),
        "is_first": jnp.asarray(index.is_first), "is_last": jnp.asarray(index.is_last),
    }
    m = _time(
        tcfg.train, lambda prm, k, b, s: transition.loss(tcfg, prm, b),
        lambda k, d: transition.sequence_batch(k, d, tcfg.train.batch, tcfg.seq_len),
        md, transition.init(jax.random.key(2), tcfg, latent), args.chunks,
    )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"
    print(f"preset {args.preset}; {machine}")
    print("| model | batch | steps/s | examples/s | first chunk (compile) s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("VAE", v), (f"transition (seq {tcfg.seq_len})", m)):
        print(f"| {name} | {r['batch']} | {r['steps_per_s']:.1f} | {r['examples_per_s']:.0f} | {r['first_chunk_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "machine": machine, "vae": v, "transition": m}, f, indent=2)


if __name__ == "__main__":
    main()
