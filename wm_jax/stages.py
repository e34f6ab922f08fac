"""A run's records: stages.json (`Stages`: which stages finished, what each produced and was built
on), the summary derived from them (SUMMARY_KEYS, learning_curve, imagined_steps, the rounds run
and the best), and what a run records of the machine it ran on (versions, device_name).
pipeline.run drives the stages; run_dir reads what they wrote.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from wm_jax import interrupt, run_dir
from wm_jax.config import Config


SUMMARY_KEYS = (
    "preset", "seed", "real_return_mean", "real_return_std", "real_return_min", "real_episodes", "solved",
    "real_env_steps", "dream_real_corr", "latent_kl", "wall_s", "device", "versions",
)



class Stages:
    """stages.json: the finished stages, their results, what each produced ("outputs") and what it
    was built on ("inputs"). A finished stage is not rerun while its outputs exist and its inputs
    are what the run has now; a stage whose outputs were deleted, or whose inputs changed (a stage
    before it was redone with another result), runs again, and so, through their inputs, do the
    stages after it. A stage with its own folder records its inputs there when it starts
    (inputs.json), so a half-trained stage never resumes on top of inputs that have changed."""

    def __init__(self, out: Path, progress: bool) -> None:
        self.out = out
        self.path = out / "stages.json"
        self.done: dict[str, Any] = run_dir.read_stages(out)
        self.progress = progress
        if not self.path.exists():  # before any stage writes: its absence later means it was removed
            run_dir.write_json(self.path, self.done)

    def note(self, text: str) -> None:
        if self.progress:
            print(f"[wm-jax] {text}", flush=True)

    def stale(self, rec: dict[str, Any], inputs: dict[str, Any]) -> str | None:
        gone = [p for p in rec.get("outputs", {}) if not (self.out / p).exists()]
        if gone:
            return f"its output {gone[0]} is gone"
        if rec.get("inputs") != inputs:
            was = rec.get("inputs") if isinstance(rec.get("inputs"), dict) else {}
            changed = sorted(k for k in set(was) | set(inputs) if was.get(k) != inputs.get(k)) or ["its record"]
            return f"what it was built on changed ({', '.join(changed)})"
        return None

    def forget(self, name: str) -> None:
        """Drop a finished stage's record (it runs again on the next `run`)."""
        if self.done.pop(name, None) is not None:
            run_dir.write_json(self.path, self.done)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], inputs: dict[str, Any] | None = None,
            folder: Path | None = None) -> dict[str, Any]:
        inputs = inputs or {}
        rec = self.done.get(name)
        if rec is not None:
            why = self.stale(rec, inputs)
            if why is None:
                return rec
            self.note(f"{name}: {why}; running it again")
            self.forget(name)
            if folder is not None and folder.exists():
                shutil.rmtree(folder)
        if folder is not None:
            started = folder / "inputs.json"
            if started.exists() and run_dir.read_json(started, f"delete {folder} to redo the stage") != inputs:
                self.note(f"{name}: its half-finished work was built on other inputs; starting it afresh")
                shutil.rmtree(folder)
            run_dir.write_json(started, inputs)
        interrupt.check()  # Ctrl-C between stages (stages without chunks of their own, too)
        self.note(f"{name} ...")
        t0 = time.perf_counter()
        result = fn()
        result["wall_s"] = time.perf_counter() - t0
        result["inputs"] = inputs
        self.done[name] = result
        run_dir.write_json(self.path, self.done)
        self.note(f"{name} done in {result['wall_s']:.1f}s")
        interrupt.check()
        return result


RUN_PACKAGES = ("jax", "jaxlib", "flax", "optax", "evosax", "gymnax", "orbax-checkpoint", "datasets", "wm_jax")


def versions(packages: tuple[str, ...] = RUN_PACKAGES, missing: str | None = "missing") -> dict[str, str]:
    """The installed version of each package: `missing` for one not installed (None: left out).
    wm_jax's is the package's own __version__, as a checkout on PYTHONPATH has no metadata."""
    from wm_jax import __version__

    out = {}
    for pkg in packages:
        try:
            out[pkg] = __version__ if pkg == "wm_jax" else metadata.version(pkg)
        except metadata.PackageNotFoundError:
            if missing is not None:
                out[pkg] = missing
    return out


def cpu_name() -> str:
    """The CPU model, architecture, core count and vector extensions ("AMD EPYC, x86_64, 2 cores,
    AVX-512 (avx512_bf16)"): XLA compiles other float arithmetic for AVX-512 than for AVX2, so a
    run's figures name the processor (from /proc/cpuinfo; the model is left out where it is absent)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                               if line.split(":", 1)[0].strip() == name), "")
    flags = set(field("flags").split())
    isa = ("AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "") if flags else ""
    extra = [f for f in ("avx512_bf16", "amx_tile") if f in flags]
    parts = [field("model name"), platform.machine(), f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores", isa + (f" ({', '.join(extra)})" if extra else "")]
    return ", ".join(p for p in parts if p)


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({cpu_name()})"
    return f"{d.platform} ({getattr(d, 'device_kind', '')}) x{jax.device_count()}"


def finished_summary(out: Path, stages: Stages) -> dict[str, Any] | None:
    """The summary of a finished run whose stages' outputs are all in place (files and folders
    present, latents hashing to their records), else None: the run goes through its stages again,
    redoing what is gone and rebuilding the summary. Checkpoints are not read here (Agent.load and
    a run that goes through the stages check them)."""
    path = out / "summary.json"
    if not path.exists() or "evaluate" not in stages.done:  # the summary is written after evaluate
        return None
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        summary = None
    if not isinstance(summary, dict) or not set(SUMMARY_KEYS) <= summary.keys():
        stages.note("summary.json is damaged; rebuilding it")
        return None
    for name, rec in stages.done.items():
        why = stages.stale(rec, rec.get("inputs", {}))
        for file, identity in rec.get("outputs", {}).items():
            if why is None and file.endswith(".npz") and run_dir.read_latents(out / file, identity) is None:
                why = f"{file} is damaged or changed"
        if why is not None:
            stages.note(f"{name}: {why}; finishing the run again")
            return None
    return summary


def rounds_run(cfg: Config, done: dict[str, Any]) -> list[int]:
    """The rounds whose search finished (later rounds skipped by _solved have no record)."""
    return [r for r in range(1, cfg.rounds.rounds + 1) if f"evolve_round{r}" in done]


def best_round(cfg: Config, done: dict[str, Any]) -> int:
    """The round whose controller did best in its real checks; ties go to the later round (its M
    was trained on more data). The same rule as the rounds apply as they finish."""
    best, best_real = 1, None
    for r in rounds_run(cfg, done):
        real = done[f"evolve_round{r}"]["best_real"]
        if best_real is None or real >= best_real:
            best, best_real = r, real
    return best


def imagined_steps(cfg: Config, done: dict[str, Any]) -> int:
    """Imagined steps the controller searches computed, over every round run (each search records
    driver.imagined_steps)."""
    total = 0
    for r in rounds_run(cfg, done):
        total += done[f"evolve_round{r}"]["imagined_steps"]
    return total


def learning_curve(cfg: Config, done: dict[str, Any]) -> list[dict[str, Any]]:
    """Real return against the real env steps used so far, from the stages' records: a point
    after each collection (the mean return of the episodes collected: the random policy's, then
    the agent's with action noise), one at each real check (its mean return over
    evolve.check_episodes, and evolve.confirm_episodes more when it reached stop_at; a sequential
    check's, over the episodes it played), and the
    final evaluation (evaluate.episodes; its own steps are not training steps, so the count
    stays). Every real step is counted once, in the order spent."""
    points, steps = [], 0
    for r in range(1, cfg.rounds.rounds + 1):
        rec = done.get("collect" if r == 1 else f"collect_round{r}")
        if rec is None:
            break
        steps += rec["env_steps"]
        points.append({"round": r, "source": "collect", "real_env_steps": steps, "real_return": rec.get("return_mean"),
                       "episodes": rec["episodes"]})
        for c in done.get(f"evolve_round{r}", {}).get("checks", []):
            steps += c["env_steps"]
            points.append({"round": r, "source": "check", "generation": c["generation"], "real_env_steps": steps,
                           "real_return": c["real_return"], "dream_return": c["dream_return"],
                           "episodes": c.get("episodes", cfg.evolve.check_episodes
                                             + (cfg.evolve.confirm_episodes if c.get("confirm_return") is not None
                                                else 0))})
    if "evaluate" in done:
        points.append({"source": "evaluate", "real_env_steps": steps, "real_return": done["evaluate"]["return_mean"],
                       "episodes": done["evaluate"]["episodes"]})
    return points


