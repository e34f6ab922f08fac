"""Finished runs carried on from one round's search with other settings: a screen for a change to the
later rounds that spends no compute on what it leaves alone.

    python experiments/fork.py --runs runs/tuning --seeds 200:208 --at 2 \\
        --set rounds.horizon=300 --forks runs/fork-h300 --out experiments/results/fork_h300.json

Each seed's run directory (PRESET-sSEED under --runs, finished) is copied to --forks with every stage
before round AT's search: round 1's collection, V, and rounds 1..AT-1 whole, and round AT's collection,
encoding, M and K. Its config.json gets the --set fields (dotted names, JSON values), and the run
finishes from round AT's search through `pipeline.run`, as `wm-jax run` would resume it. A fork is
therefore the run the changed config makes, provided the change does not touch what came before round
AT's search (the script refuses fields it knows feed earlier stages: data, vae, transition, verifier,
seed, env; rounds.* and evolve.* changes act from the round they apply to, so check that an evolve.*
change also holds for round 1 before reading a fork at AT > 1 as a new preset's run). With no --set, a
fork reproduces its run (the same machine's arithmetic). The report is `wm-jax report` over the forks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax

from wm_jax import pipeline, report, run_dir, stages
from wm_jax.cli import seeds_arg
from wm_jax.config import Config

EARLIER = ("data", "vae", "transition", "verifier", "seed", "env", "preset")


def kept(name: str, at: int) -> bool:
    """A stage of the run before round `at`'s search."""
    if name in ("collect", "vae"):
        return True
    if name == "evaluate":
        return False
    kind, _, r = name.rpartition("_round")
    r = int(r) if kind else 1  # "transition", "encode_round1", "verifier" are round 1's
    kind = kind or name
    return r < at or (r == at and kind != "evolve")


def forked_config(cfg: Config, sets: list[str]) -> Config:
    d = cfg.to_dict()
    for item in sets:
        field, _, value = item.partition("=")
        path = field.split(".")
        if path[0] in EARLIER:
            raise SystemExit(f"fork: --set {field} changes a stage before the fork; run the seeds afresh")
        node = d
        for part in path[:-1]:
            node = node[part]
        if path[-1] not in node:
            raise SystemExit(f"fork: the config has no field {field}")
        node[path[-1]] = json.loads(value)
    return Config.from_dict(d)


def fork(src: Path, dst: Path, at: int, sets: list[str]) -> Config:
    """dst: src's stages before round `at`'s search, with the config changed by `sets`."""
    cfg = forked_config(run_dir.read_config(src), sets)
    done = run_dir.read_stages(src)
    keep = {k: v for k, v in done.items() if kept(k, at)}
    dst.mkdir(parents=True)
    for name, rec in keep.items():  # each kept stage's folder and outputs (data/roundR, latents_roundR.npz)
        for path in {name, *rec.get("outputs", {})}:
            if (src / path).is_dir() and not (dst / path).exists():
                shutil.copytree(src / path, dst / path)
            elif (src / path).is_file():
                (dst / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / path, dst / path)
    run_dir.write_config(dst, cfg)
    run_dir.write_json(dst / "stages.json", keep)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the finished runs (PRESET-sSEED directories)")
    p.add_argument("--seeds", type=seeds_arg, required=True, help="START:STOP (STOP excluded), or one seed")
    p.add_argument("--preset", default="frugal")
    p.add_argument("--at", type=int, default=2, help="the round whose search the forks redo (and all after it)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a config field, e.g. "
                                                                                      "rounds.horizon=300")
    p.add_argument("--forks", type=Path, required=True, help="where the forked run directories go")
    p.add_argument("--out", type=Path, required=True, help="the result file")
    args = p.parse_args(argv)
    runs = []
    for seed in args.seeds:
        src, dst = args.runs / f"{args.preset}-s{seed}", args.forks / f"{args.preset}-s{seed}"
        if not (dst / "summary.json").exists():
            if not (src / "summary.json").exists():
                raise SystemExit(f"fork: {src} is not a finished run")
            cfg = fork(src, dst, args.at, args.set) if not dst.exists() else run_dir.read_config(dst)
            pipeline.run(cfg, dst)
            jax.clear_caches()  # else each seed's programs stay mapped: ~10 hit vm.max_map_count
        runs.append(dst)
    result = report.report(runs)
    print(report.text(result))
    report.write({"what": f"the runs of {args.runs} (seeds {args.seeds[0]}-{args.seeds[-1]}) carried on from round "
                          f"{args.at}'s search with {args.set or 'no change'}",
                  "command": "python experiments/fork.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "reported_on": stages.cpu_name(), **result}, args.out)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
