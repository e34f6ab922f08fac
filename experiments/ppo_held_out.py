"""Model-free PPO on the held-out seeds, beside the default main job, compared as distributions.

    python experiments/ppo_held_out.py --obs state --seeds 100:116     # PPO's curves -> results/ppo_held_out_state.json
    python experiments/ppo_held_out.py --compare                       # -> results/held_out_vs_ppo.json and its plot

Other seeds and presets name their files: `--seeds 300:316 --tag 300` writes ppo_held_out_state_300.json,
and `--compare --held-out held_out_frugal_seq.json --tag 300` compares it with those runs (the
result file and plot get the tag too).

PPO is experiments/ppo.py (purejaxrl's structure, rl-baselines3-zoo's CartPole settings; from the
4-number state, or from the same 64x64x4 pixels wm_jax sees), every seed in one program, evaluated
with 100 greedy episodes every `--eval-every` training steps: 768 by default, the median spacing of
two real checks of one round in the 16 held-out runs (675 steps) rounded up to 3 PPO updates of 256.
PPO's evaluation episodes are not counted as training steps; wm_jax's checks are. Steps
to a 100-episode mean of 475:
- PPO: the first evaluation at 475 or more; and, as PPO keeps learning and can fall back, the
  evaluation from which every later one stays at 475 or more;
- wm_jax: its training steps when its final 100-episode evaluation reaches 475 (the agent is frozen
  from then on); a seed that does not has not reached 475 within its run.
A seed that never reaches 475 counts as not reached (infinitely many steps), so the comparison is the
fraction of seeds at 475 against real training steps, with 95% bootstrap bands over seeds (rliable,
through wm_jax.report), and the median steps to 475 with its interval. Seeds are never paired across
methods: each method's distribution is over its own runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/ppo.py

import ppo  # noqa: E402
from wm_jax.cli import seeds_arg  # noqa: E402

from wm_jax import plots, report, stages  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLD = 475.0
MILESTONES = (20_000, 50_000, 100_000, 150_000)


def run_ppo(args: argparse.Namespace) -> Path:
    pc = ppo.PPOConfig(obs=args.obs, total_steps=args.total_steps, epochs=args.epochs,
                       minibatches=args.minibatches, eval_every=args.eval_every)
    res = ppo.train(pc, args.seeds)
    out = RESULTS / f"ppo_held_out_{args.obs}{_tag(args)}.json"
    res["command"] = "python experiments/ppo_held_out.py " + " ".join(sys.argv[1:])
    res["machine"] = stages.cpu_name()
    out.write_text(json.dumps(res, indent=1) + "\n")
    for i, s in enumerate(args.seeds):
        print(f"seed {s}: first 475 at {ppo.steps_to(res['curve'], i, THRESHOLD)}, stays from "
              f"{ppo.steps_to_stay(res['curve'], i, THRESHOLD)}, final {res['curve'][-1]['returns'][i]:.1f}")
    print(f"wall {res['wall_s']:.1f} s for {len(args.seeds)} seeds; written: {out}")
    return out


def _tag(args: argparse.Namespace) -> str:
    return f"_{args.tag}" if args.tag else ""


def steps_to_475(held_out: str, tag: str) -> dict[str, tuple[np.ndarray, float]]:
    """{method: (steps to 475 per seed (inf: not reached), the most steps its runs spent)} for wm_jax
    (the `held_out` result file) and each PPO result file with `tag` there is."""
    held = json.loads((RESULTS / held_out).read_text())
    out = {"wm_jax frugal (pixels)": (np.array([r["training_steps"] if r["return_mean"] >= THRESHOLD else np.inf
                                                for r in held["rows"]], np.float64),
                                      max(r["training_steps"] for r in held["rows"]))}
    for obs in ("state", "pixels"):
        path = RESULTS / f"ppo_held_out_{obs}{tag}.json"
        if path.exists():
            res = json.loads(path.read_text())
            for how, fn in (("first", ppo.steps_to), ("stays", ppo.steps_to_stay)):
                at = [fn(res["curve"], i, THRESHOLD) for i in range(len(res["seeds"]))]
                out[f"PPO from {obs}, {how} 475"] = (np.array([np.inf if x is None else x for x in at], np.float64),
                    res["curve"][-1]["real_env_steps"])
    return out


def finite(x: float) -> float | None:
    """x, or None where it is not a number of steps (a median over seeds most of which never reached 475)."""
    return float(x) if np.isfinite(x) else None


def compare(reps: int, held_out: str, tag: str) -> None:
    methods = steps_to_475(held_out, tag)
    top = max(spent for _, spent in methods.values())
    grid = np.unique(np.concatenate([np.linspace(0, top, 200), *(s[np.isfinite(s)] for s, _ in methods.values()),
                                     [spent for _, spent in methods.values()]]))  # every step where a curve moves
    summary, curves = {}, {}
    for name, (steps, spent) in methods.items():
        frac, band = report.bands(lambda idx, s=steps: (s[idx, None] <= grid).mean(0), len(steps), reps)
        beyond = grid > spent  # no run of this method went this far: nothing to draw
        frac, band = np.where(beyond, np.nan, frac), np.where(beyond, np.nan, band)
        with np.errstate(invalid="ignore"):  # a median between a finite count and inf (not reached)
            med, med_ci = report.bands(lambda idx, s=steps: np.array([np.median(s[idx])]), len(steps), reps)
        curves[name] = (frac, band)
        summary[name] = {"seeds": len(steps), "reached": int(np.isfinite(steps).sum()), "most_steps_spent": int(spent),
                         "median_steps": finite(med[0]), "median_ci95": [finite(med_ci[0, 0]), finite(med_ci[1, 0])],
                         **{f"fraction_by_{m}": float((steps <= m).mean()) for m in MILESTONES if m <= spent},
                         "steps": [None if not np.isfinite(x) else int(x) for x in steps]}
        shown, lo, hi = (("not reached" if finite(x) is None else f"{x:,.0f}") for x in (med[0], *med_ci[:, 0]))
        print(f"{name}: {summary[name]['reached']} of {len(steps)} seeds reach 475; median steps {shown} "
              f"[{lo}, {hi}]; " + ", ".join(f"by {m:,}: {summary[name][f'fraction_by_{m}']:.2f}" for m in MILESTONES if m <= spent))
    out = RESULTS / f"held_out_vs_ppo{tag}.json"
    out.write_text(json.dumps({"command": "python experiments/ppo_held_out.py " + " ".join(sys.argv[1:]),
                               "held_out": held_out, "threshold": THRESHOLD,
                               "reported_on": stages.cpu_name(), "methods": summary}, indent=2,
                              allow_nan=False) + "\n")
    image = Path(__file__).resolve().parents[1] / "docs" / "images" / f"held_out_vs_ppo{tag}.png"
    plots.fraction_curves(grid, curves, 20_000, image)
    print(f"written: {out}, {image}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--obs", choices=("state", "pixels"), default="state")
    p.add_argument("--seeds", type=seeds_arg, default=list(range(100, 116)), help="START:STOP (default 100:116)")
    p.add_argument("--total-steps", type=int, default=150_000)
    p.add_argument("--epochs", type=int, default=ppo.PPOConfig.epochs)
    p.add_argument("--minibatches", type=int, default=ppo.PPOConfig.minibatches)
    p.add_argument("--eval-every", type=int, default=768, help="training steps between evaluations")
    p.add_argument("--compare", action="store_true", help="compare the result files there are; train nothing")
    p.add_argument("--reps", type=int, default=10_000, help="bootstrap draws")
    p.add_argument("--held-out", default="held_out_frugal.json", help="--compare: wm_jax's result file in results/")
    p.add_argument("--tag", default="", help="a suffix of PPO's result file (and the comparison's), e.g. 300")
    args = p.parse_args()
    if args.compare:
        compare(args.reps, args.held_out, _tag(args))
    else:
        run_ppo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
