"""Drift mitigations for M, measured on drift: input dropout, the z' penalty and the contrastive
latent loss against the plain loss.

    python experiments/mitigations.py RUN [RUN ...] [--steps 3000] [--dropout 0.1 ...] [--z-penalty 0.1 ...]
        [--contrastive 0.1 ...] [--temperature 0.1] [--out DIR]

For each finished run (one per seed), M is trained from scratch on the run's random data (round 1,
the run's latents) once per variant, with the same key and steps: plain, each input_dropout, each
z_penalty, each contrastive weight (TransitionConfig.contrastive, at --temperature). Give a flag
with no values to leave that kind out (`--dropout --z-penalty --contrastive 0.1`).
Each M is then run open-loop on fresh held-out episodes (200 random, seed 999; 20 of the run's
agent, seed 1000) with wm_jax.search.drift.measure. Prints latent MSE and KL at k = 1, 5, 20, 50, 100
(random episodes end long before 100 steps: only the agent's reach it) and the one-step latent NLL
on the held-out random episodes; writes OUT/mitigations.json and .md (with
several runs, also each variant's change against plain averaged over the seeds).
Models go to RUN/mitigations/NAME (resumable).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

import results_doc  # experiments/, on sys.path when a script runs
from wm_jax import run_dir
from wm_jax.models import transition
from wm_jax.search import drift, rollout
from wm_jax.store import data

K = (1, 5, 20, 50, 100)


def _experiment_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seed(run: Path, args, world_model_eval) -> dict:
    """Every variant of M for one finished run: {name: {"drift": {policy: ...}, "one_step_nll_random"}}."""
    cfg, params = run_dir.load_agent(run)
    arrays = run_dir.load_arrays([run / "data" / "round1"])
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat = np.load(run / "latents_round1.npz")
    m_arrays = transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)
    held = {policy: rollout.collect_encoded(cfg, params, policy, n, 999 + i)
            for i, (policy, n) in enumerate((("random", 200), ("agent", 20)))}

    variants = {"plain": cfg.transition}
    variants |= {f"input_dropout={v}": dataclasses.replace(cfg.transition, input_dropout=v) for v in args.dropout}
    variants |= {f"z_penalty={v}": dataclasses.replace(cfg.transition, z_penalty=v) for v in args.z_penalty}
    variants |= {f"contrastive={v}": dataclasses.replace(cfg.transition, contrastive=v,
                                                         contrastive_temperature=args.temperature)
                 for v in args.contrastive}
    results = {}
    for name, tcfg in variants.items():
        tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, steps=args.steps))
        out = run / "mitigations" / name.replace("=", "_")
        variant = dataclasses.replace(cfg, transition=tcfg)
        transition.train(variant, jax.random.key(cfg.seed + 2000), m_arrays, out)
        m = transition.load(variant, out)
        res = {}
        for policy, h in held.items():
            d = drift.measure(variant, jax.random.key(7), {"vae": params["vae"], "transition": m}, drift.pad_episodes(h),
                              max_k=max(K), stride=25, decode_pairs=0)
            res[policy] = {f"latent_mse@{k}": d["latent_mse"][k] for k in K} | {f"kl@{k}": d["kl"][k] for k in K} \
                | {f"count@{k}": d["count"][k] for k in K}
        nll = world_model_eval.m_metrics(variant, m, held["random"])["latent_nll"]
        results[name] = {"drift": res, "one_step_nll_random": nll}
        print(f"seed {cfg.seed}", name, json.dumps(results[name]), flush=True)
    return {"run": str(run), "seed": cfg.seed, "results": results}


def _fmt(x, nd):
    return "n/a" if x is None else f"{x:.{nd}f}"


def table(seeds: list[dict]) -> str:
    lines = [("| seed (run) | M trained with | held-out episodes | latent MSE k=1 | k=5 | k=20 | k=50 | k=100 | KL k=1 | "
              "k=5 | k=20 | k=50 | k=100 | one-step NLL (random) |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for name, r in s["results"].items():
            for policy, d in r["drift"].items():
                mse = " | ".join(_fmt(d.get(f"latent_mse@{k}"), 4) for k in K)
                kl = " | ".join(_fmt(d.get(f"kl@{k}"), 1) for k in K)
                run = f"{s['seed']} ({Path(s['run']).name})"
                lines.append(f"| {run} | {name} | {policy} | {mse} | {kl} | {r['one_step_nll_random']:.2f} |")
    if len(seeds) > 1:  # each variant against plain, seed by seed: the change in the mean over seeds
        lines += ["", ("| M trained with | held-out episodes | latent MSE k=20 vs plain | k=50 vs plain | k=100 vs plain | "
                       "seeds better at k=20 | KL k=20 vs plain | seeds better | one-step NLL vs plain |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for name in seeds[0]["results"]:
            if name == "plain":
                continue
            for policy in seeds[0]["results"][name]["drift"]:
                def delta(key, s):
                    v, p = s["results"][name]["drift"][policy].get(key), s["results"]["plain"]["drift"][policy].get(key)
                    return None if v is None or p is None else v - p
                d20 = [x for x in (delta("latent_mse@20", s) for s in seeds) if x is not None]
                d50 = [x for x in (delta("latent_mse@50", s) for s in seeds) if x is not None]
                d100 = [x for x in (delta("latent_mse@100", s) for s in seeds) if x is not None]
                dnll = [s["results"][name]["one_step_nll_random"] - s["results"]["plain"]["one_step_nll_random"]
                        for s in seeds]
                k20 = [x for x in (delta("kl@20", s) for s in seeds) if x is not None]
                lines.append(f"| {name} | {policy} | {_fmt(np.mean(d20) if d20 else None, 4)} | "
                             f"{_fmt(np.mean(d50) if d50 else None, 4)} | {_fmt(np.mean(d100) if d100 else None, 4)} | "
                             f"{sum(x < 0 for x in d20)} of {len(d20)} | "
                             f"{_fmt(np.mean(k20) if k20 else None, 1)} | {sum(x < 0 for x in k20)} of {len(k20)} | "
                             f"{np.mean(dnll):+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = results_doc.runs_parser(__doc__)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--dropout", nargs="*", type=float, default=[0.1])
    p.add_argument("--z-penalty", nargs="*", type=float, default=[0.1])
    p.add_argument("--contrastive", nargs="*", type=float, default=[], help="contrastive loss weights to try")
    p.add_argument("--temperature", type=float, default=0.1, help="the contrastive loss's temperature")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args()
    for run in args.runs:
        if not (run / "agent.json").exists():
            p.error(f"{run}: not a finished run (no agent.json)")
    world_model_eval = _experiment_module("world_model_eval")  # the one-step metrics live there
    seeds = [_seed(run, args, world_model_eval) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "contrastive" if args.contrastive and not args.dropout and not args.z_penalty else "mitigations"
    run_dir.write_json(args.out / f"{name}.json", {"steps": args.steps, "temperature": args.temperature, "seeds": seeds})
    (args.out / f"{name}.md").write_text(table(seeds))
    print(table(seeds))


if __name__ == "__main__":
    main()
