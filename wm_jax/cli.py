"""The `wm-jax` command: collect, train-vae, train-transition, run.

Subcommands import the model stack when they run, not at start-up: argument errors come back at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad arguments: reported on one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


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

    from wm_jax import data

    t0 = time.perf_counter()
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
    from wm_jax.config import get_preset, with_compute_dtype

    cfg = get_preset(args.preset, args.seed)
    return cfg if args.precision == "fp32" else with_compute_dtype(cfg, PRECISIONS[args.precision])


def cmd_train_vae(args: argparse.Namespace) -> int:
    import jax

    from wm_jax import data, plots, train, vae

    cfg = _preset(args)
    arrays = data.to_arrays(data.load_dataset(args.data))
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    out = Path(args.out)
    params, info = vae.train(cfg, jax.random.key(cfg.seed), {"frame": arrays["frame"], "stack_rows": index.stack_rows},
                             out)
    plots.reconstruction_grid(*vae.reconstructions(cfg.vae, params, arrays["frame"], index.stack_rows),
                              out / "reconstructions.png")
    plots.loss_curves(train.read_metrics(out), out / "loss.png")
    print(f"VAE trained: {_fmt(info['final']) or 'already finished'} ({info['steps_per_s']:.1f} steps/s); plots in {out}")
    return 0


def cmd_train_transition(args: argparse.Namespace) -> int:
    import jax

    from wm_jax import data, plots, train, transition, vae

    cfg = _preset(args)
    arrays = data.to_arrays(data.load_dataset(args.data))
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    vae_params = vae.load(cfg, Path(args.vae))
    mean, logvar = vae.encode_all(cfg.vae, vae_params, arrays["frame"], index.stack_rows)
    m_arrays = transition.training_arrays(mean, logvar, arrays, index)
    out = Path(args.out)
    _, info = transition.train(cfg, jax.random.key(cfg.seed + 1), m_arrays, out)
    plots.loss_curves(train.read_metrics(out), out / "loss.png")
    print(f"transition trained: {_fmt(info['final']) or 'already finished'} ({info['steps_per_s']:.1f} steps/s); "
          f"plots in {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from wm_jax import pipeline

    cfg = _preset(args)
    if args.rounds is not None:
        cfg = dataclasses.replace(cfg, rounds=dataclasses.replace(cfg.rounds, rounds=args.rounds))
    if args.verifier is not None:
        cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode=args.verifier))
    if args.grounding is not None:
        cfg = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, grounding=args.grounding))
    name = cfg.preset + (f"-s{cfg.seed}" if cfg.seed else "") + ("" if args.precision == "fp32" else f"-{args.precision}")
    name += "" if cfg.verifier.mode == "off" else f"-k{cfg.verifier.mode}"
    name += f"-g{cfg.evolve.grounding:g}" if cfg.evolve.grounding else ""
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wm-jax", description="World Models in JAX on pixel CartPole-v1")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="collect random-policy episodes into a Hugging Face dataset")
    c.add_argument("--episodes", type=_positive_int, default=5000)
    c.add_argument("--seed", type=int, default=123)
    c.add_argument("--max-steps", type=_positive_int, default=500)
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_collect)

    presets = ("smoke", "cpu", "paper")

    def training_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True)
        p.add_argument("--preset", choices=presets, default="cpu")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                       help="compute dtype of V and M (parameters and optimizer state stay float32)")

    v = sub.add_parser("train-vae", help="train V on a dataset")
    v.add_argument("data")
    training_args(v)
    v.set_defaults(fn=cmd_train_vae)

    m = sub.add_parser("train-transition", help="train M on a dataset encoded by a trained V")
    m.add_argument("data")
    m.add_argument("--vae", required=True, help="run directory of train-vae")
    training_args(m)
    m.set_defaults(fn=cmd_train_transition)

    r = sub.add_parser("run", help="the whole recipe: collect, V, M, evolve C in the dream, evaluate")
    r.add_argument("--preset", choices=presets, default="cpu")
    r.add_argument("--out", default=None, help="run directory (default: runs/PRESET[-sSEED][-bf16][-kMODE][-gSHARE])")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="compute dtype of V and M (parameters and optimizer state stay float32)")
    r.add_argument("--rounds", type=_positive_int, default=None, help="iterative rounds (default: the preset's)")
    r.add_argument("--verifier", choices=("off", "weight", "cutoff"), default=None,
                   help="train the verifier K and weight (or cut) the dream reward by its confidence")
    r.add_argument("--grounding", type=_share, default=None, metavar="SHARE",
                   help="share of dreams started from states the controller reached in its latest real check")
    r.set_defaults(fn=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + one error line and exits 2
    from wm_jax.checkpoint import CheckpointError
    from wm_jax.config import ConfigError
    from wm_jax.data import DatasetError
    from wm_jax.pipeline import RunDirError
    from wm_jax.train import TrainingError

    try:
        return args.fn(args)
    except (UsageError, DatasetError, ConfigError, RunDirError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"wm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"wm-jax {args.command}: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"wm-jax {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
