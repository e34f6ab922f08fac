"""Drift mitigations for M, measured on drift: input dropout and the z' penalty against the plain loss.

    python experiments/mitigations.py RUN [--steps 3000] [--dropout 0.1] [--z-penalty 0.1] [--out DIR]

For a finished run (one seed), M is trained from scratch on the run's random data (round 1, the
run's latents) once per variant, with the same key and steps: plain, input_dropout, z_penalty.
Each M is then run open-loop on fresh held-out episodes (200 random, seed 999; 20 of the run's
agent, seed 1000) with wm_jax.drift.measure. Prints latent MSE and KL at k = 1, 5, 20, 50 and the
one-step latent NLL on the held-out random episodes; writes OUT/mitigations.json and .md.
Models go to RUN/mitigations/NAME (resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from wm_jax import drift, pipeline, transition

K = (1, 5, 20, 50)


def _experiment_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--z-penalty", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args()
    ablation = _experiment_module("verifier_ablation")  # loading and held-out collection live there
    world_model_eval = _experiment_module("world_model_eval")  # and the one-step metrics here
    cfg, params, _ = ablation._load(args.run)
    arrays = pipeline._load_arrays([args.run / "data" / "round1"])
    from wm_jax import data

    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat = np.load(args.run / "latents_round1.npz")
    m_arrays = transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)
    held = {policy: ablation._held_out(cfg, params, policy, n, 999 + i)
            for i, (policy, n) in enumerate((("random", 200), ("agent", 20)))}

    variants = {
        "plain": cfg.transition,
        f"input_dropout={args.dropout}": dataclasses.replace(cfg.transition, input_dropout=args.dropout),
        f"z_penalty={args.z_penalty}": dataclasses.replace(cfg.transition, z_penalty=args.z_penalty),
    }
    results = {}
    for name, tcfg in variants.items():
        tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, steps=args.steps))
        out = args.run / "mitigations" / name.replace("=", "_")
        transition.train(tcfg, m_arrays, jax.random.key(cfg.seed + 2000), out)
        m = transition.load(tcfg, out, cfg.vae.latent)
        vcfg = dataclasses.replace(cfg, transition=tcfg)
        res = {}
        for policy, h in held.items():
            d = drift.measure(vcfg, jax.random.key(7), {"vae": params["vae"], "transition": m}, drift.pad_episodes(h),
                              max_k=max(K), stride=25, decode_pairs=0)
            res[policy] = {f"latent_mse@{k}": d["latent_mse"][k] for k in K} | {f"kl@{k}": d["kl"][k] for k in K} \
                | {f"count@{k}": d["count"][k] for k in K}
        nll = world_model_eval.m_metrics(vcfg, m, held["random"])["latent_nll"]
        results[name] = {"drift": res, "one_step_nll_random": nll}
        print(name, json.dumps(results[name]), flush=True)

    lines = ["| M trained with | held-out episodes | latent MSE k=1 | k=5 | k=20 | k=50 | KL k=1 | k=5 | k=20 | k=50 | "
             "one-step NLL (random) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for policy, d in r["drift"].items():
            mse = " | ".join("n/a" if d[f"latent_mse@{k}"] is None else f"{d[f'latent_mse@{k}']:.4f}" for k in K)
            kl = " | ".join("n/a" if d[f"kl@{k}"] is None else f"{d[f'kl@{k}']:.1f}" for k in K)
            lines.append(f"| {name} | {policy} | {mse} | {kl} | {r['one_step_nll_random']:.2f} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline._write_json(args.out / "mitigations.json", {"run": str(args.run), "steps": args.steps, "results": results})
    (args.out / "mitigations.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
