"""The `wm-jax` command: collect, train-vae, train-transition, run, evaluate, export, video.

Subcommands import the model stack when they run, not at start-up: argument errors come back at once.
Every expected failure is one line on stderr and an exit code (`--debug` or WM_JAX_DEBUG=1 shows
the traceback instead):

    0    done
    1    training failed (persistent non-finite updates)
    2    bad arguments or input: a usage error, a config value, a damaged or mismatched dataset,
         checkpoint or run directory (the line names the file and what to do)
    3    the output cannot be written: read-only file system, disk full, no permission
    4    the run directory is in use by another wm-jax process (the line names its PID)
    130  interrupted (Ctrl-C, honoured at the next chunk boundary); the same command resumes
    143  terminated (SIGTERM, honoured like Ctrl-C); the same command resumes (`serve`: its normal end, 0)
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def _bounded(kind: type, low: float, high: float, what: str = "", closed_high: bool = True, shown: str = ""):
    """An argparse type: a number of `kind` (int or float) in [low, high] (or [low, high) with
    closed_high False; `shown` writes the range), `what` naming its unit; NaN is refused (it fails
    every comparison), and so is an infinity past a finite bound. One line, exit 2, before anything
    loads."""
    unit = f" {what}" if what else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not (low <= value <= high if closed_high else low <= value < high):
            bound = f"in {shown}" if shown else (f"> {low - 1:g}" if high == float("inf")
                                                 else f"in [{low:g}, {high:g}{']' if closed_high else ')'}")
            raise argparse.ArgumentTypeError(f"must be {bound}{unit}, got {text}")
        return value

    return parse


_positive_int = _bounded(int, 1, float("inf"))
_seed = _bounded(int, 0, 2**32, "(jax.random.key keeps 32 bits)", closed_high=False, shown="[0, 2**32)")
_share = _bounded(float, 0.0, 1.0)


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
    import jax
    import numpy as np

    from wm_jax import interrupt
    from wm_jax.store import data

    t0 = time.perf_counter()
    with interrupt.deferred():  # Ctrl-C and SIGTERM between collection chunks
        ds = data.collect(jax.random.key(args.seed), args.episodes, max_steps=args.max_steps)
    data.save_dataset(ds, out, overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    episode = ds.data.column("episode").to_numpy()
    lengths = np.bincount(episode - int(episode.min()))
    print(
        f"collected {args.episodes} episodes, {ds.num_rows} steps, mean length {lengths.mean():.1f}, "
        f"{_dir_size_mb(out):.1f} MB on disk in {out}, {seconds:.1f} s"
    )
    return 0


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def _preset(args: argparse.Namespace):
    from wm_jax.presets import get_preset, with_compute_dtype

    cfg = get_preset(args.preset, args.seed)
    return cfg if args.precision is None else with_compute_dtype(cfg, PRECISIONS[args.precision])


def cmd_train_vae(args: argparse.Namespace) -> int:
    import jax

    from wm_jax import interrupt, plots, run_dir
    from wm_jax.models import train, vae
    from wm_jax.store import data

    cfg = _preset(args)
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
    import jax

    from wm_jax import interrupt, plots, run_dir
    from wm_jax.models import train, transition, vae
    from wm_jax.store import data

    cfg = _preset(args)
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
    import dataclasses

    from wm_jax import pipeline
    from wm_jax.presets import with_trainer

    cfg = preset = _preset(args)
    if args.rounds is not None:
        # the rounds that always run (frugal: 2) cannot outnumber the rounds asked for
        cfg = dataclasses.replace(cfg, rounds=dataclasses.replace(
            cfg.rounds, rounds=args.rounds, min_rounds=min(cfg.rounds.min_rounds, args.rounds)))
    if args.verifier is not None:
        cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode=args.verifier))
    if args.grounding is not None:
        cfg = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, grounding=args.grounding))
    if args.trainer is not None:
        cfg = with_trainer(cfg, args.trainer)
    # the default directory names what differs from the preset
    name = cfg.preset + (f"-s{cfg.seed}" if cfg.seed else "") + ("" if args.precision is None else f"-{args.precision}")
    name += "" if cfg.verifier.mode == preset.verifier.mode else f"-k{cfg.verifier.mode}"
    name += "" if cfg.evolve.grounding == preset.evolve.grounding else f"-g{cfg.evolve.grounding:g}"
    name += "" if cfg.evolve.trainer == preset.evolve.trainer else f"-{cfg.evolve.trainer}"
    out = Path(args.out) if args.out else Path("runs") / name
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
    print(f"\nresults: {out / 'summary.json'} (plots, checkpoints and metrics in {out}/)")
    return 0


def _agent(path: str):
    from wm_jax.agent import Agent

    if not Path(path).is_dir():
        raise UsageError(f"{path}: no such folder (give a `wm-jax run` directory or an exported agent)")
    return Agent.open(path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    agent = _agent(args.agent)
    seed = agent.cfg.seed if args.seed is None else args.seed
    from wm_jax.agent import evaluation_key

    ev = agent.evaluate(args.episodes, evaluation_key(seed))
    report = {k: ev[k] for k in ("return_mean", "return_std", "return_min", "episodes", "env_steps", "latent_kl")}
    report["key"] = f"the evaluation key of `wm-jax run --seed {seed}`"
    print(json.dumps(report, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    agent = _agent(args.run)
    out = agent.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"exported to {out} ({size:.1f} MB: model.safetensors, config.json, README.md); "
          f"load it with Agent.from_pretrained({str(out)!r})")
    return 0


def cmd_video(args: argparse.Namespace) -> int:
    import jax

    from wm_jax import video
    from wm_jax.agent import evaluation_key

    out = Path(args.out) if args.out else Path(args.agent) / "video.gif"
    if out.suffix.lower() != ".gif":
        raise UsageError(f"--out {out}: the video is an animated GIF, name it *.gif")
    if not 1 <= args.fps <= video.MAX_FPS:
        raise UsageError(f"--fps must be in 1..{video.MAX_FPS} (GIF viewers slow faster frames down), got {args.fps}")
    from wm_jax.env import PixelCartPole

    limit = int(PixelCartPole().default_params.max_steps_in_episode)
    if args.max_steps is not None and args.max_steps > limit:  # each step's frames are held until written
        raise UsageError(f"--max-steps must be at most {limit} steps (the environment ends every episode by then), "
                         f"got {args.max_steps}")
    agent = _agent(args.agent)
    key = jax.random.fold_in(evaluation_key(agent.cfg.seed if args.seed is None else args.seed), 1000)
    frames = video.record(agent.cfg, {**agent.params, "verifier": agent.verifier}, key, args.episodes, args.max_steps)
    count = video.write(out, frames, fps=args.fps)
    print(f"{out}: {count} frames, {args.episodes} episode(s), {out.stat().st_size / 1e6:.1f} MB")
    return 0


def cmd_train_verifier(args: argparse.Namespace) -> int:
    from wm_jax import pipeline, run_dir

    if not Path(args.run).is_dir():
        raise UsageError(f"{args.run}: no such run directory")
    record = pipeline.train_verifier(args.run, args.steps, progress=not args.quiet)
    final = record.get("final") or {}
    done = f"({_fmt(final)})" if final else "(its checkpoint was already there: nothing left to train)"
    print(f"{Path(args.run) / run_dir.ADDED_VERIFIER}: K trained for {record['steps']} steps {done}; "
          f"`wm-jax serve {args.run}` gates with it")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from wm_jax import serve
    except ImportError as e:
        raise UsageError(f"serving needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    try:
        settings = serve.Settings(precision="int8" if args.int8 else "float32", gate=args.gate,
                                  lookahead=args.lookahead, threshold=args.threshold, safe_action=args.safe_action,
                                  max_sessions=args.max_sessions, batch_window_ms=args.batch_window_ms)
        serve.check_port(args.port)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not Path(args.run).is_dir():
        raise UsageError(f"{args.run}: no such run directory or agent folder")
    # a damaged run, or settings whose memory this machine lacks (data.TooLarge), fail here in one
    # line, before anything is compiled and before the server starts
    model = serve.Model.load(args.run, settings)
    print(f"serving {args.run} ({settings.precision}, gate {model.gate}"
          f"{'' if model.has_verifier else ': no verifier, run `wm-jax train-verifier` for one'}) "
          f"on http://{args.host}:{args.port}", flush=True)
    try:
        serve.run(serve.create_app(model), host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn shut down, then raised the signal again: a server's normal end
        print("wm-jax serve: stopped", flush=True)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


PRESETS = ("smoke", "cpu", "frugal", "laptop", "paper")  # presets.PRESETS (tests/test_cli.py checks)
TRAINERS = ("cmaes", "ppo")  # config.TRAINERS (tests/test_cli.py checks)


def _training_args(p: argparse.ArgumentParser) -> None:
    """The arguments train-vae and train-transition share."""
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="compute dtype of V and M (default: the preset's; parameters and optimizer state stay float32)")
    _log_arg(p)


def _log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", choices=("jsonl", "tensorboard"), default="jsonl",
                   help="metrics.jsonl always; tensorboard also writes event files (STAGE/tensorboard/; "
                        "needs the tensorboard extra)")


def _add_collect(sub: Any) -> None:
    """collect: random-policy episodes into a dataset."""
    c = sub.add_parser("collect", help="collect random-policy episodes into a Hugging Face dataset")
    c.add_argument("--episodes", type=_positive_int, default=5000)
    c.add_argument("--seed", type=_seed, default=123)
    c.add_argument("--max-steps", type=_positive_int, default=500)
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_collect)


def _add_stages(sub: Any) -> None:
    """train-vae and train-transition: one stage at a time."""
    v = sub.add_parser("train-vae", help="train V on a dataset")
    v.add_argument("data")
    _training_args(v)
    v.set_defaults(fn=cmd_train_vae)

    m = sub.add_parser("train-transition", help="train M on a dataset encoded by a trained V")
    m.add_argument("data")
    m.add_argument("--vae", required=True, help="run directory of train-vae")
    _training_args(m)
    m.set_defaults(fn=cmd_train_transition)


def _add_run(sub: Any) -> None:
    """run: the whole recipe."""
    r = sub.add_parser("run", help="the whole recipe: collect, V, M, evolve C in the dream, evaluate")
    r.add_argument("--preset", choices=PRESETS, default="frugal",
                   help="default: frugal, the main job (the stage commands above default to cpu, whose V and M it shares)")
    r.add_argument("--out", default=None, help="run directory (default: runs/PRESET[-sSEED][-bf16][-kMODE][-gSHARE][-TRAINER])")
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="compute dtype of V and M (default: the preset's; parameters and optimizer state stay float32)")
    r.add_argument("--rounds", type=_positive_int, default=None, help="iterative rounds (default: the preset's)")
    r.add_argument("--verifier", choices=("off", "weight", "cutoff"), default=None,
                   help="train the verifier K and weight (or cut) the dream reward by its confidence")
    r.add_argument("--grounding", type=_share, default=None, metavar="SHARE",
                   help="share of dreams started from states the controller reached in its latest real check")
    r.add_argument("--trainer", choices=TRAINERS, default=None,
                   help="how C is searched in the dream: cmaes (Ha's linear controller) or ppo (an actor with one "
                        "tanh layer of 64); default: the preset's")
    _log_arg(r)
    r.set_defaults(fn=cmd_run)


def _add_agent_commands(sub: Any) -> None:
    """evaluate, export, video and train-verifier: what a trained agent can do."""
    e = sub.add_parser("evaluate", help="real episodes of a trained agent (a run directory or an exported folder)")
    e.add_argument("agent", help="a `wm-jax run` directory or a folder written by `wm-jax export`")
    e.add_argument("--episodes", type=_positive_int, default=None, help="default: the preset's (100 for cpu)")
    e.add_argument("--seed", type=_seed, default=None,
                   help="use the evaluation key of `wm-jax run --seed SEED` (default: the agent's own seed)")
    e.set_defaults(fn=cmd_evaluate)

    x = sub.add_parser("export", help="write the final agent as one portable folder (safetensors + config.json)")
    x.add_argument("run", help="a finished `wm-jax run` directory")
    x.add_argument("--out", required=True, help="the folder to write (replaced if it is an earlier export)")
    x.set_defaults(fn=cmd_export)

    vid = sub.add_parser("video", help="an animated GIF: real episode, V's reconstruction and M's dream")
    vid.add_argument("agent", help="a `wm-jax run` directory or a folder written by `wm-jax export`")
    vid.add_argument("--episodes", type=_positive_int, default=1)
    vid.add_argument("--out", default=None, help="the GIF to write (default: AGENT/video.gif; a run's own episode.gif "
                                                 "is left alone)")
    vid.add_argument("--max-steps", type=_positive_int, default=None, help="steps per episode at most (default: the preset's)")
    vid.add_argument("--fps", type=_positive_int, default=25)
    vid.add_argument("--seed", type=_seed, default=None, help="episode seed (default: the agent's)")
    vid.set_defaults(fn=cmd_video)

    tv = sub.add_parser("train-verifier", help="train the verifier K for a finished run trained without one "
                                               "(RUN/verifier_added; the server's gate uses it)")
    tv.add_argument("run", help="a finished `wm-jax run` directory")
    tv.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the preset's)")
    tv.add_argument("--quiet", action="store_true", help="no progress bar")
    tv.set_defaults(fn=cmd_train_verifier)


def _add_serve(sub: Any) -> None:
    """serve: the HTTP server; every setting in range, with its unit, before anything loads."""
    s = sub.add_parser("serve", help="serve a trained agent over HTTP (needs the serve extra)")
    s.add_argument("run", help="a `wm-jax run` directory or a folder written by `wm-jax export`")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_bounded(int, 1, 65535, "(a TCP port)"), default=8000)
    s.add_argument("--int8", action="store_true", help="V and M quantized to INT8 after training")
    s.add_argument("--gate", choices=("off", "observe", "enforce"), default="observe",
                   help="the verifier's look-ahead: off; observe (reported with each action); enforce "
                        "(an unverified step answers --safe-action, or 409 without one)")
    s.add_argument("--lookahead", type=_bounded(int, 1, 10_000, "imagined steps"), default=10,
                   help="imagined steps the gate scores (at most 10,000, and what this machine's memory holds)")
    s.add_argument("--threshold", type=_bounded(float, 0.0, 1.0, "(K's mean confidence)"), default=0.5,
                   help="K's mean confidence, in [0, 1], a step needs to be verified")
    s.add_argument("--safe-action", type=int, default=None, choices=(0, 1))
    s.add_argument("--max-sessions", type=_positive_int, default=1024)
    s.add_argument("--batch-window-ms", type=_bounded(float, 0.0, 1000.0, "ms"), default=0.0,
                   help="how long, in [0, 1000] ms, a batch waits for more /act requests (default 0: a batch "
                        "is whatever queued while the previous one ran)")
    s.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(fn=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wm-jax", description="World Models in JAX on pixel CartPole-v1",
                epilog="exit codes: 0 done, 1 training failed, 2 bad input or damaged files, 3 cannot write, "
                       "4 run directory in use, 130 interrupted, 143 terminated")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also WM_JAX_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_collect, _add_stages, _add_run, _add_agent_commands, _add_serve):
        add(sub)
    return p


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


def compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache for this process: compiled XLA programs are kept
    on disk and a later command that builds the same program loads it instead of compiling (a
    `cpu` run compiles for about 45 s; another seed or a resumed run skips most of it). Where:
    $WM_JAX_COMPILATION_CACHE, or $XDG_CACHE_HOME/wm_jax/jax (default ~/.cache/wm_jax/jax); "off"
    turns it off. A cache that cannot be written only costs the compile time (JAX warns)."""
    where = os.environ.get("WM_JAX_COMPILATION_CACHE", "")
    if where.lower() in ("off", "0", "none"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(where) if where else Path(base) / "wm_jax" / "jax"
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the large programs, not every op
    return path


def failure(error: BaseException, out: str | None) -> tuple[int, str] | None:
    """(exit code, the one line) for an expected failure; None for a bug (its traceback is shown)."""
    from wm_jax.store.checkpoint import CheckpointError
    from wm_jax.config import ConfigError
    from wm_jax.store.data import DatasetError, TooLarge
    from wm_jax.pretrained import PretrainedError
    from wm_jax.run_dir import RunDirBusy, RunDirError
    from wm_jax.models.train import TrainingError

    if isinstance(error, RunDirBusy):
        return EXIT_BUSY, f"error: {error}"
    if isinstance(error, (UsageError, DatasetError, ConfigError, RunDirError, CheckpointError, PretrainedError,
                          TooLarge)):
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + one error line and exits 2
    debug = args.debug or os.environ.get("WM_JAX_DEBUG", "") not in ("", "0")
    compilation_cache()
    from wm_jax import interrupt, logs

    # SIGTERM stops a command as Ctrl-C does (one line, resumable; long jobs at their next chunk
    # boundary through interrupt.deferred). `serve` hands both signals to uvicorn, which shuts down.
    takes_sigterm = (threading.current_thread() is threading.main_thread()
                     and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if takes_sigterm:
        signal.signal(signal.SIGTERM, interrupt.raise_at_once)
    try:
        if getattr(args, "log", "jsonl") == "tensorboard":
            try:
                logs.use("tensorboard")
            except ValueError as e:
                raise UsageError(str(e)) from None
        return args.fn(args)
    except (Exception, KeyboardInterrupt) as e:
        known = failure(e, getattr(args, "out", None))
        if known is None or debug:
            raise
        print(f"wm-jax {args.command}: {known[1]}", file=sys.stderr)
        return known[0]
    finally:
        logs.close()  # the writers belong to this command, not to whatever the process does next
        if takes_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def console() -> None:
    """The `wm-jax` console script: main(), then, after a failure, an exit that skips interpreter
    teardown, where orbax's read tasks abandoned by a failed restore print dozens of 'Exception
    ignored in <coroutine>' tracebacks after the one line that says what went wrong. Every file
    is already closed and synced by then (saves are synchronous)."""
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
