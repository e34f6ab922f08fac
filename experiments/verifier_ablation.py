"""Verifier ablation, held-out verifier AUC and drift curves, reusing a finished run's V and M.

    python experiments/verifier_ablation.py RUN [RUN ...] [--modes off weight cutoff]
        [--taus 1.0 1.15 1.3] [--horizons 15 30 60] [--groundings 0.0] [--cma-seeds 0 1 2]
        [--generations 60] [--eval-episodes 100] [--one-by-one] [--out DIR]

For each RUN (a finished `wm-jax run`, one per seed) it loads V and the final agent's M, trains the
verifier K against that M on the run's data (RUN/ablation/verifier, resumable), then
  1. held-out AUC of K for real vs imagined transitions (one step, open loop at k = 1, 5, 20,
     noise) on fresh episodes of the random policy (seed 999) and of the run's agent;
  2. drift curves (wm_jax.search.drift) over k = 0..100 on the same episodes, with K's confidence;
  3. for each (verifier mode, horizon) pair (they shape the program: an outer Python loop), the
     grid taus x groundings x CMA-ES seeds as ONE compiled program (wm_jax.search.sweep): CMA-ES from
     scratch in M's dreams (the run's evolve settings, `--generations` generations, real checks
     of the mean every check_every generations, the best checked mean kept), then
     `--eval-episodes` real episodes of each cell's result. `--one-by-one` runs the same cells as
     lone searches instead (for the wall-time comparison; their rows are stored apart).
Finished cells are stored in RUN/ablation/cells.jsonl (cells_one_by_one.jsonl) and skipped on a
rerun; the table shows every stored cell with the same --generations, so a grid can be built up over
several invocations. Writes OUT/ablation.md (the table), OUT/ablation.json, OUT/drift.png and
OUT/drift.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import results_doc  # experiments/, on sys.path when a script runs
from wm_jax import logs, run_dir, stats
from wm_jax.models import verifier
from wm_jax.search import checks, drift, driver, rollout, sweep
from wm_jax.config import Config, ConfigError


def _setting(cell: dict) -> tuple:
    return cell["mode"], cell["tau"], cell["horizon"], cell.get("grounding", 0.0)


def _cell_id(cell: dict) -> tuple:
    return _setting(cell) + (cell.get("cma_seed"), cell["generations"])


def _pair(cfg: Config, run: run_dir.Run, k_params, mode: str, horizon: int, todo: list[tuple[float, float, int]],
          args, adir: Path) -> list[dict]:
    """The (mode, horizon) pair's cells [(tau, grounding, cma_seed)] as one sweep (or one by one)."""
    pair_cfg = dataclasses.replace(
        cfg,
        evolve=dataclasses.replace(cfg.evolve, horizon=horizon, generations=args.generations),
        verifier=dataclasses.replace(cfg.verifier, mode=mode),
    )
    cells = [sweep.Cell(seed, {"evolve.tau": tau, "evolve.grounding": g},
                        sweep.with_values(pair_cfg, {"evolve.tau": tau, "evolve.grounding": g}))
             for tau, g, seed in todo]
    world = checks.World(m_params=run.params["transition"], vae_params=run.params["vae"],
                         starts=(jnp.asarray(run.arrays["mean"]), jnp.asarray(run.arrays["logvar"])),
                         k_params=None if mode == "off" else k_params)
    tag = hashlib.sha1(json.dumps([todo, args.generations]).encode()).hexdigest()[:8]
    t0 = time.perf_counter()
    if args.one_by_one:
        results = [driver.evolve(c.config, c.key(), world, adir / f"lone_{mode}_h{horizon}_{tag}_{i}", progress=False)
                   for i, c in enumerate(cells)]
    else:
        results = sweep.run(pair_cfg, cells, world, adir / f"sweep_{mode}_h{horizon}_{tag}")
    search_s = time.perf_counter() - t0
    rows = []
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed + 1000), 1_000_000)  # this run's, apart from the searches'
    for c, res in zip(cells, results):
        ev = rollout.evaluate(c.config, {**run.params, "controller": jnp.asarray(res["best"])},
                              jax.random.fold_in(eval_key, c.seed), args.eval_episodes)
        logged = res["checks"]
        rows.append({
            "mode": mode, "tau": c.values["evolve.tau"], "horizon": horizon, "grounding": c.values["evolve.grounding"],
            "cma_seed": c.seed, "generations": args.generations, "eval_episodes": args.eval_episodes,
            "real_return_mean": ev["return_mean"], "real_return_std": ev["return_std"],
            "real_return_min": ev["return_min"],
            "dream_real_corr": stats.correlation([e["dream_return"] for e in logged], [e["real_return"] for e in logged]),
            "best_check": res["best_real"], "real_env_steps_checks": res["real_env_steps"],
            "program": "one by one" if args.one_by_one else "sweep", "pair_cells": len(cells), "pair_search_s": search_s,
        })
    return rows


def run_seed(run_path: Path, args) -> dict:
    run = run_dir.load(run_path)
    cfg = run.cfg
    adir = run_path / "ablation"
    adir.mkdir(exist_ok=True)
    key = jax.random.key(cfg.seed + 1000)
    verifier.train(cfg, jax.random.fold_in(key, 0), run.arrays, adir / "verifier", m_params=run.params["transition"])
    k_params = verifier.load(cfg, adir / "verifier")

    report_path = adir / "verifier_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = {"auc": {}, "drift": {}}
        for i, policy in enumerate(("random", "agent")):
            held = rollout.collect_encoded(cfg, run.params, policy, args.held_out_episodes[i], 999 + i)
            drifts = tuple(k for k in (1, 5, 20) if k <= cfg.verifier.seq_len)
            report["auc"][policy] = verifier.evaluate(cfg, jax.random.fold_in(key, 10 + i), run.params["transition"],
                                                      k_params, held, drifts=drifts, batches=32)
            report["drift"][policy] = drift.measure(cfg, jax.random.fold_in(key, 20 + i),
                                                    {**run.params, "verifier": k_params}, drift.pad_episodes(held),
                                                    max_k=100, stride=25)
        run_dir.write_json(report_path, report)

    cells_path = adir / ("cells_one_by_one.jsonl" if args.one_by_one else "cells.jsonl")
    done = [json.loads(line) for line in cells_path.read_text().splitlines()] if cells_path.exists() else []
    for c in done:
        c.setdefault("grounding", 0.0)  # cells stored before the grounding axis existed
        c.setdefault("cma_seed", None)  # ... and before the CMA-ES seed axis (one fixed key)
    have = {_cell_id(c) for c in done}
    for mode in args.modes:
        for horizon in args.horizons:
            todo = [(tau, g, s) for tau in args.taus for g in args.groundings for s in args.cma_seeds
                    if (mode, tau, horizon, g, s, args.generations) not in have]
            if not todo:
                continue
            rows = _pair(cfg, run, k_params, mode, horizon, todo, args, adir)
            print(f"{mode} h{horizon}: {len(rows)} cells in {rows[0]['pair_search_s']:.1f}s "
                  f"({rows[0]['program']})", flush=True)
            with open(cells_path, "a") as f:
                for r in rows:
                    r["seed"] = cfg.seed
                    f.write(json.dumps(logs.finite_or_none(r)) + "\n")
            done += rows
    wanted = [c for c in done if c["generations"] == args.generations]  # this and earlier invocations' cells
    return {"seed": cfg.seed, "report": report, "cells": wanted, "real_env_steps_data": int(len(run.arrays["mean"]))}


MIN_ROLLOUTS, MIN_FRAME_ROLLOUTS = 20, 8  # fewer rollouts reaching k: too noisy to plot


def _fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    lines = ["| verifier | tau | horizon | grounding | real return mean +- std (per run seed / CMA-ES seed) | mean | "
             "dream-real corr | env steps in checks |", "|---|---|---|---|---|---|---|---|"]
    cells = sorted({_setting(c) for r in results for c in r["cells"]})
    for mode, tau, horizon, grounding in cells:
        rows = [c for r in results for c in r["cells"] if _setting(c) == (mode, tau, horizon, grounding)]
        per_seed = ", ".join(f"s{c['seed']}" + ("" if c.get("cma_seed") is None else f"/c{c['cma_seed']}")
                             + f": {c['real_return_mean']:.1f} +- {c['real_return_std']:.1f}" for c in rows)
        corr = [c["dream_real_corr"] for c in rows if c["dream_real_corr"] is not None]
        lines.append(f"| {mode} | {tau} | {horizon} | {grounding} | {per_seed} | {np.mean([c['real_return_mean'] for c in rows]):.1f} | "
                     f"{_fmt(np.mean(corr) if corr else None, 2)} | {int(np.mean([c['real_env_steps_checks'] for c in rows]))} |")
    timing = sorted({(c["mode"], c["horizon"], c["program"], c["pair_cells"], round(c["pair_search_s"], 1), c["seed"])
                     for r in results for c in r["cells"] if "program" in c})
    if timing:
        lines += ["", "| verifier | horizon | program | cells | search wall s (compile included) | run seed |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {h} | {p} | {n} | {t} | {s} |" for m, h, p, n, t, s in timing]
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
    results_doc.save_figure(fig, path, 100)


def main() -> None:
    p = results_doc.runs_parser(__doc__)
    p.add_argument("--modes", nargs="+", default=["off", "weight", "cutoff"], choices=["off", "weight", "cutoff"])
    p.add_argument("--taus", nargs="+", type=float, default=[1.0, 1.15, 1.3])
    p.add_argument("--horizons", nargs="+", type=int, default=[15, 30, 60])
    p.add_argument("--groundings", nargs="+", type=float, default=[0.0],
                   help="EvolveConfig.grounding shares (0: off; the mitigation's axis)")
    p.add_argument("--cma-seeds", nargs="+", type=int, default=[0, 1, 2], help="CMA-ES seeds: one cell each")
    p.add_argument("--generations", type=int, default=60)
    p.add_argument("--eval-episodes", type=int, default=100, help="real episodes of each cell's final controller")
    p.add_argument("--one-by-one", action="store_true", help="lone searches instead of one sweep (timing)")
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
    run_dir.write_json(args.out / "ablation.json", results)
    (args.out / "ablation.md").write_text(table(results))
    plot(results, args.out / "drift.png")
    print(table(results))
    print(f"wrote {args.out / 'ablation.md'}, {args.out / 'ablation.json'}, {args.out / 'drift.png'}")


if __name__ == "__main__":
    main()
