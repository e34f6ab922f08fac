"""INT8 V + M against float32: size, accuracy on held-out episodes, and the agent's real return.

    python experiments/int8_eval.py RUN_DIR [--episodes 100] [--held-out 200] [--seed 999]

Both models are the run's final agent: "float32" runs V and M in float32 (whatever the run trained
in); "int8" is V and M quantized after training (wm_jax.models.quant: the encoder by qwix, M's packed
matrices by wm_jax.models.quant.matmul, the decoder weight-only). Measured:
  size on disk        V + M as one safetensors file each (quant.save); the controller (and K) are
                      not quantized and not counted
  encoder             |mean_int8 - mean_fp32| over the held-out stacks: mean and max, and the RMS
                      error relative to the posterior means' spread (per-dimension std, averaged)
  decoder             reconstruction MSE per pixel from the float32 posterior mean, both decoders
  M                   one-step latent NLL (nats), done AUC and reward MAE, teacher-forced on the
                      held-out episodes with the float32 encoder's latents (M's own error), and the
                      whole INT8 chain (INT8 latents into INT8 M)
  real return         --episodes real episodes with the whole agent in the loop, on the run's own
                      evaluation key (the same episodes for both)
The held-out episodes are fresh random-policy episodes (key --seed, never trained on), as in
experiments/world_model_eval.py. Writes experiments/results/int8_eval.{json,md} and the table into
docs/RESULTS.md between the int8_eval.py markers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import results_doc
from world_model_eval import m_metrics

from wm_jax import agent as agent_lib, stages
from wm_jax import run_dir
from wm_jax.models import quant, transition, vae
from wm_jax.search import rollout
from wm_jax.store import collection, data
from wm_jax.presets import with_compute_dtype

RESULTS = Path(__file__).parent / "results"
DOC = Path(__file__).parent.parent / "docs" / "RESULTS.md"
BEGIN, END = "<!-- int8_eval.py: begin -->", "<!-- int8_eval.py: end -->"


def encode(cfg, v, frames, stack_rows, batch=512):
    fn = jax.jit(lambda x: vae.encode(cfg.vae, v, x)[0])
    out = []
    for lo in range(0, len(stack_rows), batch):
        rows = jnp.arange(lo, min(lo + batch, len(stack_rows)))
        out.append(np.asarray(fn(data.stacks(frames, jnp.asarray(stack_rows), rows))))
    return np.concatenate(out)


def recon_mse(cfg, v, mean, frames, stack_rows, batch=512):
    dec = jax.jit(lambda z: vae.decode(cfg.vae, v, z))
    errs = []
    for lo in range(0, len(mean), batch):
        rows = jnp.arange(lo, min(lo + batch, len(mean)))
        x = vae.to_float(data.stacks(frames, jnp.asarray(stack_rows), rows))
        errs.append(np.asarray(jnp.mean(jnp.square(dec(jnp.asarray(mean[lo:lo + batch])) - x), axis=(1, 2, 3))))
    return float(np.mean(np.concatenate(errs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=100, help="real episodes per model")
    p.add_argument("--held-out", type=int, default=200, help="fresh random episodes for the accuracy figures")
    p.add_argument("--seed", type=int, default=999, help="key of the held-out episodes")
    args = p.parse_args()
    t_start = time.perf_counter()
    cfg, params = run_dir.load_agent(args.run_dir)
    cfg = with_compute_dtype(cfg, "float32")
    v8 = vae.quantize(cfg.vae, params["vae"])
    m8 = transition.quantize(cfg.transition, params["transition"])
    models = {"float32": {"vae": params["vae"], "transition": params["transition"]},
              "int8": {"vae": v8, "transition": m8}}

    with tempfile.TemporaryDirectory() as tmp:
        size = {k: quant.save(Path(tmp) / f"{k}.safetensors", m) for k, m in models.items()}

    ds = collection.collect(jax.random.key(args.seed), args.held_out, progress=False)
    arrays = data.to_arrays(ds)
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    frames = jnp.asarray(arrays["frame"])
    mean = encode(cfg, params["vae"], frames, index.stack_rows)
    mean8 = encode(cfg, v8, frames, index.stack_rows)
    err = np.abs(mean8 - mean)
    spread = float(mean.std(axis=0).mean())
    zeros = np.zeros_like(mean)
    rows32 = transition.training_arrays(mean, zeros, arrays, index)
    rows8 = transition.training_arrays(mean8, zeros, arrays, index)
    result = {
        "run": f"{cfg.preset} preset, seed {cfg.seed} (`wm-jax run --preset {cfg.preset} --seed {cfg.seed}`)",
        "held_out_episodes": args.held_out, "held_out_rows": len(mean),
        "held_out_seed": args.seed, "device": stages.device_name(),
        "size_bytes": size,
        "encoder": {"mean_abs_err": float(err.mean()), "max_abs_err": float(err.max()),
                    "rms_err_over_spread": float(np.sqrt(np.mean(np.square(mean8 - mean)))) / spread,
                    "latent_spread": spread},
        "decoder_mse_per_pixel": {"float32": recon_mse(cfg, params["vae"], mean, frames, index.stack_rows),
                                  "int8": recon_mse(cfg, v8, mean, frames, index.stack_rows)},
        "m": {"float32": m_metrics(cfg, params["transition"], rows32),
              "int8 (float32 latents)": m_metrics(cfg, m8, rows32),
              "int8 chain (int8 latents)": m_metrics(cfg, m8, rows8)},
    }
    key = agent_lib.evaluation_key(cfg.seed)
    result["real"] = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        ev = rollout.evaluate(cfg, {**params, **m}, key, args.episodes)
        result["real"][name] = {k: ev[k] for k in ("return_mean", "return_std", "return_min", "episodes")}
        result["real"][name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: real return {ev['return_mean']:.1f} +- {ev['return_std']:.1f} (min {ev['return_min']:.0f}) "
              f"over {ev['episodes']} episodes", flush=True)
    result["seconds"] = time.perf_counter() - t_start

    RESULTS.mkdir(exist_ok=True)
    results_doc.write(RESULTS / "int8_eval.json", json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    results_doc.write(RESULTS / "int8_eval.md", table)
    if results_doc.update_block(DOC, table, BEGIN, END):
        print(f"updated {DOC}")
    print(table)


def markdown(r: dict) -> str:
    m, real, size = r["m"], r["real"], r["size_bytes"]
    lines = [
        "| | float32 | INT8 |",
        "|---|---|---|",
        (f"| V + M on disk (safetensors) | {size['float32'] / 1e6:.2f} MB | {size['int8'] / 1e6:.2f} MB "
         f"({size['int8'] / size['float32']:.0%}) |"),
        (f"| encoder: mean abs error of the latent mean (max) | - | {r['encoder']['mean_abs_err']:.4f} "
         f"({r['encoder']['max_abs_err']:.3f}) |"),
        f"| encoder: RMS error / latent spread | - | {r['encoder']['rms_err_over_spread']:.3%} |",
        (f"| decoder: reconstruction MSE per pixel | {r['decoder_mse_per_pixel']['float32']:.5f} | "
         f"{r['decoder_mse_per_pixel']['int8']:.5f} |"),
    ]
    for label, key in (("M: one-step latent NLL (nats)", "latent_nll"), ("M: done AUC", "done_auc"),
                       ("M: reward MAE", "reward_mae")):
        lines.append(f"| {label} | {m['float32'][key]:.4f} | {m['int8 (float32 latents)'][key]:.4f} "
                     f"(INT8 chain: {m['int8 chain (int8 latents)'][key]:.4f}) |")
    f, i = real["float32"], real["int8"]
    lines.append(f"| real return over {f['episodes']} episodes, mean +- std (min) | {f['return_mean']:.1f} +- "
                 f"{f['return_std']:.1f} ({f['return_min']:.0f}) | {i['return_mean']:.1f} +- {i['return_std']:.1f} "
                 f"({i['return_min']:.0f}) |")
    lines.append("")
    lines.append(f"Agent: {r['run']}; held-out: {r['held_out_episodes']} random episodes ({r['held_out_rows']:,} "
                 f"rows, key {r['held_out_seed']}); {r['device']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
