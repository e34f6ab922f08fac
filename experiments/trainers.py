"""CMA-ES beside PPO in the dream: one table row per finished `wm-jax run` directory.

    for s in 0 1 2; do
      wm-jax run --preset cpu --seed $s                   # runs/cpu, runs/cpu-s1, runs/cpu-s2
      wm-jax run --preset cpu --seed $s --trainer ppo     # runs/cpu-ppo, runs/cpu-s1-ppo, ...
      wm-jax run --preset laptop --seed $s                # runs/laptop, runs/laptop-s1, ...
    done
    python experiments/trainers.py runs/cpu runs/cpu-s1 runs/cpu-s2 runs/cpu-ppo runs/cpu-s1-ppo \\
        runs/cpu-s2-ppo runs/laptop runs/laptop-s1 runs/laptop-s2

Per run: the trainer, the real return over the final 100 episodes, the real env steps spent in
training (random data, later rounds' data, every real check), the imagined steps the controller
searches computed (stages.imagined_steps), the wall time of each stage and the correlation of
dream and real returns at the real checks. Writes experiments/results/trainers.{md,json} and the
table of docs/RESULTS.md between its trainers.py markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import results_doc

from wm_jax import stages
from wm_jax.config import Config

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
BEGIN, END = "<!-- trainers.py: begin -->", "<!-- trainers.py: end -->"


def row(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    done = json.loads((run / "stages.json").read_text())
    done = done.get("done", done)
    wall = s["wall_s"]
    return {
        "preset": s["preset"], "seed": s["seed"], "trainer": cfg.evolve.trainer,
        "controller": f"{cfg.controller.kind}" + (f" {cfg.controller.mlp_hidden}" if cfg.controller.kind == "mlp" else ""),
        "lstm": cfg.transition.hidden, "random_episodes": cfg.data.episodes,
        "return_mean": s["real_return_mean"], "return_std": s["real_return_std"], "return_min": s["real_return_min"],
        "agent_round": s.get("agent_round", 1), "real_env_steps_training": s["real_env_steps_training"],
        "imagined_steps": stages.imagined_steps(cfg, done), "dream_real_corr": s["dream_real_corr"],
        "wall_s": {
            "data": wall.get("collect", 0.0),
            "vae": wall.get("vae", 0.0),
            "m": sum(v for k, v in wall.items() if k.startswith("transition")),
            "search": sum(v for k, v in wall.items() if k.startswith("evolve")),
            "other": sum(v for k, v in wall.items() if k.startswith(("collect_", "encode", "verifier", "evaluate"))),
            "total": wall["total"],
        },
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = ("| preset | trainer (C) | seed | real return mean +- std (min) | agent round | real steps (training) "
              "| imagined steps | dream-real corr | wall: data / V / M / search / other / total |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["wall_s"]
        corr = "n/a" if r["dream_real_corr"] is None else f"{r['dream_real_corr']:.2f}"
        lines.append(
            f"| {r['preset']} (LSTM {r['lstm']}, {r['random_episodes']:,} eps) | {r['trainer']} ({r['controller']}) "
            f"| {r['seed']} | {r['return_mean']:.1f} +- {r['return_std']:.1f} ({r['return_min']:.0f}) "
            f"| {r['agent_round']} | {r['real_env_steps_training']:,} | {r['imagined_steps'] / 1e6:.1f} M | {corr} "
            f"| {w['data']:.0f} / {w['vae']:.0f} / {w['m']:.0f} / {w['search']:.0f} / {w['other']:.0f} / "
            f"{w['total']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished `wm-jax run` directories")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the document whose table to replace")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.runs if not (r / "summary.json").exists()]
    if missing:
        print(f"not finished runs (no summary.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [row(r) for r in a.runs]
    md = table(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    results_doc.write(a.out / "trainers.json", json.dumps(rows, indent=1))
    results_doc.write(a.out / "trainers.md", md)
    print(md)
    print(f"wrote {a.out}/trainers.{{md,json}}")
    if results_doc.update_block(a.results_md, md, BEGIN, END):
        print(f"updated the table in {a.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
