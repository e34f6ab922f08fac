"""The default main job on seeds nobody chose a setting on, reported as a distribution over seeds.

    python experiments/held_out.py --seeds 100:116                 # runs/held_out/frugal-s100 ... s115
    python experiments/held_out.py --seeds 100:116 --report-only   # the report from the runs there

Each seed is `wm-jax run --preset PRESET --seed S` (in this process, through `pipeline.run`); a
finished run directory is read, not rerun, and an unfinished one resumes, so the command can be
stopped and started again. The report is `wm-jax report` over the finished runs (wm_jax.report: the
per-seed rows; IQM, median and mean with 95% bootstrap intervals; the seeds solved; the training
steps; the selection gap; the minutes of stages), written to --out with the command and this
machine's CPU, and its plots to --plots. Needs the `analysis` extra (rliable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from wm_jax import pipeline, report, stages
from wm_jax.cli import seeds_arg
from wm_jax.presets import get_preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=seeds_arg, required=True, help="START:STOP (STOP excluded), or one seed")
    p.add_argument("--preset", default="frugal")
    p.add_argument("--runs", type=Path, default=Path("runs/held_out"), help="where the run directories go")
    p.add_argument("--out", type=Path, default=None, help="the result file (default: experiments/results/"
                                                          "held_out_PRESET.json)")
    p.add_argument("--plots", type=Path, default=None, help="where to draw the report's plots (default: none)")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, start none")
    args = p.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"held_out_{args.preset}.json"
    runs = []
    for seed in args.seeds:
        run = args.runs / f"{args.preset}-s{seed}"
        if not (run / "summary.json").exists() and not args.report_only:
            pipeline.run(get_preset(args.preset, seed), run)
            jax.clear_caches()  # else each seed's programs stay mapped: ~10 hit vm.max_map_count
        if (run / "summary.json").exists():
            runs.append(run)
    if not runs:
        print("no finished runs to report", file=sys.stderr)
        return 1
    result = report.report(runs)
    print(report.text(result))
    report.write({"what": f"the `{args.preset}` preset on seeds {args.seeds[0]}-{args.seeds[-1]}, one run each "
                          f"({len(runs)} of {len(args.seeds)} finished)",
                  "command": "python experiments/held_out.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "reported_on": stages.cpu_name(), **result}, out)
    if args.plots:
        print("drawn: " + ", ".join(map(str, report.draw(result, args.plots))))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
