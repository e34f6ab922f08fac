"""Real return against real env steps: wm_jax (from pixels) beside model-free PPO (from the state
and from the same pixels), with the same step accounting, on this machine.

    for s in 0 1 2; do wm-jax run --preset cpu --seed $s; done      # runs/cpu, runs/cpu-s1, runs/cpu-s2
    python experiments/sample_efficiency.py runs/cpu runs/cpu-s1 runs/cpu-s2

Steps counted for training: wm_jax's random data, the data of its later rounds and every real
check (summary.json's learning_curve); PPO's rollouts (experiments/ppo.py). Neither counts the
evaluation episodes: wm_jax's final 100, PPO's 100 greedy episodes after every `eval_every` steps.
Writes experiments/results/sample_efficiency.{png,json,md} and the table of docs/RESULTS.md
(between its sample_efficiency.py markers). PPO's curves are cached in the JSON
(keyed on their config and seeds): `--rerun-ppo` trains them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/ppo.py

import ppo
import results_doc

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
BEGIN, END = "<!-- sample_efficiency.py: begin -->", "<!-- sample_efficiency.py: end -->"
SOLVED = 475.0


def wm_jax_rows(runs: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        if "learning_curve" not in s:
            sys.exit(f"{run}/summary.json has no learning_curve (a run from before it was recorded): run it again")
        checks = [p for p in s["learning_curve"] if p["source"] == "check"]
        first = next((p["real_env_steps"] for p in checks if p["real_return"] >= SOLVED), None)
        rows.append({
            "method": "wm_jax (pixels)", "seed": s["seed"], "run": str(run), "curve": s["learning_curve"],
            "training_steps": s["real_env_steps_training"], "final_return": s["real_return_mean"],
            "final_min": s["real_return_min"],
            # the only 100-episode measure of a wm_jax run is its final evaluation, after all its training steps
            "steps_to_solved": s["real_env_steps_training"] if s["real_return_mean"] >= SOLVED else None,
            "first_check_solved": first, "steps_to_stay": None, "wall_s": s["wall_s"]["total"],
        })
    return rows


def ppo_rows(pc: ppo.PPOConfig, seeds: list[int], cache: dict[str, Any], used: dict[str, Any], rerun: bool
             ) -> list[dict[str, Any]]:
    """PPO's rows, from the cache when it holds this config and these seeds; the curves go to `used`."""
    obs = pc.obs
    key = json.dumps({"config": dataclasses.asdict(pc), "seeds": seeds}, sort_keys=True)
    res = cache.get(key)
    if res is None or rerun:
        res = ppo.train(pc, seeds)
    used[key] = res
    rows = []
    for i, seed in enumerate(seeds):
        rows.append({
            "method": f"PPO ({obs})", "seed": seed,
            "curve": [{"real_env_steps": p["real_env_steps"], "real_return": p["returns"][i]} for p in res["curve"]],
            "training_steps": res["curve"][-1]["real_env_steps"], "final_return": res["curve"][-1]["returns"][i],
            "final_min": res["curve"][-1]["mins"][i], "steps_to_solved": ppo.steps_to(res["curve"], i, SOLVED),
            "first_check_solved": None, "steps_to_stay": ppo.steps_to_stay(res["curve"], i, SOLVED),
            "wall_s": res["wall_s"], "wall_note": f"all {len(seeds)} seeds in one program",
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [("| method | seed | real steps to reach 475 (100-episode mean) | stays >= 475 from | real steps for training "
            "| final return (min) | wall |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "not reached" if r["steps_to_solved"] is None else f"{r['steps_to_solved']:,}"
        if r["first_check_solved"] is not None:
            reach += f" (first check >= 475 at {r['first_check_solved']:,})"
        wall = f"{r['wall_s'] / 60:.1f} min" + (f" ({r['wall_note']})" if "wall_note" in r else "")
        stay = "the agent is frozen" if r["method"].startswith("wm_jax") else (
            "not by the end" if r["steps_to_stay"] is None else f"{r['steps_to_stay']:,}")
        out.append(f"| {r['method']} | {r['seed']} | {reach} | {stay} | {r['training_steps']:,} "
                   f"| {r['final_return']:.1f} ({r['final_min']:.0f}) | {wall} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"wm_jax (pixels)": "tab:blue", "PPO (state)": "tab:green", "PPO (pixels)": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labelled = set()
    for r in rows:
        c = colors.get(r["method"], "gray")
        label = None if r["method"] in labelled else r["method"]
        labelled.add(r["method"])
        if r["method"].startswith("wm_jax"):
            pts = [p for p in r["curve"] if p["source"] != "evaluate" and p["real_return"] is not None]
            ax.plot([p["real_env_steps"] for p in pts], [p["real_return"] for p in pts], "-o", color=c, ms=3,
                    alpha=0.7, label=label)
            final = r["curve"][-1]
            ax.plot([final["real_env_steps"]], [final["real_return"]], "*", color=c, ms=12, mec="black")
        else:
            ax.plot([p["real_env_steps"] for p in r["curve"]], [p["real_return"] for p in r["curve"]], "-", color=c,
                    alpha=0.7, label=label)
    ax.axhline(SOLVED, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("real env steps used for training")
    ax.set_ylabel("real return")
    ax.set_title("CartPole-v1: wm_jax (checks: dots; final 100 episodes: star) vs model-free PPO (100 greedy "
                 "episodes)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def update_block(path: Path, table: str) -> bool:
    """Replace the table between BEGIN and END in `path` (docs/RESULTS.md); False if it has none."""
    return results_doc.update_block(path, table, BEGIN, END)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished `wm-jax run` directories")
    p.add_argument("--ppo-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ppo-state-steps", type=int, default=150_000)
    p.add_argument("--ppo-state-eval-every", type=int, default=2_048, help="env steps between evaluations")
    p.add_argument("--ppo-pixel-eval-every", type=int, default=10_240,
                   help="env steps between evaluations (100 pixel episodes cost about 6 s per seed here)")
    p.add_argument("--ppo-pixel-steps", type=int, default=100_000)
    # from pixels, a 20-epoch update takes 2.7 s on this 2-core CPU (the CNN's gradients); 4 epochs
    # of 4 minibatches (purejaxrl's default) 0.6 s
    p.add_argument("--ppo-pixel-epochs", type=int, default=4)
    p.add_argument("--ppo-pixel-minibatches", type=int, default=4)
    p.add_argument("--rerun-ppo", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the document whose table to replace")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cache_path = a.out / "sample_efficiency.json"
    cache = json.loads(cache_path.read_text()).get("ppo_cache", {}) if cache_path.exists() else {}
    rows, used = wm_jax_rows(a.runs), {}
    rows += ppo_rows(ppo.PPOConfig(obs="state", total_steps=a.ppo_state_steps, eval_every=a.ppo_state_eval_every),
                     a.ppo_seeds, cache, used, a.rerun_ppo)
    rows += ppo_rows(ppo.PPOConfig(obs="pixels", total_steps=a.ppo_pixel_steps, epochs=a.ppo_pixel_epochs,
                                   minibatches=a.ppo_pixel_minibatches, eval_every=a.ppo_pixel_eval_every),
                     a.ppo_seeds, cache, used, a.rerun_ppo)
    # written before the figures, so that PPO's curves are kept even if drawing fails
    results_doc.write(a.out / "sample_efficiency.json", json.dumps({"rows": rows, "ppo_cache": used}, indent=1))
    md = table(rows)
    results_doc.write(a.out / "sample_efficiency.md", md)
    plot(rows, a.out / "sample_efficiency.png")
    print(md)
    print(f"wrote {a.out}/sample_efficiency.{{png,json,md}}")
    if update_block(a.results_md, md):
        print(f"updated the table in {a.results_md}")
    else:
        print(f"{a.results_md} has no {BEGIN} ... {END} block: its table was left alone")


if __name__ == "__main__":
    main()
