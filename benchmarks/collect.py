"""Benchmark episode collection: wm_jax.store.data (jitted, vmapped scan) vs a host loop over gymnasium.

    python benchmarks/collect.py                 # 5000 episodes (the recipe's dataset), baseline 200
    python benchmarks/collect.py --quick         # 200 episodes, baseline 20
    python benchmarks/collect.py --json out.json

(a) `collection.collect_arrays(jax.random.key(123), N)` after a warm-up call with the same chunk size, so
    compilation is reported separately; then `collection.collect` (which adds the Dataset construction),
    and `data.save_dataset` of that dataset to a temporary directory (size on disk, peak RSS).
(b) A plain Python loop over gymnasium's CartPole-v1 (random actions, seed 123) that renders every
    state on the host with the same `wm_jax.envs.cartpole.render`, one call per step.
A frame is one dataset row: the observation of one step (the state before each action).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import datasets
import jax
import numpy as np

from wm_jax import run_dir
from wm_jax.store import collection, data
from wm_jax.envs.cartpole import render


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def cpu_name() -> str:
    name = platform.processor()
    try:  # platform.processor() is often empty on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or "unknown"


def machine() -> dict:
    devices = jax.devices()
    return {
        "processor": cpu_name(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in devices],
        "jax_device_kinds": sorted({d.device_kind for d in devices}),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def bench_wm_jax(episodes: int, chunk_size: int, seed: int) -> dict:
    key = jax.random.key(seed)
    chunk = min(chunk_size, episodes)  # what collect_arrays uses, so the warm-up compiles the same program

    t0 = time.perf_counter()
    collection.collect_arrays(key, chunk, chunk_size=chunk, progress=False)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cols = collection.collect_arrays(key, episodes, chunk_size=chunk, progress=False)
    arrays_s = time.perf_counter() - t0
    rows = int(cols["t"].shape[0])
    assert int(np.unique(cols["episode"]).size) == episodes
    del cols

    t0 = time.perf_counter()
    ds = collection.collect(key, episodes, chunk_size=chunk, progress=False)
    collect_s = time.perf_counter() - t0
    assert ds.num_rows == rows

    with tempfile.TemporaryDirectory(prefix="wm_jax_bench_") as tmp:
        path = Path(tmp) / "dataset"
        t0 = time.perf_counter()
        data.save_dataset(ds, path)
        save_s = time.perf_counter() - t0
        disk_mb = dir_size_mb(path)
        del ds
        rss_mb = peak_rss_mb()

    return {
        "episodes": episodes,
        "chunk_size": chunk,
        "frames": rows,
        "compile_s": compile_s,
        "collect_arrays_s": arrays_s,
        "collect_s": collect_s,
        "save_s": save_s,
        "disk_mb": disk_mb,
        "peak_rss_mb": rss_mb,
    }


def bench_gymnasium(episodes: int, seed: int) -> dict:
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    np.asarray(render(0.0, 0.0))  # compile outside the timing

    frames = 0
    t0 = time.perf_counter()
    env.reset(seed=seed)
    for ep in range(episodes):
        if ep:
            env.reset()
        while True:
            x, _, theta, _ = env.unwrapped.state
            np.asarray(render(float(x), float(theta)))
            frames += 1
            _, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
            if terminated or truncated:
                break
    seconds = time.perf_counter() - t0
    env.close()
    return {"episodes": episodes, "frames": frames, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=5000, help="episodes for wm_jax.store.collection.collect (default 5000)")
    parser.add_argument("--baseline-episodes", type=int, default=200, help="episodes for the gymnasium loop (default 200)")
    parser.add_argument("--chunk-size", type=int, default=1000, help="collect's chunk_size (default 1000)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="200 episodes and 20 baseline episodes")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes, args.baseline_episodes = 200, 20

    datasets.disable_progress_bars()
    info = machine()
    wm = bench_wm_jax(args.episodes, args.chunk_size, args.seed)
    gym_res = bench_gymnasium(args.baseline_episodes, args.seed)

    fps_arrays = wm["frames"] / wm["collect_arrays_s"]
    fps_collect = wm["frames"] / wm["collect_s"]
    fps_gym = gym_res["frames"] / gym_res["seconds"]

    print(
        f"Machine: {info['processor']} / {info['machine']}, {info['cpu_count']} CPUs, "
        f"jax {info['jax_version']} devices {info['jax_devices']}"
    )
    print()
    print("| method | episodes | frames | seconds | frames/s | vs gymnasium loop |")
    print("|---|---:|---:|---:|---:|---:|")
    table = [
        ("wm_jax `collection.collect_arrays` (jit+vmap scan)", wm["episodes"], wm["frames"], wm["collect_arrays_s"], fps_arrays),
        ("wm_jax `collection.collect` (+ Dataset)", wm["episodes"], wm["frames"], wm["collect_s"], fps_collect),
        ("gymnasium CartPole-v1 loop + host `render`", gym_res["episodes"], gym_res["frames"], gym_res["seconds"], fps_gym),
    ]
    for name, eps, frames, secs, fps in table:
        print(f"| {name} | {eps} | {frames} | {secs:.2f} | {fps:,.0f} | {fps / fps_gym:.1f}x |")
    print()
    print(
        f"compile (warm-up, chunk_size={wm['chunk_size']}): {wm['compile_s']:.2f} s; "
        f"save_dataset: {wm['save_s']:.2f} s, {wm['disk_mb']:.1f} MB on disk; "
        f"peak RSS after collect + save: {wm['peak_rss_mb']:.0f} MB"
    )

    result = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wm_jax": {**wm, "collect_arrays_fps": fps_arrays, "collect_fps": fps_collect},
        "gymnasium": {**gym_res, "fps": fps_gym},
        "ratio_collect_arrays_vs_gymnasium": fps_arrays / fps_gym,
        "ratio_collect_vs_gymnasium": fps_collect / fps_gym,
    }
    if args.json is not None:
        run_dir.write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
