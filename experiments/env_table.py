"""The recipe on the tasks other than CartPole-v1: one run per task and seed, and a table of them.

    python experiments/env_table.py --seeds 1:4                  # runs/envs/TASK-s1 ... s3, every task
    python experiments/env_table.py --seeds 1:4 --report-only    # the table from the runs there
    python experiments/env_table.py --tasks Acrobot-v1 --seeds 0 # one task, one seed
    python experiments/env_table.py --tasks Pendulum-v1 --seeds 1:4 --trainer ppo --runs runs/envs-ppo  # C by PPO
    # docs/ENVIRONMENTS.md's table: frugal, one round, 100 random episodes, V and M 1,000 steps each
    python experiments/env_table.py --seeds 1:4 --rounds 1 --episodes 100 --vae-steps 1000 --m-steps 1000

Each run is `wm-jax run --preset PRESET --env TASK --seed S [--rounds R] [--trainer T] --out RUNS/TASK-sS`
(in this process, through `pipeline.run`), with --episodes, --vae-steps and --m-steps, where given,
replacing the preset's random episodes and V's and M's training steps; a finished run directory is read, not
rerun, and an unfinished one resumes, so the command can be stopped and started again. Runs go seed
by seed (every task of seed 1, then of seed 2, ...). A run directory made with another config than
the command's is an error, not a row. Per run, the table holds:
- the evaluation's return (summary.json: mean, std and min over its `real_episodes` episodes) against
  the task's solved threshold (docs/ENVIRONMENTS.md; none for Pendulum-v1 and Breakout-MinAtar), and
  summary.json's `solved` (null where the task has no threshold);
- the real environment steps spent on training (random data, the rounds' data, the real checks; the
  evaluation's steps are not counted) and the wall minutes of the run's stages (summary.json's
  wall_s total; other jobs beside a run stretch them);
- what the data showed the model, per round's dataset: episodes, steps, and how many episodes ended
  by termination (Acrobot, MountainCar: the goal; MountainCarContinuous: the flag; Breakout: the
  ball missed) and how many earned any positive reward (MountainCarContinuous: the flag's +100;
  Breakout: a brick), with the mean and best episode return;
- the learning curve's real checks (round, generation, the checked controller's dream return, its real
  return over how many episodes) and summary.json's dream_real_corr over them.
It writes the rows, the machine (CPU model, AVX-512 or not) and the exact command to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import datasets
import jax
import numpy as np

from wm_jax import envs, pipeline, stages
from wm_jax.cli import seeds_arg
from wm_jax.config import TRAINERS
from wm_jax.presets import get_preset, with_env, with_trainer
from wm_jax.store import data

TASKS = ("Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0", "Breakout-MinAtar")


def dataset_stats(path: Path) -> dict:
    """What one saved dataset holds, per episode: its length, whether it ended by termination, whether
    any step paid a positive reward, and its return (the sum of its rewards; an episode cut by a
    round's step cap counts what it collected)."""
    ds = datasets.load_from_disk(str(path))
    episode, reward, done = (data.column(ds, name) for name in ("episode", "reward", "done"))
    ids, first = np.unique(episode, return_index=True)
    returns = np.add.reduceat(reward.astype(np.float64), first)
    ended = np.logical_or.reduceat(done, first)
    paid = np.logical_or.reduceat(reward > 0, first)
    return {"dataset": path.name, "episodes": int(ids.size), "steps": int(episode.size),
            "terminated": int(ended.sum()), "positive_reward": int(paid.sum()),
            "return_mean": float(returns.mean()), "return_max": float(returns.max())}


def checks(summary: dict) -> list[dict]:
    """The learning curve's real checks: round, generation, the checked controller's dream return (the
    search's score, over evolve.horizon dream steps) and real return, and the check's episodes."""
    return [{"round": e["round"], "generation": e.get("generation"), "dream_return": e.get("dream_return"),
             "real_return": e["real_return"], "episodes": e["episodes"]}
            for e in summary["learning_curve"] if e.get("source") == "check"]


def row(task: str, seed: int, run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    threshold = envs.spec(task).solved_threshold
    rounds = sorted((run / "data").glob("round*"), key=lambda p: int(p.name[len("round"):]))
    cfg = json.loads((run / "config.json").read_text())
    return {"task": task, "seed": seed, "return_mean": summary["real_return_mean"],
            "return_std": summary["real_return_std"], "return_min": summary["real_return_min"],
            "episodes": summary["real_episodes"], "threshold": threshold, "solved": summary["solved"],
            "training_steps": summary["real_env_steps_training"], "agent_round": summary["agent_round"],
            "wall_minutes": summary["wall_s"]["total"] / 60.0, "dream_horizon": cfg["evolve"]["horizon"],
            "generations": cfg["evolve"]["generations"],
            "dream_real_corr": summary["dream_real_corr"],
            "data": [dataset_stats(p) for p in rounds], "checks": checks(summary)}


def show(r: dict) -> str:
    mark = "no threshold" if r["threshold"] is None else f"threshold {r['threshold']:g}: solved={r['solved']}"
    random = r["data"][0] if r["data"] else None
    seen = ("" if random is None else f"; random data: {random['terminated']}/{random['episodes']} episodes "
            f"terminated, {random['positive_reward']} with a positive reward")
    return (f"{r['task']} seed {r['seed']}: {r['return_mean']:.1f} +- {r['return_std']:.1f} (min "
            f"{r['return_min']:.1f}) over {r['episodes']} episodes, {mark}; {r['training_steps']:,} training "
            f"steps, agent of round {r['agent_round']}, {r['wall_minutes']:.1f} min{seen}")


def aggregate(rows: list[dict]) -> dict:
    """Per task: the seeds' mean returns, their mean and std across seeds, and how many seeds solved."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        means = np.array([r["return_mean"] for r in mine])
        out[task] = {"seeds": [r["seed"] for r in mine], "return_means": means.tolist(),
                     "mean_of_means": float(means.mean()), "std_of_means": float(means.std()),
                     "threshold": mine[0]["threshold"],
                     "solved": None if mine[0]["threshold"] is None else sum(bool(r["solved"]) for r in mine),
                     "training_steps": [r["training_steps"] for r in mine],
                     "wall_minutes": [round(r["wall_minutes"], 2) for r in mine]}
    return out


def config(preset: str, task: str, seed: int, args: argparse.Namespace):
    """The run's config: `wm-jax run --preset PRESET --env TASK --seed S [--rounds R]` (as cmd_run
    builds it), with --episodes, --vae-steps and --m-steps, where given, replacing the preset's random
    episodes and V's and M's training steps."""
    cfg = get_preset(preset, seed)
    if args.rounds is not None:  # as `wm-jax run --rounds`: the rounds that always run cannot outnumber them
        cfg = dataclasses.replace(cfg, rounds=dataclasses.replace(
            cfg.rounds, rounds=args.rounds, min_rounds=min(cfg.rounds.min_rounds, args.rounds)))
    if args.episodes is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, episodes=args.episodes))
    if args.vae_steps is not None:
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(
            cfg.vae, train=dataclasses.replace(cfg.vae.train, steps=args.vae_steps)))
    if args.m_steps is not None:
        cfg = dataclasses.replace(cfg, transition=dataclasses.replace(
            cfg.transition, train=dataclasses.replace(cfg.transition.train, steps=args.m_steps)))
    cfg = with_env(cfg, task)
    return cfg if args.trainer is None else with_trainer(cfg, args.trainer)


def markdown(rows: list[dict]) -> str:
    """The rows as docs/ENVIRONMENTS.md's table: one line per run."""
    lines = ["| task | seed | return mean +- std (min) | episodes | solved at | solved | training steps | "
             "random data: episodes terminated / with a reward > 0 | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        random = r["data"][0]
        mark = "none" if r["threshold"] is None else f"{r['threshold']:g}"
        solved = "-" if r["solved"] is None else ("yes" if r["solved"] else "no")
        lines.append(f"| {r['task']} | {r['seed']} | {r['return_mean']:.1f} +- {r['return_std']:.1f} "
                     f"({r['return_min']:.1f}) | {r['episodes']} | {mark} | {solved} | {r['training_steps']:,} | "
                     f"{random['terminated']}/{random['episodes']} / {random['positive_reward']}/{random['episodes']} | "
                     f"{r['wall_minutes']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=seeds_arg, required=True, help="START:STOP (STOP excluded), or one seed")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: {','.join(TASKS)})")
    p.add_argument("--preset", default="frugal")
    p.add_argument("--rounds", type=int, default=None, help="as `wm-jax run --rounds` (default: the preset's)")
    p.add_argument("--trainer", choices=TRAINERS, default=None, help="as `wm-jax run --trainer` (default: the "
                                                                         "preset's, CMA-ES)")
    p.add_argument("--episodes", type=int, default=None, help="random episodes of round 1 (default: the preset's)")
    p.add_argument("--vae-steps", type=int, default=None, help="V's training steps (default: the preset's)")
    p.add_argument("--m-steps", type=int, default=None, help="M's training steps (default: the preset's)")
    p.add_argument("--runs", type=Path, default=Path("runs/envs"), help="where the run directories go")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "env_table.json",
                   help="the result file")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, start none")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    for task in tasks:
        envs.spec(task)  # an unknown name stops here, before any run
    rows = []
    # seed by seed, every task for each: a stopped command leaves every task with as many seeds as it could
    for seed in args.seeds:
        for task in tasks:
            run = args.runs / f"{task}-s{seed}"
            cfg = config(args.preset, task, seed, args)
            if (run / "config.json").exists():
                made = json.loads((run / "config.json").read_text())
                made.pop("format_version", None)
                if json.loads(cfg.to_json()) != made:
                    print(f"{run} was made with another config than this command's", file=sys.stderr)
                    return 2
            done = run / "summary.json"
            if not done.exists() and not args.report_only:
                print(f"running {task} seed {seed} -> {run}", flush=True)
                pipeline.run(cfg, run)
                jax.clear_caches()  # else each run's programs stay mapped: ~10 hit vm.max_map_count
            if done.exists():
                rows.append(row(task, seed, run))
                print(show(rows[-1]), flush=True)
            else:
                print(f"{task} seed {seed}: no finished run in {run}", flush=True)
    if not rows:
        print("no finished runs to report", file=sys.stderr)
        return 1
    rows.sort(key=lambda r: (tasks.index(r["task"]), r["seed"]))
    changed = {k: v for k, v in (("rounds", args.rounds), ("evolve.trainer", args.trainer), ("data.episodes", args.episodes),
                                  ("vae.train.steps", args.vae_steps), ("transition.train.steps", args.m_steps))
               if v is not None}
    result = {"what": f"the `{args.preset}` preset" + (f" with {changed}" if changed else "")
                      + f" on {', '.join(tasks)}, seeds {args.seeds[0]}-{args.seeds[-1]}, one run each",
              "command": "python experiments/env_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "preset": args.preset, "changed_from_preset": changed,
              "machine": stages.cpu_name(), "runs_asked": len(tasks) * len(args.seeds), "runs_finished": len(rows),
              "per_task": aggregate(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["per_task"], indent=2))
    print(markdown(rows))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
