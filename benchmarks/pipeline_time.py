"""Wall seconds per stage of `wm-jax run`, read from each run directory's summary.json.

    python benchmarks/pipeline_time.py RUN_DIR [RUN_DIR ...] [--json PATH]

Prints one markdown table: a row per stage (in the order the pipeline ran them) and a column per
run, the total last, with each run's preset, device and final real return underneath. A run that
has not finished shows the stages it finished (from stages.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run_dir: Path) -> dict:
    """The run's summary; for an unfinished run, the stages finished so far (stages.json)."""
    path, stages = run_dir / "summary.json", run_dir / "stages.json"
    if not path.exists() and stages.exists():
        wall = {name: stage["wall_s"] for name, stage in json.loads(stages.read_text()).items()}
        return {"wall_s": {**wall, "total": sum(wall.values())}, "preset": "(unfinished)"}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no summary (is the run finished?)")
    summary = json.loads(path.read_text())
    if not isinstance(summary.get("wall_s"), dict):
        raise ValueError(f"{path}: no wall_s table of stage times")
    return summary


def table(names: list[str], summaries: list[dict]) -> str:
    stages: list[str] = []
    for s in summaries:
        stages += [k for k in s["wall_s"] if k != "total" and k not in stages]
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for stage in [*stages, "total"]:
        cells = [f"{s['wall_s'][stage]:.1f}" if stage in s["wall_s"] else "-" for s in summaries]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for label, key in (("preset", "preset"), ("device", "device"), ("real return (mean)", "real_return_mean")):
        cells = [f"{s[key]:.1f}" if isinstance(s.get(key), float) else str(s.get(key, "-")) for s in summaries]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write {run: wall_s} as JSON")
    args = p.parse_args(argv)
    try:
        summaries = [load(r) for r in args.runs]
    except (OSError, ValueError) as e:
        print(f"pipeline_time: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    names = [str(r) for r in args.runs]
    print("Wall seconds per stage of `wm-jax run`\n")
    print(table(names, summaries))
    result = {name: {"wall_s": s["wall_s"], "preset": s.get("preset"), "device": s.get("device"),
                     "real_return_mean": s.get("real_return_mean")} for name, s in zip(names, summaries)}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
