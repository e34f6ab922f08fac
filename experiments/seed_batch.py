"""A batch of seeds (`wm-jax run --seeds`) against the same seeds run one by one: how close each
batched seed stays to its lone run, and what the batch costs against the lone runs' time.

    python experiments/seed_batch.py --seeds 200:208 --lone runs/tuning
        # runs/batch/frugal-s200-207 (resumed if there), compared with runs/tuning/frugal-s200 ...

The batch runs in this process (wm_jax.seeds.run; its stages' seconds come from its stages.json);
each lone run is read from LONE/PRESET-sS (made by experiments/held_out.py; one missing is run
here first). Per seed: both runs' final return, real training steps, agent round and the real
checks of their learning curves, and the first check where the two curves part. The cost: the
batch's seconds of stages against the sum of the lone runs' (compare it only where both ran alone
on the same machine). Written to --out with the command and the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from wm_jax import pipeline, report, seeds, stages
from wm_jax.cli import seeds_arg
from wm_jax.presets import get_preset


def _checks(summary: dict) -> list[tuple[int, float]]:
    return [(p["real_env_steps"], p["real_return"]) for p in summary["learning_curve"] if p["source"] != "evaluate"]


def compare(lone: dict, batched: dict) -> dict:
    """One seed's lone and batched figures, and where their learning curves part (None: they do not)."""
    a, b = _checks(lone), _checks(batched)
    parts = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
    fields = ("real_return_mean", "real_return_min", "real_env_steps_training", "agent_round", "solved", "latent_kl")
    return {"seed": lone["seed"], **{f"lone_{k}": lone[k] for k in fields}, **{f"batch_{k}": batched[k] for k in fields},
            "curve_points": [len(a), len(b)], "curves_part_at": parts,
            "identical": parts is None and all(lone[k] == batched[k] for k in fields if k != "latent_kl"),
            "lone_stage_s": lone["wall_s"]["total"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=seeds_arg, required=True, help="START:STOP (STOP excluded)")
    p.add_argument("--preset", default="frugal")
    p.add_argument("--lone", type=Path, default=Path("runs/held_out"), help="where the lone runs are (PRESET-sS)")
    p.add_argument("--batch", type=Path, default=None, help="the batch's run directory "
                                                            "(default: runs/batch/PRESET-sFIRST-LAST)")
    p.add_argument("--again", type=int, default=None, metavar="SEED",
                   help="after the batch, run this seed alone again in a new directory: its stage seconds in this "
                        "sitting against its earlier lone run's (the lone runs may come from another sitting)")
    p.add_argument("--out", type=Path, default=None,
                   help="the result file (default: experiments/results/seed_batch_PRESET.json)")
    args = p.parse_args(argv)
    s0, s1 = args.seeds[0], args.seeds[-1]
    batch = args.batch or Path("runs/batch") / f"{args.preset}-s{s0}-{s1}"
    out = args.out or Path(__file__).parent / "results" / f"seed_batch_{args.preset}.json"
    for s in args.seeds:
        if not (args.lone / f"{args.preset}-s{s}" / "summary.json").exists():
            pipeline.run(get_preset(args.preset, s), args.lone / f"{args.preset}-s{s}")
            jax.clear_caches()  # else each seed's programs stay mapped: ~10 hit vm.max_map_count
    stages_json = batch / "stages.json"
    finished = stages_json.exists() and "evaluate" in json.loads(stages_json.read_text())
    t0 = time.perf_counter()
    summary = seeds.run(get_preset(args.preset), args.seeds, batch)
    wall = time.perf_counter() - t0
    if finished and out.exists():  # the batch ran before: its process time is the earlier call's
        wall = json.loads(out.read_text()).get("batch_process_wall_s", wall)
    done = json.loads((batch / "stages.json").read_text())
    rows = [compare(json.loads((args.lone / f"{args.preset}-s{s}" / "summary.json").read_text()),
                    json.loads((batch / "seeds" / str(s) / "summary.json").read_text())) for s in args.seeds]
    batch_s, lone_s = sum(r["wall_s"] for r in done.values()), sum(r["lone_stage_s"] for r in rows)
    result = {"what": f"`wm-jax run --preset {args.preset} --seeds {s0}:{s1 + 1}` against each seed's lone run",
              "command": "python experiments/seed_batch.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "reported_on": stages.cpu_name(), "batch": str(batch), "lone": str(args.lone),
              "batch_stage_s": batch_s, "batch_process_wall_s": wall, "lone_stage_s_sum": lone_s,
              "ratio_batch_to_lone_sum": batch_s / lone_s,
              "batch_stage_s_by_stage": {k: r["wall_s"] for k, r in done.items()},
              "identical_seeds": sum(r["identical"] for r in rows), "rows": rows,
              "batch_aggregate": summary["aggregate"],
              "lone_aggregate": report.report([args.lone / f"{args.preset}-s{s}" for s in args.seeds])["aggregate"]}
    if args.again is not None:
        again_dir = batch.parent / f"{args.preset}-s{args.again}-alone-again"
        again = pipeline.run(get_preset(args.preset, args.again), again_dir)
        earlier = json.loads((args.lone / f"{args.preset}-s{args.again}" / "summary.json").read_text())
        result["lone_again"] = {"seed": args.again, "run": str(again_dir), "stage_s": again["wall_s"]["total"],
                                "earlier_stage_s": earlier["wall_s"]["total"],
                                "same_figures": all(again[k] == earlier[k] for k in ("real_return_mean",
                                                    "real_env_steps_training", "agent_round"))}
        print(f"seed {args.again} alone again: {again['wall_s']['total']:.0f} s of stages (earlier "
              f"{earlier['wall_s']['total']:.0f} s), the same figures: {result['lone_again']['same_figures']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"seed {r['seed']}: lone {r['lone_real_return_mean']:.1f} ({r['lone_real_env_steps_training']:,} steps, "
              f"round {r['lone_agent_round']}), batch {r['batch_real_return_mean']:.1f} "
              f"({r['batch_real_env_steps_training']:,}, round {r['batch_agent_round']}); curves part at "
              f"{r['curves_part_at']}")
    print(f"{result['identical_seeds']} of {len(rows)} identical; batch {batch_s:.0f} s of stages, the lone runs "
          f"{lone_s:.0f} s: ratio {batch_s / lone_s:.2f}")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
