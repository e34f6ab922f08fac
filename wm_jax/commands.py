"""What each `wm-jax` subcommand does, and which failures are expected (cli.py parses the arguments
first and imports this module only then, so an argument error comes back before JAX loads).

Every expected failure becomes one line on stderr and an exit code (`failure`); cli.py lists the codes.
"""

from __future__ import annotations

import argparse
from typing import Any
import dataclasses
import errno
import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np

from wm_jax import interrupt, pipeline, plots, report, run_dir, seeds, video
from wm_jax.agent import Agent, evaluation_key
from wm_jax.config import ConfigError
from wm_jax import envs
from wm_jax.models import train, transition, vae
from wm_jax.models.train import TrainingError
from wm_jax.presets import get_preset, with_compute_dtype, with_env, with_trainer
from wm_jax.pretrained import PretrainedError
from wm_jax.run_dir import RunDirBusy, RunDirError
from wm_jax.store import collection, data
from wm_jax.store.checkpoint import CheckpointError
from wm_jax.store.collection import TooLarge
from wm_jax.store.data import DatasetError

try:  # the serve extra (FastAPI, uvicorn) is optional
    from wm_jax import serve
except ImportError as missing:
    serve, SERVE_MISSING = None, missing.name
else:
    SERVE_MISSING = None

EXIT_TRAINING, EXIT_INPUT, EXIT_WRITE, EXIT_BUSY = 1, 2, 3, 4  # a signal: 128 + its number (130, 143)
# OSErrors that mean "this location cannot be written", whatever the file
WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
# OSErrors that mean "this path is not one that can be used": the argument is at fault (exit 2)
PATH_ERRNOS = {errno.ENAMETOOLONG: "choose a shorter path", errno.ENOTDIR: "a part of the path is a file; choose another path",
               errno.EISDIR: "it is a directory; remove it or choose another path",
               errno.EEXIST: "remove it or choose another path", errno.ELOOP: "the path loops through symbolic links",
               errno.ENOENT: "check the path"}


class UsageError(Exception):
    """Bad arguments: reported on one line, exit code 2."""


def _fresh_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"{path} exists and is not empty (pass --overwrite to replace it)")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def cmd_collect(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _fresh_dir(out, args.overwrite)

    t0 = time.perf_counter()
    env = getattr(args, "env", data.DEFAULT_ENV)
    limit = envs.spec(env).max_steps
    steps = limit if args.max_steps is None else args.max_steps
    collection.check_memory(args.episodes, steps, collection.task_random_policy(env), env=env)  # the GiB first
    if steps > limit:
        raise UsageError(f"--max-steps must be at most {limit} ({env}'s step limit), got {steps}")
    with interrupt.deferred():  # Ctrl-C and SIGTERM between collection chunks
        ds = collection.collect(jax.random.key(args.seed), args.episodes, max_steps=steps, env=env)
    data.save_dataset(ds, out, overwrite=args.overwrite, env=env)
    seconds = time.perf_counter() - t0
    episode = ds.data.column("episode").to_numpy()
    lengths = np.bincount(episode - int(episode.min()))
    print(
        f"collected {args.episodes} {env} episodes, {ds.num_rows} steps, mean length {lengths.mean():.1f}, "
        f"{_dir_size_mb(out):.1f} MB on disk in {out}, {seconds:.1f} s"
    )
    return 0


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def preset(args: argparse.Namespace):
    """The config the arguments name: --preset, --seed and --precision."""
    cfg = get_preset(args.preset, args.seed)
    return cfg if args.precision is None else with_compute_dtype(cfg, PRECISIONS[args.precision])


def cmd_train_vae(args: argparse.Namespace) -> int:
    cfg = preset(args)
    arrays = data.to_arrays(data.load_dataset(args.data))
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    out = Path(args.out)
    with run_dir.locked(out), interrupt.deferred():
        params, info = vae.train(cfg, jax.random.key(cfg.seed),
                                 {"frame": arrays["frame"], "stack_rows": index.stack_rows}, out)
    plots.reconstruction_grid(*vae.reconstructions(cfg.vae, params, arrays["frame"], index.stack_rows),
                              out / "reconstructions.png")
    plots.loss_curves(train.read_metrics(out), out / "loss.png")
    print(f"VAE trained: {_fmt(info['final']) or 'already finished'} ({info['steps_per_s']:.1f} steps/s); plots in {out}")
    return 0


def cmd_train_transition(args: argparse.Namespace) -> int:
    cfg = preset(args)
    arrays = data.to_arrays(data.load_dataset(args.data))
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    vae_params = vae.load(cfg, Path(args.vae))
    mean, logvar = vae.encode_all(cfg.vae, vae_params, arrays["frame"], index.stack_rows)
    m_arrays = transition.training_arrays(mean, logvar, arrays, index)
    out = Path(args.out)
    with run_dir.locked(out), interrupt.deferred():
        _, info = transition.train(cfg, jax.random.fold_in(jax.random.key(cfg.seed), 1), m_arrays, out)
    plots.loss_curves(train.read_metrics(out), out / "loss.png")
    print(f"transition trained: {_fmt(info['final']) or 'already finished'} ({info['steps_per_s']:.1f} steps/s); "
          f"plots in {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = base = preset(args)
    if args.rounds is not None:
        # the rounds that always run (frugal: 2) cannot outnumber the rounds asked for
        cfg = dataclasses.replace(cfg, rounds=dataclasses.replace(
            cfg.rounds, rounds=args.rounds, min_rounds=min(cfg.rounds.min_rounds, args.rounds)))
    if args.verifier is not None:
        cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode=args.verifier))
    if args.grounding is not None:
        cfg = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, grounding=args.grounding))
    if getattr(args, "env", None) is not None:
        cfg = with_env(cfg, args.env)
    if args.trainer is not None:
        cfg = with_trainer(cfg, args.trainer)
    # the default directory names what differs from the preset (and a task other than CartPole's)
    name = cfg.preset + ("" if cfg.env == data.DEFAULT_ENV else f"-{cfg.env}")
    batch = getattr(args, "seeds", None)
    name += (f"-seeds{batch[0]}-{batch[-1]}" if batch else f"-s{cfg.seed}" if cfg.seed else "")
    name += "" if args.precision is None else f"-{args.precision}"
    name += "" if cfg.verifier.mode == base.verifier.mode else f"-k{cfg.verifier.mode}"
    name += "" if cfg.evolve.grounding == base.evolve.grounding else f"-g{cfg.evolve.grounding:g}"
    name += "" if cfg.evolve.trainer == base.evolve.trainer else f"-{cfg.evolve.trainer}"
    out = Path(args.out) if args.out else Path("runs") / name
    if batch:
        return _run_seeds(cfg, batch, out)
    summary = pipeline.run(cfg, out)
    print()
    print(f"{'preset':<26}{summary['preset']}")
    for key in ("seed", "real_return_mean", "real_return_std", "real_return_min", "real_episodes", "solved",
                "real_env_steps", "dream_real_corr", "latent_kl"):
        value = summary[key]
        print(f"{key:<26}{value:.3f}" if isinstance(value, float) else f"{key:<26}{value}")
    for stage, seconds in summary["wall_s"].items():
        print(f"{'wall_s/' + stage:<26}{seconds:.1f}")
    print(f"{'device':<26}{summary['device']}")
    out = run_dir.for_process(out)  # where this process wrote (several processes: docs/PERFORMANCE.md)
    print(f"\nresults: {out / 'summary.json'} (plots, checkpoints and metrics in {out}/)")
    return 0


def _run_seeds(cfg: Any, batch: list[int], out: Path) -> int:
    summary = seeds.run(cfg, batch, out)
    out = run_dir.for_process(out)  # where this process wrote
    print()
    if summary["aggregate"] is not None:
        print(report.text({"rows": summary["per_seed"], "aggregate": summary["aggregate"]}))
    else:
        for r in summary["per_seed"]:
            print(f"seed {r['seed']:<6} return {r['return_mean']:7.1f} +- {r['return_std']:5.1f}  solved "
                  f"{r['solved']}  training steps {r['training_steps']:,}")
    stages = sum(summary["wall_s"].values())
    print(f"\n{len(batch)} seeds in {stages:.1f} s of stages on {summary['device']}")
    print(f"results: {out / 'summary.json'}, each seed's in {out / 'seeds'}/ (wm-jax report {out})")
    return 0


def _agent(path: str):
    if not Path(path).is_dir():
        raise UsageError(f"{path}: no such folder (give a `wm-jax run` directory or an exported agent)")
    return Agent.open(path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    agent = _agent(args.agent)
    seed = agent.cfg.seed if args.seed is None else args.seed
    ev = agent.evaluate(args.episodes, evaluation_key(seed))
    report = {k: ev[k] for k in ("return_mean", "return_std", "return_min", "episodes", "env_steps", "latent_kl")}
    report["key"] = f"the evaluation key of `wm-jax run --seed {seed}`"
    print(json.dumps(report, indent=2))
    return 0


def _compare(args: argparse.Namespace, first: dict[str, Any]) -> int:
    """wm-jax report RUNS --against RUNS: both reports, then the two distributions against each other."""
    names = args.names or [args.runs[0], args.against[0]]
    if names[0] == names[1]:
        raise UsageError(f"--names: the two groups need two names, not {names[0]!r} twice")
    second = report.report(args.against, reps=args.reps)
    print(f"\n--- {names[1]}\n{report.text(second)}\n")
    comp = report.compare(first, second, reps=args.reps)
    print(report.comparison_text(names, comp))
    if args.json:
        report.write({"names": names, names[0]: first, names[1]: second, "comparison": comp}, args.json)
        print(f"written: {args.json}")
    if args.plots:
        reps = min(args.reps, report.CURVE_REPS)
        print("drawn: " + ", ".join(map(str, report.profiles(dict(zip(names, (first, second))), args.plots, reps))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.names and not args.against:
        raise UsageError("--names names the two groups of --against; give --against RUNS too")
    result = report.report(args.runs, reps=args.reps)
    print(report.text(result))
    if args.against:
        return _compare(args, result)
    if args.json:
        report.write(result, args.json)
        print(f"written: {args.json}")
    if args.plots:
        print("drawn: " + ", ".join(map(str, report.draw(result, args.plots, min(args.reps, report.CURVE_REPS)))))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    agent = _agent(args.run)
    out = agent.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"exported to {out} ({size:.1f} MB: model.safetensors, config.json, README.md); "
          f"load it with Agent.from_pretrained({str(out)!r})")
    return 0


def cmd_video(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.agent) / "video.gif"
    if out.suffix.lower() != ".gif":
        raise UsageError(f"--out {out}: the video is an animated GIF, name it *.gif")
    if not 1 <= args.fps <= video.MAX_FPS:
        raise UsageError(f"--fps must be in 1..{video.MAX_FPS} (GIF viewers slow faster frames down), got {args.fps}")
    agent = _agent(args.agent)
    limit = envs.spec(agent.cfg.env).max_steps
    if args.max_steps is not None and args.max_steps > limit:  # each step's frames are held until written
        raise UsageError(f"--max-steps must be at most {limit} steps ({agent.cfg.env} ends every episode by then), "
                         f"got {args.max_steps}")
    key = jax.random.fold_in(evaluation_key(agent.cfg.seed if args.seed is None else args.seed), 1000)
    frames = video.record(agent.cfg, {**agent.params, "verifier": agent.verifier}, key, args.episodes, args.max_steps)
    count = video.write(out, frames, fps=args.fps)
    print(f"{out}: {count} frames, {args.episodes} episode(s), {out.stat().st_size / 1e6:.1f} MB")
    return 0


def cmd_train_verifier(args: argparse.Namespace) -> int:
    if not Path(args.run).is_dir():
        raise UsageError(f"{args.run}: no such run directory")
    record = pipeline.train_verifier(args.run, args.steps, progress=not args.quiet)
    final = record.get("final") or {}
    done = f"({_fmt(final)})" if final else "(its checkpoint was already there: nothing left to train)"
    print(f"{Path(args.run) / run_dir.ADDED_VERIFIER}: K trained for {record['steps']} steps {done}; "
          f"`wm-jax serve {args.run}` gates with it")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if serve is None:
        raise UsageError(f"serving needs the serve extra ({SERVE_MISSING} is missing): pip install -e '.[serve]'")
    replicas, sessions = getattr(args, "replicas", None), getattr(args, "sessions", "memory")
    ttl = getattr(args, "session_ttl", 3600.0)
    if replicas is not None and sessions == "memory":
        raise UsageError("--replicas needs --sessions redis://HOST:PORT/DB: every replica must reach every session")
    try:
        settings = serve.Settings(precision="int8" if args.int8 else "float32", gate=args.gate,
                                  lookahead=args.lookahead, threshold=args.threshold, safe_action=args.safe_action,
                                  max_sessions=args.max_sessions, batch_window_ms=args.batch_window_ms)
        serve.check_port(args.port)
        if sessions != "memory":
            serve.check_url(sessions)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not Path(args.run).is_dir():
        raise UsageError(f"{args.run}: no such run directory or agent folder")
    # a damaged run, or settings whose memory this machine lacks (collection.TooLarge), fail here in one
    # line, before anything is compiled and before the server starts
    model = serve.Model.load(args.run, settings)
    where = f"{replicas[0]} to {replicas[1]} Ray Serve replicas" if replicas else "one process"
    print(f"serving {args.run} ({settings.precision}, gate {model.gate}"
          f"{'' if model.has_verifier else ': no verifier, run `wm-jax train-verifier` for one'}; {where}, "
          f"sessions in {serve.redis_sessions.shown(sessions)}) on http://{args.host}:{args.port}", flush=True)
    try:
        if replicas is not None:  # Ray Serve handles the signals; its run returns once they stopped it
            serve.scale.run(str(Path(args.run).resolve()), settings, sessions, ttl, replicas, host=args.host,
                            port=args.port)
            print("wm-jax serve: stopped", flush=True)
        else:
            serve.run(serve.create_app(model, sessions=sessions, session_ttl=ttl), host=args.host, port=args.port,
                      log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn shut down, then raised the signal again: a server's normal end
        print("wm-jax serve: stopped", flush=True)
    except serve.scale.ScaleError as e:
        raise UsageError(str(e)) from None
    return 0


def _write_error(e: OSError, out: str | None) -> str:
    where = f" {e.filename}" if e.filename else (f" under {out}" if out else "")
    return f"cannot write{where} ({os.strerror(e.errno)}); free space or choose a writable --out, then rerun to resume"


def _path_error(e: OSError) -> str:
    """A path that cannot be used as given, named, with what to do."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{os.strerror(e.errno)}; {PATH_ERRNOS[e.errno]}"


def _write_error_in_text(e: Exception, out: str | None) -> str | None:
    """orbax/TensorStore (a ValueError) and pyarrow (an OSError without errno) report a failed write
    with the OS reason in the text only."""
    text, where = str(e), f" under {out}" if out else ""
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        if os.strerror(code) in text:
            return f"cannot write{where} ({os.strerror(code)}); free space or choose a writable --out, " \
                   f"then rerun to resume"
    return None


def failure(error: BaseException, out: str | None) -> tuple[int, str] | None:
    """(exit code, the one line) for an expected failure; None for a bug (its traceback is shown)."""
    if isinstance(error, RunDirBusy):
        return EXIT_BUSY, f"error: {error}"
    if isinstance(error, (UsageError, DatasetError, ConfigError, RunDirError, CheckpointError, PretrainedError,
                          TooLarge, report.ReportError)):
        return EXIT_INPUT, f"error: {error}"
    if isinstance(error, TrainingError):
        return EXIT_TRAINING, f"training failed: {error}"
    if isinstance(error, KeyboardInterrupt):
        signum = getattr(error, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
        return 128 + signum, f"{what}; rerun the same command to resume"
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return EXIT_WRITE, f"error: {_write_error(error, out)}"
    if isinstance(error, (FileNotFoundError, FileExistsError, NotADirectoryError)) and error.errno is None:
        return EXIT_INPUT, f"error: {error}"  # raised by wm_jax with its own message
    if isinstance(error, OSError) and error.errno in PATH_ERRNOS:
        return EXIT_INPUT, f"error: {_path_error(error)}"
    if isinstance(error, (OSError, ValueError)):  # pyarrow, orbax: the OS reason in the text only
        message = _write_error_in_text(error, out)
        return None if message is None else (EXIT_WRITE, f"error: {message}")
    return None


# the subcommand cli.py parsed -> what runs it
COMMANDS = {"collect": cmd_collect, "train-vae": cmd_train_vae, "train-transition": cmd_train_transition,
            "run": cmd_run, "evaluate": cmd_evaluate, "export": cmd_export, "video": cmd_video,
            "train-verifier": cmd_train_verifier, "report": cmd_report, "serve": cmd_serve}
