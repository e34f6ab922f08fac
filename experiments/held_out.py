"""The default main job on seeds nobody chose a setting on, reported as a distribution over seeds.

    python experiments/held_out.py --seeds 100:116                 # runs/held_out/frugal-s100 ... s115
    python experiments/held_out.py --seeds 100:116 --report-only   # the report from the runs there

Each seed is `wm-jax run --preset PRESET --seed S` (in this process, through `pipeline.run`); a
finished run directory is read, not rerun, and an unfinished one resumes, so the command can be
stopped and started again. The report, over the seeds whose runs have finished:
- the 100-episode mean return per seed: IQM, median and mean with 95% stratified-bootstrap intervals
  (rliable, the `analysis` extra), and how many seeds reach 475;
- real steps spent on training: median, the largest, how many seeds stay within 20,000;
- the selection gap: the kept agent's last real check (the check that kept it) minus its
  100-episode evaluation, mean and per seed (a positive gap is the winner's curse of a short check);
- the minutes of stages per seed (median and slowest; other jobs beside a run stretch them).
It writes the per-seed rows, the aggregates and the machine (CPU model, AVX-512 or not) to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
from rliable import library as rly
from rliable import metrics

from wm_jax import pipeline
from wm_jax.presets import get_preset

SOLVED = 475.0
STEP_GOAL = 20_000


def machine() -> str:
    """The CPU model, core count and whether it has AVX-512 (or only AVX2), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else ("AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    extra = ", ".join(f for f in ("avx512_bf16", "amx_tile") if f in flags)
    cores = info.count("processor\t:") or "?"
    return f"{model}, {cores} cores, {isa}" + (f" ({extra})" if extra else "")


def kept_check(summary: dict) -> dict | None:
    """The real check that kept the final agent: the best check of the agent's round (the latest
    among equals), with its episodes (8 when a pass was confirmed)."""
    checks = [e for e in summary["learning_curve"]
              if e.get("source") == "check" and e.get("round") == summary["agent_round"]]
    return max(reversed(checks), key=lambda e: e["real_return"]) if checks else None


def row(seed: int, summary: dict) -> dict:
    check = kept_check(summary)
    stages = {k: v for k, v in summary["wall_s"].items() if k != "total"}
    return {"seed": seed, "return_mean": summary["real_return_mean"], "return_min": summary["real_return_min"],
            "solved": summary["real_return_mean"] >= SOLVED, "training_steps": summary["real_env_steps_training"],
            "agent_round": summary["agent_round"], "kept_check": None if check is None else check["real_return"],
            "kept_check_episodes": None if check is None else check["episodes"],
            "selection_gap": None if check is None else check["real_return"] - summary["real_return_mean"],
            "stage_minutes": sum(stages.values()) / 60.0}


def interval(values: np.ndarray, reps: int = 50_000) -> dict:
    """IQM, median and mean of per-seed values with rliable's 95% percentile-bootstrap intervals (one
    task, so the stratified bootstrap resamples seeds). The median is taken over seeds: rliable's
    aggregate_median is the median over tasks of each task's mean, which for one task is the mean."""
    scores = {"x": np.asarray(values, np.float64)[:, None]}
    point, ci = rly.get_interval_estimates(
        scores, lambda s: np.array([metrics.aggregate_iqm(s), np.median(s[:, 0]), np.mean(s[:, 0])]), reps=reps,
        random_state=np.random.RandomState(0))
    return {name: value for i, key in enumerate(("iqm", "median", "mean"))
            for name, value in ((key, float(point["x"][i])),
                                (f"{key}_ci95", [float(ci["x"][0, i]), float(ci["x"][1, i])]))}


def report(rows: list[dict], wanted: int) -> dict:
    returns = np.array([r["return_mean"] for r in rows])
    steps = np.array([r["training_steps"] for r in rows])
    gaps = np.array([r["selection_gap"] for r in rows if r["selection_gap"] is not None])
    minutes = np.array([r["stage_minutes"] for r in rows])
    return {"seeds_finished": len(rows), "seeds_asked": wanted,
            "return": interval(returns), "solved": int((returns >= SOLVED).sum()),
            "training_steps": {**interval(steps), "max": int(steps.max()), "within_goal": int((steps <= STEP_GOAL).sum())},
            "selection_gap": interval(gaps) if gaps.size else {"mean": None},
            "stage_minutes": {"median": float(np.median(minutes)), "max": float(minutes.max())}}


def seeds_arg(text: str) -> list[int]:
    lo, _, hi = text.partition(":")
    seeds = list(range(int(lo), int(hi))) if hi else [int(lo)]
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r} (give START:STOP, STOP excluded)")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=seeds_arg, required=True, help="START:STOP (STOP excluded), or one seed")
    p.add_argument("--preset", default="frugal")
    p.add_argument("--runs", type=Path, default=Path("runs/held_out"), help="where the run directories go")
    p.add_argument("--out", type=Path, default=None, help="the result file (default: experiments/results/"
                                                          "held_out_PRESET.json)")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, start none")
    args = p.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"held_out_{args.preset}.json"
    rows = []
    for seed in args.seeds:
        run = args.runs / f"{args.preset}-s{seed}"
        done = run / "summary.json"
        if not done.exists() and not args.report_only:
            pipeline.run(get_preset(args.preset, seed), run)
        if done.exists():
            rows.append(row(seed, json.loads(done.read_text())))
            r = rows[-1]
            print(f"seed {seed}: {r['return_mean']:.1f} (min {r['return_min']:.0f}), {r['training_steps']:,} steps, "
                  f"kept check {r['kept_check']} over {r['kept_check_episodes']} episodes, "
                  f"{r['stage_minutes']:.1f} min of stages", flush=True)
    if not rows:
        print("no finished runs to report", file=sys.stderr)
        return 1
    result = {"what": f"the `{args.preset}` preset on seeds {args.seeds[0]}-{args.seeds[-1]}, one run each",
              "command": "python experiments/held_out.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "rows": rows, "report": report(rows, len(args.seeds))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["report"], indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
