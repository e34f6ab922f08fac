"""The `wm-jax` command line: its arguments, each checked where it is parsed, and main().

What each subcommand does is in commands.py, imported once the arguments parse: argument errors
come back at once, before JAX loads.
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
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from wm_jax import interrupt, logs

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


def seeds_arg(text: str) -> list[int]:
    """An argparse type for --seeds: START:STOP (STOP excluded) or one seed, each a valid --seed."""
    lo, _, hi = text.partition(":")
    try:
        seeds = list(range(int(lo), int(hi))) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP or one seed, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r} (give START:STOP, STOP excluded)")
    for s in (seeds[0], seeds[-1]):
        _seed(str(s))
    return seeds
_share = _bounded(float, 0.0, 1.0)

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


PRESETS = ("smoke", "cpu", "frugal", "laptop", "paper")  # presets.PRESETS (tests/test_cli.py checks)
TRAINERS = ("cmaes", "ppo")  # config.TRAINERS (tests/test_cli.py checks)
PRECISIONS = ("fp32", "bf16")  # commands.PRECISIONS (tests/test_cli.py checks)
# wm_jax.envs.names(), the built-in tasks (tests/test_cli.py checks); spelled out so that an argument
# error answers before JAX and gymnax load
ENVS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "MountainCarContinuous-v0", "Breakout-MinAtar")


def _training_args(p: argparse.ArgumentParser) -> None:
    """The arguments train-vae and train-transition share."""
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
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
    c.add_argument("--max-steps", type=_positive_int, default=None, help="steps per episode at most (default: the "
                                                                          "task's step limit)")
    c.add_argument("--env", choices=ENVS, default="CartPole-v1", help="the task (docs/ENVIRONMENTS.md)")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")


def _add_stages(sub: Any) -> None:
    """train-vae and train-transition: one stage at a time."""
    v = sub.add_parser("train-vae", help="train V on a dataset")
    v.add_argument("data")
    _training_args(v)

    m = sub.add_parser("train-transition", help="train M on a dataset encoded by a trained V")
    m.add_argument("data")
    m.add_argument("--vae", required=True, help="run directory of train-vae")
    _training_args(m)


def _add_run(sub: Any) -> None:
    """run: the whole recipe."""
    r = sub.add_parser("run", help="the whole recipe: collect, V, M, evolve C in the dream, evaluate")
    r.add_argument("--preset", choices=PRESETS, default="frugal",
                   help="default: frugal, the main job (the stage commands above default to cpu, whose V and M it shares)")
    r.add_argument("--out", default=None,
                   help="run directory (default: runs/PRESET[-ENV][-sSEED][-bf16][-kMODE][-gSHARE][-TRAINER]; ENV "
                        "only for a task other than CartPole-v1)")
    r.add_argument("--env", choices=ENVS, default=None,
                   help="the task (docs/ENVIRONMENTS.md; default: the preset's, CartPole-v1 unless it is a task's own)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--seed", type=_seed, default=0)
    which.add_argument("--seeds", type=seeds_arg, default=None, metavar="START:STOP",
                       help="run these seeds (STOP excluded) as one batch, every stage over all of them at once "
                            "(wm_jax.seeds; the cmaes trainer), into one run directory")
    r.add_argument("--precision", choices=PRECISIONS, default=None,
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
    hosts = r.add_argument_group("several processes (jax.distributed; run the same command in each, docs/ARCHITECTURE.md)")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address, where jax.distributed's coordinator listens")
    hosts.add_argument("--processes", type=_positive_int, default=None, help="how many processes run the command")
    hosts.add_argument("--process-id", type=_bounded(int, 0, 1_000_000, "(a process index)"), default=None,
                       help="this process's index, 0 to PROCESSES-1; process 0 writes OUT, process i OUT.processI")


def _add_agent_commands(sub: Any) -> None:
    """evaluate, export, video and train-verifier: what a trained agent can do."""
    e = sub.add_parser("evaluate", help="real episodes of a trained agent (a run directory or an exported folder)")
    e.add_argument("agent", help="a `wm-jax run` directory or a folder written by `wm-jax export`")
    e.add_argument("--episodes", type=_positive_int, default=None, help="default: the preset's (100 for cpu)")
    e.add_argument("--seed", type=_seed, default=None,
                   help="use the evaluation key of `wm-jax run --seed SEED` (default: the agent's own seed)")

    x = sub.add_parser("export", help="write the final agent as one portable folder (safetensors + config.json)")
    x.add_argument("run", help="a finished `wm-jax run` directory")
    x.add_argument("--out", required=True, help="the folder to write (replaced if it is an earlier export)")

    vid = sub.add_parser("video", help="an animated GIF: real episode, V's reconstruction and M's dream")
    vid.add_argument("agent", help="a `wm-jax run` directory or a folder written by `wm-jax export`")
    vid.add_argument("--episodes", type=_positive_int, default=1)
    vid.add_argument("--out", default=None, help="the GIF to write (default: AGENT/video.gif; a run's own episode.gif "
                                                 "is left alone)")
    vid.add_argument("--max-steps", type=_positive_int, default=None, help="steps per episode at most (default: the preset's)")
    vid.add_argument("--fps", type=_positive_int, default=25)
    vid.add_argument("--seed", type=_seed, default=None, help="episode seed (default: the agent's)")

    tv = sub.add_parser("train-verifier", help="train the verifier K for a finished run trained without one "
                                               "(RUN/verifier_added; the server's gate uses it)")
    tv.add_argument("run", help="a finished `wm-jax run` directory")
    tv.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the preset's)")
    tv.add_argument("--quiet", action="store_true", help="no progress bar")


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

    def store(text: str) -> str:  # the same rule as serve.check_url, which cannot load before the parse
        from urllib.parse import urlsplit

        parts = urlsplit(text)
        if text == "memory":
            return text
        try:
            port = parts.port
        except ValueError:
            port = 0
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or port == 0 \
                or not (parts.path.strip("/") or "0").isdigit():
            raise argparse.ArgumentTypeError(f"must be 'memory' or redis://HOST:PORT/DB (port in [1, 65535], "
                                             f"DB a number), got {text!r}")
        return text

    def replicas(text: str) -> tuple[int, int]:
        low, _, high = text.partition(":")
        try:
            pair = (int(low), int(high or low))
        except ValueError:
            pair = (0, 0)
        if not 1 <= pair[0] <= pair[1] <= 64:
            raise argparse.ArgumentTypeError(f"must be MIN:MAX replicas with 1 <= MIN <= MAX <= 64, got {text!r}")
        return pair

    s.add_argument("--sessions", type=store, default="memory",
                   help="where sessions live: memory (this process, the default) or redis://HOST:PORT/DB (shared "
                        "by every replica; survives a restart)")
    s.add_argument("--session-ttl", type=_bounded(float, 1.0, 30 * 86400.0, "s"), default=3600.0,
                   help="seconds, in [1, 2,592,000], an idle session lives (default 3600)")
    s.add_argument("--replicas", type=replicas, default=None, metavar="MIN:MAX",
                   help="serve with Ray Serve: MIN to MAX replicas, autoscaled on ongoing requests (needs "
                        "--sessions redis://... and the scale extra)")


def _add_report(sub: Any) -> None:
    """report: many seeds' run directories as a distribution."""
    r = sub.add_parser("report", help="runs of one recipe on many seeds as a distribution (needs the analysis extra)")
    r.add_argument("runs", nargs="+", help="run directories, or folders of them (each subfolder with a summary.json)")
    r.add_argument("--against", nargs="+", default=None, metavar="RUN",
                   help="another recipe's runs: both reported, then P(the first scores above the second) and "
                        "P(it spends fewer training steps), seeds never paired; --plots adds the performance profile")
    r.add_argument("--names", nargs=2, default=None, metavar=("FIRST", "SECOND"),
                   help="what to call the two groups of --against (default: their first paths)")
    r.add_argument("--json", default=None, help="write the rows and aggregates to this JSON file")
    r.add_argument("--plots", default=None, help="draw learning_curves.png and solved_fraction.png in this folder")
    r.add_argument("--reps", type=_bounded(int, 100, 1_000_000, "bootstrap draws"), default=10_000,
                   help="bootstrap draws for the 95%% intervals (default 10,000; the plots' bands use at most 2,000)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wm-jax", description="World Models in JAX on pixel environments (CartPole-v1 and others)",
                epilog="exit codes: 0 done, 1 training failed, 2 bad input or damaged files, 3 cannot write, "
                       "4 run directory in use, 130 interrupted, 143 terminated")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also WM_JAX_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_collect, _add_stages, _add_run, _add_agent_commands, _add_report, _add_serve):
        add(sub)
    return p

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


def _distributed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`run --coordinator --processes --process-id`: join jax.distributed before any JAX computation
    (wm_jax.sharding then splits work over every process's devices)."""
    given = [getattr(args, k, None) for k in ("coordinator", "processes", "process_id")]
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        parser.error("--coordinator, --processes and --process-id go together")
    if args.process_id >= args.processes:
        parser.error(f"--process-id must be below --processes={args.processes}, got {args.process_id}")
    import jax  # after the arguments parse, as every JAX import of the CLI

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes: gloo's collectives
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                                   process_id=args.process_id, initialization_timeout=120)
    except Exception as e:  # noqa: BLE001  jax raises several types; one line either way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        parser.exit(2, f"wm-jax run: cannot join jax.distributed through {args.coordinator} as process "
                       f"{args.process_id} of {args.processes} ({first})\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + one error line and exits 2
    debug = args.debug or os.environ.get("WM_JAX_DEBUG", "") not in ("", "0")
    compilation_cache()
    _distributed(parser, args)
    from wm_jax import commands  # the model stack loads only now

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
                raise commands.UsageError(str(e)) from None
        return commands.COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as e:
        known = commands.failure(e, getattr(args, "out", None))
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
