"""One verifier across environments: does K, trained on other tasks, score a task it never saw?

    python experiments/verifier_transfer.py --seed 0          # runs/verifier_transfer/s0, then the table
    python experiments/verifier_transfer.py --seeds 0 1 --report-only

One world model for several discrete tasks (CartPole-v1, Acrobot-v1, MountainCar-v0,
Breakout-MinAtar: at most 3 actions each, so M and K take a one-hot of 3): per task `--rows` rows of
the random policy (episodes drawn with the task's index folded into the seed, cut at --rows), V and
M trained on all of them pooled (the preset's steps and sizes). Then verifiers K against that M:
  - "own": K trained on the task's rows alone;
  - "left out": K trained on the other tasks' rows (the task is held out of K's training, not of
    V's or M's: K judges M's hidden state, so it needs the same M; the question is K's);
  - "pooled": one K trained on every task's rows.
Each K's held-out AUCs (`verifier.evaluate`: one step, open loop at drift k = 1, 5, 20, noise) on
fresh random episodes of each task (`--rows` // 2 rows, seed 999 + the task's index), every K
scoring the same examples of a task (one key per task). On `--controller-task` (CartPole-v1:
the one task where the recipe's searches reach a solving controller), CMA-ES in M's dreams with the
preset's round-1 search (real checks included) for `--cma-seeds`, with the verifier off, weighted by
its own K, and weighted by its left-out K, each result evaluated over 100 real episodes.

Every stage is stored under --runs/sSEED and skipped when there (kill and rerun to resume). Writes
--out (JSON: every figure, the machine, the command) and its table, and docs/RESULTS.md's block
between the VERIFIER_TRANSFER markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import results_doc  # experiments/, on sys.path when a script runs
from wm_jax import envs, pipeline, report, run_dir, stages
from wm_jax.config import Config
from wm_jax.models import transition, vae, verifier
from wm_jax.presets import get_preset, with_env
from wm_jax.search import checks, rollout, sweep
from wm_jax.store import collection, data

TASKS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Breakout-MinAtar")
ACTIONS = 3  # the most any of TASKS has: M's and K's one-hot
MEAN_LENGTH = {"CartPole-v1": 22, "Acrobot-v1": 500, "MountainCar-v0": 200, "Breakout-MinAtar": 10}  # random policy
EPISODE_STRIDE = 10_000_000  # task i's episode ids start at i * EPISODE_STRIDE in the pooled rows
BEGIN, END = "<!-- VERIFIER_TRANSFER_BEGIN -->", "<!-- VERIFIER_TRANSFER_END -->"


def pooled_config(preset: str, seed: int, k_steps: int | None = None, task: str | None = None) -> Config:
    """The preset (on `task`, for its controller) with M's and K's one-hot of ACTIONS, and K trained
    `k_steps` steps where given."""
    cfg = get_preset(preset, seed=seed)
    cfg = cfg if task is None else with_env(cfg, task)
    k_train = cfg.verifier.train if k_steps is None else dataclasses.replace(cfg.verifier.train, steps=k_steps)
    return dataclasses.replace(cfg, transition=dataclasses.replace(cfg.transition, actions=ACTIONS),
                               verifier=dataclasses.replace(cfg.verifier, actions=ACTIONS, train=k_train))


def _random_rows(task: str, key: jax.Array, rows: int, path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """`rows` steps of the task's random policy (stored at path; read back when there), and their
    record as a run's collect stage has it (`pipeline.collected`: episodes, rows, the mean return of
    the episodes not cut by `rows`)."""
    spec = envs.spec(task)
    if not path.exists():
        episodes = math.ceil(1.5 * rows / MEAN_LENGTH.get(task, spec.max_steps))  # enough to reach `rows`
        ds = collection.collect(key, episodes, max_steps=spec.max_steps, chunk_size=min(episodes, 256),
                                progress=False, max_rows=rows, env=task)
        data.save_dataset(ds, path, overwrite=True, env=task)
    ds = data.load_dataset(path, task)
    arrays = data.to_arrays(ds)
    return {k: arrays[k] for k in ("episode", "t", "frame", "action", "reward", "done")}, pipeline.collected(
        ds, spec.max_steps)


def _pool(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The tasks' rows one after another, each task's episode ids moved to their own range."""
    moved = [{**p, "episode": p["episode"].astype(np.int64) + i * EPISODE_STRIDE} for i, p in enumerate(parts)]
    return {k: np.concatenate([p[k] for p in moved]) for k in moved[0]}


def _m_arrays(cfg: Config, v_params, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    index = data.EpisodeIndex.from_columns(rows["episode"], rows["t"])
    mean, logvar = vae.encode_all(cfg.vae, v_params, rows["frame"], index.stack_rows)
    return data.training_arrays(mean, logvar, rows, index)


def _select(arrays: dict[str, np.ndarray], spans: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([v[a:b] for a, b in spans]) for k, v in arrays.items()}


def _json(path: Path, make):
    """make()'s value stored at path (NaN as null), or what is stored there already."""
    if not path.exists():
        run_dir.write_json(path, make())
    return json.loads(path.read_text())


def run_seed(args, seed: int) -> dict:
    work = Path(args.runs) / f"s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = pooled_config(args.preset, seed, args.k_steps)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    train_rows, random_data = zip(*[_random_rows(t, jax.random.fold_in(key, i), args.rows, work / "data" / t)
                                    for i, t in enumerate(args.tasks)])
    held_rows = [_random_rows(t, jax.random.key(999 + i), args.rows // 2, work / "held_out" / t)[0]
                 for i, t in enumerate(args.tasks)]
    pooled = _pool(train_rows)
    index = data.EpisodeIndex.from_columns(pooled["episode"], pooled["t"])
    v_params, _ = vae.train(cfg, jax.random.fold_in(key, 100), {"frame": pooled["frame"], "stack_rows": index.stack_rows},
                            work / "vae", args.progress)
    m_data = _m_arrays(cfg, v_params, pooled)
    m_params, _ = transition.train(cfg, jax.random.fold_in(key, 101), m_data, work / "transition", args.progress)
    ends = np.cumsum([len(r["episode"]) for r in train_rows])
    span = dict(zip(args.tasks, zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist())))
    k_sets = {"pooled": list(args.tasks)}
    for t in args.tasks:
        k_sets[f"own:{t}"] = [t]
        k_sets[f"left_out:{t}"] = [u for u in args.tasks if u != t]
    ks = {}
    for j, (name, tasks) in enumerate(k_sets.items()):
        rows = _select(m_data, [span[t] for t in tasks])
        ks[name], _ = verifier.train(cfg, jax.random.fold_in(key, 200 + j), rows, work / f"k_{name.replace(':', '_')}",
                                     args.progress, m_params=m_params)
    held = [_m_arrays(cfg, v_params, r) for r in held_rows]
    drifts = tuple(k for k in (1, 5, 20) if k < cfg.verifier.seq_len)

    def aucs():
        out = {}
        for i, t in enumerate(args.tasks):
            eval_key = jax.random.fold_in(key, 300 + i)  # every K scores the same examples of task t
            out[t] = {kind: verifier.evaluate(cfg, eval_key, m_params, ks[name], held[i], drifts=drifts,
                                              batches=args.batches)
                      for kind, name in (("own", f"own:{t}"), ("left_out", f"left_out:{t}"), ("pooled", "pooled"))}
        return out

    auc = _json(work / "auc.json", aucs)
    ctrl = _json(work / "controllers.json", lambda: controllers(args, seed, work, v_params, m_params, ks,
                                                                m_data, span))
    return {"seed": seed, "rows": {t: int(b - a) for t, (a, b) in span.items()},
            "held_out_rows": {t: int(len(r["episode"])) for t, r in zip(args.tasks, held_rows)},
            "random_data": dict(zip(args.tasks, random_data)),
            "auc": auc, "controller_task": args.controller_task, "controllers": ctrl, "wall_s": time.perf_counter() - t0}


def controllers(args, seed: int, work: Path, v_params, m_params, ks: dict, m_data: dict, span: dict) -> list[dict]:
    """CMA-ES on the controller task in the pooled M's dreams: verifier off, own K, left-out K."""
    task = args.controller_task
    cfg = pooled_config(args.preset, seed, args.k_steps, task)
    a, b = span[task]
    starts = (jnp.asarray(m_data["mean"][a:b]), jnp.asarray(m_data["logvar"][a:b]))
    rows = []
    for label, k_name in (("off", None), ("own", f"own:{task}"), ("left_out", f"left_out:{task}")):
        mode_cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier,
                                                                         mode="off" if k_name is None else "weight"))
        world = checks.World(m_params=m_params, vae_params=v_params, starts=starts,
                             k_params=None if k_name is None else ks[k_name])
        cells = sweep.grid(mode_cfg, seeds=args.cma_seeds)
        t0 = time.perf_counter()
        results = sweep.run(mode_cfg, cells, world, work / f"search_{label}", progress=args.progress)
        search_s = time.perf_counter() - t0
        for c, res in zip(cells, results):
            params = {"vae": v_params, "transition": m_params, "controller": jnp.asarray(res["best"])}
            ev = rollout.evaluate(mode_cfg, params, jax.random.fold_in(jax.random.key(seed + 1000), c.seed),
                                  args.eval_episodes)
            rows.append({"verifier": label, "cma_seed": c.seed, "return_mean": ev["return_mean"],
                         "return_std": ev["return_std"], "return_min": ev["return_min"], "episodes": ev["episodes"], "best_check": res["best_real"],
                         "checks": [(e["generation"], e["dream_return"], e["real_return"]) for e in res["checks"]],
                         "real_env_steps_checks": res["real_env_steps"], "search_s": search_s})
        print(f"{task}, verifier {label}: " + ", ".join(f"{r['return_mean']:.1f}" for r in rows[-len(cells):]),
              flush=True)
    return rows


KINDS = ("one_step", "drift_1", "drift_5", "drift_20", "noise")


def table(results: list[dict], tasks: list[str]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [f"Held-out AUC of real against imagined transitions (seeds {seeds}; mean over seeds where more than one):",
             "", "| task | K trained on | " + " | ".join(KINDS) + " |", "|---|---|" + "---|" * len(KINDS)]
    for t in tasks:
        for kind, label in (("own", "the task alone"), ("left_out", "the other tasks"), ("pooled", "every task")):
            cells = []
            for k in KINDS:
                v = [r["auc"][t][kind].get(f"auc/{k}") for r in results]
                cells.append(results_doc.mean_std(v, 3))
            lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    ctrl = [c for r in results for c in r["controllers"]]
    if ctrl:
        lines += ["", f"Controllers on {results[0]['controller_task']} ({ctrl[0]['episodes']} real episodes each; one search "
                  f"per CMA-ES seed and run seed; IQM, median and mean over the searches with rliable's 95% "
                  f"bootstrap intervals):",
                  "", "| verifier in the dream | searches | IQM | median | mean | real return mean +- std (min) per "
                  "search | best real check per search |", "|---|---|---|---|---|---|---|"]
        means = {}
        for label in ("off", "own", "left_out"):
            rows = [c for c in ctrl if c["verifier"] == label]
            means[label] = [c["return_mean"] for c in rows]
            agg = report.interval(means[label])
            cis = " | ".join(f"{agg[k]:.1f} [{agg[k + '_ci95'][0]:.1f}, {agg[k + '_ci95'][1]:.1f}]"
                             for k in ("iqm", "median", "mean"))
            lines.append(f"| {label} | {len(rows)} | {cis} | "
                         + "; ".join(f"{c['return_mean']:.1f} +- {c['return_std']:.1f} ({c['return_min']:.0f})"
                                     for c in rows)
                         + " | " + ", ".join(f"{c['best_check']:.1f}" for c in rows) + " |")
        lines += ["", "Probability that a search of the first scores above one of the second (rliable, searches "
                  "resampled apart, 95% interval):", ""]
        for a, b in (("own", "off"), ("left_out", "off"), ("left_out", "own")):
            imp = report.improvement(means[a], means[b])
            lines.append(f"- P({a} > {b}) = {imp['p']:.2f} [{imp['p_ci95'][0]:.2f}, {imp['p_ci95'][1]:.2f}]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--preset", default="frugal")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--rows", type=int, default=5000, help="random rows per task for V, M and K")
    p.add_argument("--k-steps", type=int, default=None, help="K's training steps (default: the preset's)")
    p.add_argument("--batches", type=int, default=16, help="verifier.evaluate's batches per task and K")
    p.add_argument("--controller-task", default="CartPole-v1")
    p.add_argument("--cma-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--runs", default="runs/verifier_transfer")
    p.add_argument("--out", default="experiments/results/verifier_transfer.json")
    p.add_argument("--report-only", action="store_true", help="the table from the stored seeds, nothing trained")
    p.add_argument("--doc", default="docs/RESULTS.md")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    for t in args.tasks:
        if t not in envs.names():
            p.error(f"--tasks: unknown environment {t!r}; known: {', '.join(envs.names())}")
        space = envs.spec(t).action_space
        if space.kind != "discrete" or space.n > ACTIONS:
            p.error(f"--tasks: {t} has {space.kind} actions ({space.n or space.shape}); this experiment pools "
                    f"discrete tasks of at most {ACTIONS} actions")
    if args.controller_task not in args.tasks:
        p.error(f"--controller-task {args.controller_task} must be one of --tasks")
    if args.rows < 2 * get_preset(args.preset).verifier.seq_len:
        p.error(f"--rows {args.rows} is too few for K's windows")
    out = Path(args.out)
    if args.report_only:
        stored = json.loads(out.read_text())
        results, args.tasks, command = stored["seeds"], stored["tasks"], stored["command"]
    else:
        results = [run_seed(args, s) for s in args.seeds]
        command = "python " + " ".join(sys.argv if argv is None else ["experiments/verifier_transfer.py"] + argv)
    record = {"what": "one verifier across environments (experiments/verifier_transfer.py)",
              "command": command,
              "preset": args.preset, "machine": stages.cpu_name(), "tasks": args.tasks, "seeds": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir.write_json(out, record)
    text = table(results, args.tasks)
    results_doc.write(out.with_suffix(".md"), text)
    if Path(args.doc).exists():
        results_doc.update_block(Path(args.doc), text, BEGIN, END)
    print(text)


if __name__ == "__main__":
    main()
