"""Markdown table of finished `wm-jax run` directories (the seed tables of docs/RESULTS.md).

    for s in 0 1 2; do wm-jax run --seed $s; done      # runs/frugal, runs/frugal-s1, runs/frugal-s2
    python experiments/summarize_runs.py runs/frugal runs/frugal-s1 runs/frugal-s2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    corr = "n/a" if s["dream_real_corr"] is None else f"{s['dream_real_corr']:.2f}"
    return (
        f"| {s['seed']} | {s['real_return_mean']:.1f} +- {s['real_return_std']:.1f} ({s['real_return_min']:.0f}) "
        f"| {'yes' if s['solved'] else 'no'} | {s.get('agent_round', 1)} "
        f"| {s['real_env_steps_training']:,} / {s['real_env_steps']:,} | {corr} | {s['latent_kl']:.2f} "
        f"| {s['wall_s']['total'] / 60:.1f} min |"
    )


def main() -> None:
    runs = [Path(p) for p in sys.argv[1:]]
    if not runs:
        sys.exit("usage: summarize_runs.py RUN_DIR [RUN_DIR ...]")
    print("| seed | real return mean +- std (min) | solved (>= 475) | agent from round "
          "| real env steps: training / total | dream-real corr | latent KL | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(row(run))


if __name__ == "__main__":
    main()
