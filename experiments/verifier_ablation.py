"""Verifier ablation, held-out verifier AUC and drift curves, reusing a finished run's V and M.

    python experiments/verifier_ablation.py RUN [RUN ...] [--modes off weight cutoff]
        [--taus 1.0 1.15 1.3] [--horizons 15 30 60] [--groundings 0.0] [--generations 60] [--out DIR]

For each RUN (a finished `wm-jax run`, one per seed) it loads V and the final agent's M, trains the
verifier K against that M on the run's data (RUN/ablation/verifier, resumable), then
  1. held-out AUC of K for real vs imagined transitions (one step, open loop at k = 1, 5, 20,
     noise) on fresh episodes of the random policy (seed 999) and of the run's agent;
  2. drift curves (wm_jax.drift) over k = 0..100 on the same episodes, with K's confidence;
  3. every cell of modes x taus x horizons x groundings: CMA-ES from scratch in M's dreams (the run's evolve
     settings, `--generations` generations, real checks of the mean every check_every
     generations, the best checked mean kept) and 100 real episodes of the result.
Finished cells are stored in RUN/ablation/cells.jsonl and skipped on a rerun; the table shows every
stored cell with the same --generations, so a grid can be built up over several invocations. Writes
OUT/ablation.md (the table), OUT/ablation.json, OUT/drift.png and OUT/drift.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np

from wm_jax import data, drift, evolve, pipeline, rollout, transition, vae, verifier
from wm_jax.config import Config, ConfigError


def _load(run: Path):
    meta = json.loads((run / "agent.json").read_text())
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    vae_params = vae.load(cfg.vae, run / "vae")
    m_params = transition.load(cfg.transition, run / meta["transition_dir"], cfg.vae.latent, meta.get("transition_steps"))
    ctrl = np.load(run / "controller.npy")
    paths = sorted((run / "data").iterdir(), key=lambda p: int(p.name.removeprefix("round")))
    arrays = pipeline._load_arrays(paths)
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat = np.load(run / f"latents_round{len(paths)}.npz")
    m_arrays = transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)
    return cfg, {"vae": vae_params, "transition": m_params, "controller": ctrl}, m_arrays


def _held_out(cfg: Config, params, policy: str, episodes: int, seed: int):
    """Fresh episodes (never trained on) encoded by V: per-row arrays as transition.training_arrays."""
    pol = pipeline._agent_policy(cfg, params) if policy == "agent" else None
    kwargs = {} if pol is None else {"policy": pol}
    ds = data.collect(jax.random.key(seed), episodes, max_steps=cfg.eval.max_steps, chunk_size=episodes,
                      progress=False, **kwargs)
    cols = data.to_arrays(ds)
    index = data.EpisodeIndex.from_columns(cols["episode"], cols["t"])
    mean, logvar = vae.encode_all(cfg.vae, params["vae"], cols["frame"], index.stack_rows)
    return transition.training_arrays(mean, logvar, cols, index)


def _cell(cfg: Config, key, params, k_params, m_arrays, mode: str, tau: float, horizon: int, grounding: float, gens: int,
          out: Path):
    cell_cfg = dataclasses.replace(
        cfg,
        evolve=dataclasses.replace(cfg.evolve, tau=tau, horizon=horizon, grounding=grounding),
        verifier=dataclasses.replace(cfg.verifier, mode=mode),
    )
    base = {"vae": params["vae"], "transition": params["transition"]}

    def real_check(k, ctrl):
        return rollout.evaluate(cell_cfg, {**base, "controller": ctrl}, k, cfg.evolve.check_episodes,
                                cfg.eval.max_steps, batch=cfg.evolve.check_episodes, latents=grounding > 0)

    t0 = time.perf_counter()
    res = evolve.evolve(cell_cfg, key, params["transition"], (m_arrays["mean"], m_arrays["logvar"]), real_check, out,
                        gens, progress=False, k_params=None if mode == "off" else k_params)
    ev = rollout.evaluate(cell_cfg, {**base, "controller": res["best"]}, jax.random.fold_in(key, 1))
    checks = res["checks"]
    return {
        "mode": mode, "tau": tau, "horizon": horizon, "grounding": grounding, "generations": gens,
        "real_return_mean": ev["return_mean"], "real_return_std": ev["return_std"], "real_return_min": ev["return_min"],
        "dream_real_corr": rollout.correlation([c["dream_return"] for c in checks], [c["real_return"] for c in checks]),
        "best_check": res["best_real"], "real_env_steps_checks": res["real_env_steps"], "wall_s": time.perf_counter() - t0,
    }


def run_seed(run: Path, args) -> dict:
    cfg, params, m_arrays = _load(run)
    adir = run / "ablation"
    adir.mkdir(exist_ok=True)
    key = jax.random.key(cfg.seed + 1000)
    verifier.train(cfg, params["transition"], m_arrays, jax.random.fold_in(key, 0), adir / "verifier", progress=True)
    k_params = verifier.load(cfg, adir / "verifier", cfg.vae.latent)

    report_path = adir / "verifier_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = {"auc": {}, "drift": {}}
        for i, policy in enumerate(("random", "agent")):
            held = _held_out(cfg, params, policy, args.held_out_episodes[i], 999 + i)
            drifts = tuple(k for k in (1, 5, 20) if k <= cfg.verifier.seq_len)
            report["auc"][policy] = verifier.evaluate(cfg, jax.random.fold_in(key, 10 + i), params["transition"],
                                                      k_params, held, drifts=drifts, batches=32)
            report["drift"][policy] = drift.measure(cfg, jax.random.fold_in(key, 20 + i),
                                                    {**params, "verifier": k_params}, drift.pad_episodes(held),
                                                    max_k=100, stride=25)
        pipeline._write_json(report_path, report)

    cells_path = adir / "cells.jsonl"
    done = [json.loads(line) for line in cells_path.read_text().splitlines()] if cells_path.exists() else []
    for c in done:
        c.setdefault("grounding", 0.0)  # cells stored before the grounding axis existed
    for mode, tau, horizon, grounding in itertools.product(args.modes, args.taus, args.horizons, args.groundings):
        setting = (mode, tau, horizon, grounding, args.generations)
        if any(_setting(c) + (c["generations"],) == setting for c in done):
            continue
        cell_key = jax.random.fold_in(key, 100)  # the same CMA-ES noise in every cell: only the setting differs
        name = f"evolve_{mode}_t{tau}_h{horizon}" + (f"_g{grounding}" if grounding else "")
        res = _cell(cfg, cell_key, params, k_params, m_arrays, mode, tau, horizon, grounding, args.generations,
                    adir / name)
        res["seed"] = cfg.seed
        print(json.dumps(res), flush=True)
        with open(cells_path, "a") as f:
            f.write(json.dumps(pipeline._finite_or_none(res)) + "\n")
        done.append(res)
        # Every cell compiles its own programs (the config is a static argument); without this a long
        # grid piles them up until LLVM cannot map more memory for the next compile.
        jax.clear_caches()
    wanted = [c for c in done if c["generations"] == args.generations]  # this and earlier invocations' cells
    return {"seed": cfg.seed, "report": report, "cells": wanted, "real_env_steps_data": int(len(m_arrays["mean"]))}


MIN_ROLLOUTS, MIN_FRAME_ROLLOUTS = 20, 8  # fewer rollouts reaching k: too noisy to plot


def _fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _setting(cell: dict) -> tuple:
    return cell["mode"], cell["tau"], cell["horizon"], cell.get("grounding", 0.0)


def table(results: list[dict]) -> str:
    lines = ["| verifier | tau | horizon | grounding | real return mean +- std (per seed) | mean over seeds | "
             "dream-real corr | env steps in checks |", "|---|---|---|---|---|---|---|---|"]
    cells = sorted({_setting(c) for r in results for c in r["cells"]})
    for mode, tau, horizon, grounding in cells:
        rows = [c for r in results for c in r["cells"] if _setting(c) == (mode, tau, horizon, grounding)]
        per_seed = ", ".join(f"s{c['seed']}: {c['real_return_mean']:.1f} +- {c['real_return_std']:.1f}" for c in rows)
        corr = [c["dream_real_corr"] for c in rows if c["dream_real_corr"] is not None]
        lines.append(f"| {mode} | {tau} | {horizon} | {grounding} | {per_seed} | {np.mean([c['real_return_mean'] for c in rows]):.1f} | "
                     f"{_fmt(np.mean(corr) if corr else None, 2)} | {int(np.mean([c['real_env_steps_checks'] for c in rows]))} |")
    lines += ["", "| seed | held-out episodes | AUC one step | AUC drift k=1 | k=5 | k=20 (n) | AUC noise |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for policy, a in r["report"]["auc"].items():
            lines.append(f"| {r['seed']} | {policy} | {_fmt(a['auc/one_step'], 3)} | {_fmt(a.get('auc/drift_1'), 3)} | "
                         f"{_fmt(a.get('auc/drift_5'), 3)} | {_fmt(a.get('auc/drift_20'), 3)} "
                         f"({a.get('count/drift_20', 0)}) | {_fmt(a['auc/noise'], 3)} |")
    lines += ["", "| seed | episodes | k | latent MSE | KL (nats) | frame MSE | K confidence | rollouts reaching k |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for policy, d in r["report"]["drift"].items():
            for k in (0, 1, 5, 10, 20, 50, 100):
                lines.append(f"| {r['seed']} | {policy} | {k} | {_fmt(d['latent_mse'][k], 4)} | {_fmt(d['kl'][k], 1)} | "
                             f"{_fmt(d['frame_mse'][k], 4)} | {_fmt(d['confidence'][k], 3)} | {d['count'][k]} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("latent_mse", "kl", "frame_mse", "confidence")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for r in results:
        for policy, d in r["report"]["drift"].items():
            for ax, name in zip(axes, names):
                count = np.asarray(d["frame_count" if name == "frame_mse" else "count"])
                enough = count >= (MIN_FRAME_ROLLOUTS if name == "frame_mse" else MIN_ROLLOUTS)
                ys = np.array([np.nan if v is None or not ok else v for v, ok in zip(d[name], enough)], float)
                ax.plot(d["k"], ys, label=f"seed {r['seed']} {policy}", ls="-" if policy == "agent" else "--")
    for ax, name in zip(axes, names):
        ax.set_xlabel("k (open-loop steps)")
        ax.set_title(name)
    fig.suptitle(f"drift (a point needs {MIN_ROLLOUTS} rollouts reaching k, {MIN_FRAME_ROLLOUTS} for frames)",
                 fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--modes", nargs="+", default=["off", "weight", "cutoff"], choices=["off", "weight", "cutoff"])
    p.add_argument("--taus", nargs="+", type=float, default=[1.0, 1.15, 1.3])
    p.add_argument("--horizons", nargs="+", type=int, default=[15, 30, 60])
    p.add_argument("--groundings", nargs="+", type=float, default=[0.0],
                   help="EvolveConfig.grounding shares (0: off; the mitigation's axis)")
    p.add_argument("--generations", type=int, default=60)
    p.add_argument("--held-out-episodes", nargs=2, type=int, default=[200, 20], metavar=("RANDOM", "AGENT"))
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args()
    for run in args.runs:
        if not (run / "agent.json").exists():
            p.error(f"{run}: not a finished run (no agent.json)")
        evolve_cfg = Config.from_dict(json.loads((run / "config.json").read_text())).evolve
        for grounding in args.groundings:  # EvolveConfig's own rule, before any work
            try:
                dataclasses.replace(evolve_cfg, grounding=grounding)
            except ConfigError as e:
                p.error(f"--groundings: {e}")
    results = [run_seed(run, args) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline._write_json(args.out / "ablation.json", results)
    (args.out / "ablation.md").write_text(table(results))
    plot(results, args.out / "drift.png")
    print(table(results))
    print(f"wrote {args.out / 'ablation.md'}, {args.out / 'ablation.json'}, {args.out / 'drift.png'}")


if __name__ == "__main__":
    main()
