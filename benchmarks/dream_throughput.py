"""Dream throughput: imagined steps per second of the library's population scorer.

    python benchmarks/dream_throughput.py                        # the platform's default sizes
    python benchmarks/dream_throughput.py --sizes 64x16,1024x256 --modes bf16 --head mdn
    python benchmarks/dream_throughput.py --quick                # tiny sizes, one repeat (CI)
    python benchmarks/dream_throughput.py --compare-torch        # + benchmarks/torch_dream.py, same run

Times `wm_jax.search.dream.score_population` itself (one jitted call vmaps `_dream` over rollouts and the
population). A population of P candidates with R rollouts each runs P x R dreams of --horizon
steps; one step of one dream is C's action, one LSTM step of M, a latent sample and the reward and
done heads, so steps/s = P * R * horizon / seconds. M has the default TransitionConfig sizes (LSTM
256, latent 64) and random parameters: throughput does not depend on training, and the dream's
`lax.scan` always runs all horizon steps (steps after the done head fires are masked, not
skipped), so the work does not depend on the parameters either.

Modes: fp32-highest (float32 under jax.default_matmul_precision("highest")), fp32 (float32 at the
backend's default matmul precision; on CPU the two are the same), bf16 (M computing in bfloat16,
TransitionConfig.compute_dtype). The first call (compile and one run) is reported apart; the
steady state is the median of --repeats calls, each waited for with block_until_ready.

--compare-torch runs the same dream as a batched PyTorch eager loop (benchmarks/torch_dream.py,
fp32 and bf16 autocast; needs the `torch` extra) after each size, in the same process, and prints
the ratio of the best wm_jax mode to the best PyTorch mode per size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from wm_jax import run_dir
from wm_jax.models import controller, transition
from wm_jax.search import dream
from wm_jax.config import Config, TransitionConfig
from wm_jax.presets import with_compute_dtype

ALL_SIZES = ((64, 16), (256, 64), (1024, 64), (1024, 256), (4096, 256))
# The full list takes far more than a few minutes on a CPU: there the default stops at 256 x 64.
CPU_SIZES = ((64, 16), (256, 64))
QUICK_SIZES = ((8, 4),)
MODES = ("fp32-highest", "fp32", "bf16")


def machine() -> dict:
    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "devices": jax.device_count(),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def median_seconds(f, *args, repeats: int) -> float:
    """Median wall seconds of `repeats` calls of f(*args), each waited for, after one call (compile)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = tuple(tuple(int(n) for n in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are POPULATIONxROLLOUTS,..., got {text!r}") from None
    if any(len(s) != 2 or min(s) <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are POPULATIONxROLLOUTS,..., got {text!r}")
    return sizes  # type: ignore[return-value]


def mode_config(cfg: Config, mode: str) -> tuple[Config, contextlib.AbstractContextManager]:
    if mode == "bf16":
        return with_compute_dtype(cfg, "bfloat16"), contextlib.nullcontext()
    if mode == "fp32-highest":
        return cfg, jax.default_matmul_precision("highest")
    return cfg, contextlib.nullcontext()


def bench(cfg: Config, m_params, starts, population: int, rollouts: int, horizon: int, repeats: int, mode: str) -> dict:
    cfg, precision = mode_config(cfg, mode)
    latent, hidden = starts[0].shape[-1], cfg.transition.hidden
    dims = controller.num_params(cfg.controller, latent, hidden)
    pop = 0.1 * jax.random.normal(jax.random.key(1), (population, dims))
    key = jax.random.key(2)
    with precision:
        t0 = time.perf_counter()
        scores = dream.score_population(cfg, key, m_params, pop, *starts, rollouts, horizon).block_until_ready()
        first = time.perf_counter() - t0
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            dream.score_population(cfg, jax.random.fold_in(key, i), m_params, pop, *starts, rollouts, horizon).block_until_ready()
            times.append(time.perf_counter() - t0)
    assert np.isfinite(np.asarray(scores)).all()
    median = statistics.median(times)
    steps = population * rollouts * horizon
    return {
        "population": population, "rollouts": rollouts, "mode": mode, "steps_per_call": steps,
        "median_s": median, "times_s": times, "steps_per_s": steps / median,
        "first_call_s": first, "compile_s": max(first - median, 0.0),
    }


def parse_modes(p: argparse.ArgumentParser, text: str, allowed: tuple[str, ...] = MODES) -> tuple[str, ...]:
    """--modes: a comma-separated subset of `allowed` (argparse's one-line error otherwise)."""
    modes = tuple(m for m in text.split(",") if m)
    if not modes or any(m not in allowed for m in modes):
        p.error(f"--modes must be a comma-separated subset of {allowed}, got {text!r}")
    return modes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="POPULATIONxROLLOUTS,... (default: all five on an accelerator, 64x16,256x64 on a CPU)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    p.add_argument("--head", choices=("gaussian", "mdn"), default="gaussian", help="M's latent head (default gaussian)")
    p.add_argument("--horizon", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="size 8x4 and one repeat")
    p.add_argument("--compare-torch", action="store_true",
                   help="also time benchmarks/torch_dream.py (PyTorch eager, fp32 and bf16 autocast) at each size")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="where to write the results (default benchmarks/results/dream_throughput_PLATFORM.json)")
    args = p.parse_args(argv)
    modes = parse_modes(p, args.modes)
    torch_dream = _torch_dream(p) if args.compare_torch else None
    info = machine()
    if args.quick:
        args.sizes, args.repeats = QUICK_SIZES, 1
    elif args.sizes is None:
        args.sizes = CPU_SIZES if info["platform"] == "cpu" else ALL_SIZES
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"dream_throughput_{info['platform']}.json"

    tcfg = TransitionConfig(head=args.head)
    cfg = dataclasses.replace(Config(), transition=tcfg)
    latent = cfg.vae.latent
    m_params = transition.init(jax.random.key(0), tcfg, latent)
    k1, k2 = jax.random.split(jax.random.key(3))
    starts = (jax.random.normal(k1, (1024, latent)), -2.0 + 0.1 * jax.random.normal(k2, (1024, latent)))

    print(f"Machine: {info['platform']} ({info['device_kind']}) x{info['devices']}, {info['machine']}, "
          f"{info['cpu_cores']} CPU cores, jax {info['jax']}")
    print(f"M: LSTM {tcfg.hidden}, latent {latent}, {args.head} head; horizon {args.horizon}; "
          f"median of {args.repeats} calls")
    print()
    print("| population x rollouts | mode | steps/s | ms per call | first call s (compile + 1 run) |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for population, rollouts in args.sizes:
        for mode in modes:
            r = bench(cfg, m_params, starts, population, rollouts, args.horizon, args.repeats, mode)
            rows.append(r)
            print(f"| {population} x {rollouts} | {mode} | {r['steps_per_s']:,.0f} | {1e3 * r['median_s']:.1f} | "
                  f"{r['first_call_s']:.2f} |", flush=True)
        if torch_dream is not None:
            for mode in ("fp32", "bf16"):
                r = torch_dream.bench(population, rollouts, args.horizon, args.repeats, mode, args.head,
                                      latent, tcfg.hidden, tcfg.mixtures)
                rows.append(r)
                print(f"| {population} x {rollouts} | {r['mode']} | {r['steps_per_s']:,.0f} | "
                      f"{1e3 * r['median_s']:.1f} | {r['first_call_s']:.2f} |", flush=True)
    ratios = _ratios(rows) if torch_dream is not None else []
    for r in ratios:
        print(f"{r['population']} x {r['rollouts']}: wm_jax {r['jax_mode']} {r['jax_steps_per_s']:,.0f} / "
              f"PyTorch {r['torch_mode']} {r['torch_steps_per_s']:,.0f} = {r['ratio']:.2f}x")
    result = {
        "machine": info, "head": args.head, "hidden": tcfg.hidden, "latent": latent, "horizon": args.horizon,
        "repeats": args.repeats, "results": rows, "torch_ratios": ratios,
    }
    run_dir.write_json(args.json, result)
    print(f"\nwrote {args.json}")
    return result


def _torch_dream(parser: argparse.ArgumentParser):
    """benchmarks/torch_dream.py as a module, or a parser error naming the missing extra."""
    if importlib.util.find_spec("torch") is None:
        parser.error("--compare-torch needs PyTorch: pip install -e '.[torch]'")
    spec = importlib.util.spec_from_file_location("torch_dream", Path(__file__).resolve().parent / "torch_dream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.torch.set_num_threads(os.cpu_count() or 1)
    return module


def _ratios(rows: list[dict]) -> list[dict]:
    """Per size: the best wm_jax mode's steps/s over the best PyTorch mode's."""
    out = []
    for size in dict.fromkeys((r["population"], r["rollouts"]) for r in rows):
        same = [r for r in rows if (r["population"], r["rollouts"]) == size]
        jax_best = max((r for r in same if not r["mode"].startswith("torch")), key=lambda r: r["steps_per_s"])
        torch_best = max((r for r in same if r["mode"].startswith("torch")), key=lambda r: r["steps_per_s"])
        out.append({"population": size[0], "rollouts": size[1], "jax_mode": jax_best["mode"],
                    "jax_steps_per_s": jax_best["steps_per_s"], "torch_mode": torch_best["mode"],
                    "torch_steps_per_s": torch_best["steps_per_s"],
                    "ratio": jax_best["steps_per_s"] / torch_best["steps_per_s"]})
    return out


if __name__ == "__main__":
    main()
