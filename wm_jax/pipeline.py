"""The recipe end to end: collect -> V -> M -> evolve C in the dream -> real evaluation.

`run(cfg, out_dir)` writes a run directory; every stage records its result in stages.json when it
finishes, and a rerun with the same command skips finished stages (training stages also resume
mid-way from their checkpoints). With cfg.rounds.rounds > 1, Ha's iterative procedure follows:
collect with the current controller (with action noise), fine-tune M on all data, evolve again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import data as data_lib
from wm_jax import evolve, rollout, run_dir, transition, vae, verifier
from wm_jax.config import Config

SUMMARY_KEYS = (
    "preset", "seed", "real_return_mean", "real_return_std", "real_return_min", "real_episodes", "solved",
    "real_env_steps", "dream_real_corr", "latent_kl", "wall_s", "device", "versions",
)


class RunDirError(ValueError):
    """The run directory belongs to a different configuration."""


class _Stages:
    """stages.json: the finished stages and their results; a finished stage is never rerun."""

    def __init__(self, out: Path, progress: bool) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.progress = progress

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name in self.done:
            return self.done[name]
        if self.progress:
            print(f"[wm-jax] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        result["wall_s"] = time.perf_counter() - t0
        self.done[name] = result
        run_dir.write_json(self.path, self.done)
        if self.progress:
            print(f"[wm-jax] {name} done in {result['wall_s']:.1f}s", flush=True)
        return result


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "evosax", "gymnax", "orbax-checkpoint", "datasets", "wm_jax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return f"{d.platform} ({getattr(d, 'device_kind', '')}) x{jax.device_count()}"


def run(cfg: Config, out: Path | str, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the whole pipeline in `out`; returns the summary dict (also summary.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        # Through from_dict, so fields added since the run was started compare as their defaults.
        if json.loads(Config.from_dict(saved).to_json()) != json.loads(cfg.to_json()):
            raise RunDirError(f"{out} holds a run with a different config (preset {saved.get('preset')!r}, "
                              f"seed {saved.get('seed')!r}); use a new --out or delete it")
    else:
        run_dir.write_json(cfg_path, cfg.to_dict())
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())

    stages = _Stages(out, progress)
    key = jax.random.key(cfg.seed)
    k_vae, k_m, k_evo, k_eval, k_rounds = jax.random.split(key, 5)
    k_k = jax.random.fold_in(key, 6)  # the verifier's (a new stream: the five above stay as they were)

    def collect_stage() -> dict[str, Any]:
        ds = data_lib.collect(
            jax.random.key(cfg.data.seed), cfg.data.episodes, max_steps=cfg.data.max_steps,
            chunk_size=cfg.data.chunk_size, progress=progress,
        )
        data_lib.save_dataset(ds, out / "data" / "round1", overwrite=True)
        return {"episodes": cfg.data.episodes, "rows": ds.num_rows, "env_steps": ds.num_rows}

    collected = stages.run("collect", collect_stage)
    data_paths = [out / "data" / "round1"]
    arrays = run_dir.load_arrays(data_paths)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])

    def vae_stage() -> dict[str, Any]:
        params, info = vae.train(cfg.vae, arrays["frame"], index.stack_rows, k_vae, out / "vae", progress)
        from wm_jax import plots

        plots.reconstruction_grid(cfg, params, arrays, index, out / "vae" / "reconstructions.png")
        plots.loss_curves(out / "vae", out / "vae" / "loss.png")
        return {"steps_per_s": info["steps_per_s"], "final": info["final"]}

    stages.run("vae", vae_stage)
    vae_params = vae.load(cfg.vae, out / "vae")

    # round 1 on random data, later rounds on data gathered by the evolving controller
    real_env_steps = collected["env_steps"]
    # The best agent so far, judged by the real checks. A controller reads M's hidden state, so it
    # is kept together with the M it was evolved against: a later round's M would change its inputs.
    best: dict[str, Any] | None = None
    checks_all: list[dict[str, Any]] = []
    m_params = None
    for r in range(1, cfg.rounds.rounds + 1):
        if r > 1:
            def collect_round(r=r, ctrl=best["ctrl"], m=best["m_params"]) -> dict[str, Any]:
                policy = agent_policy(cfg, {"vae": vae_params, "transition": m, "controller": jnp.asarray(ctrl)})
                ds = data_lib.collect(
                    jax.random.fold_in(k_rounds, r), cfg.rounds.episodes, policy=policy, max_steps=cfg.data.max_steps,
                    chunk_size=cfg.rounds.episodes, episode_offset=r * 1_000_000, progress=progress,
                )
                data_lib.save_dataset(ds, out / "data" / f"round{r}", overwrite=True)
                return {"episodes": cfg.rounds.episodes, "rows": ds.num_rows, "env_steps": ds.num_rows}

            got = stages.run(f"collect_round{r}", collect_round)
            real_env_steps += got["env_steps"]
            data_paths.append(out / "data" / f"round{r}")
            arrays = run_dir.load_arrays(data_paths)
            index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])

        latents_path = out / f"latents_round{r}.npz"
        if not latents_path.exists():
            # Rows of earlier rounds come first and V is frozen: encode only the new rows.
            prev = np.load(out / f"latents_round{r - 1}.npz") if r > 1 else None
            done = 0 if prev is None else len(prev["mean"])
            mean, logvar = vae.encode_all(cfg.vae, vae_params, arrays["frame"], index.stack_rows[done:])
            if prev is not None:
                mean = np.concatenate([prev["mean"], mean])
                logvar = np.concatenate([prev["logvar"], logvar])
            tmp = latents_path.with_name(f".{latents_path.name}.tmp.npz")
            np.savez(tmp, mean=mean, logvar=logvar)
            os.replace(tmp, latents_path)
        lat = np.load(latents_path)
        m_arrays = transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)
        m_dir = out / ("transition" if r == 1 else f"transition_round{r}")

        def m_stage(r=r, m_arrays=m_arrays, m_dir=m_dir, prev=m_params) -> dict[str, Any]:
            steps = None if r == 1 else cfg.rounds.transition_steps
            _, info = transition.train(cfg.transition, m_arrays, jax.random.fold_in(k_m, r), m_dir, progress, prev, steps)
            return {"steps_per_s": info["steps_per_s"], "final": info["final"]}

        stages.run("transition" if r == 1 else f"transition_round{r}", m_stage)
        m_params = transition.load(cfg.transition, m_dir, cfg.vae.latent, None if r == 1 else cfg.rounds.transition_steps)
        k_params = None
        if cfg.verifier.mode != "off":
            k_dir = out / ("verifier" if r == 1 else f"verifier_round{r}")

            def k_stage(r=r, m_params=m_params, m_arrays=m_arrays, k_dir=k_dir) -> dict[str, Any]:
                _, info = verifier.train(cfg, m_params, m_arrays, jax.random.fold_in(k_k, r), k_dir, progress)
                return {"steps_per_s": info["steps_per_s"], "final": info["final"]}

            stages.run(k_dir.name, k_stage)
            k_params = verifier.load(cfg, k_dir, cfg.vae.latent)

        def evolve_stage(r=r, m_params=m_params, m_arrays=m_arrays, init=None if best is None else best["ctrl"],
                         k_params=k_params):
            world = evolve.World(m_params=m_params, vae_params=vae_params, k_params=k_params,
                                 starts=(jnp.asarray(m_arrays["mean"]), jnp.asarray(m_arrays["logvar"])))
            res = evolve.evolve(round_config(cfg, r), jax.random.fold_in(k_evo, r), world, out / f"evolve_round{r}",
                                init_mean=init, progress=progress)
            np.save(out / f"evolve_round{r}" / "controller.npy", res["best"])
            return {"best_real": res["best_real"], "checks": res["checks"], "real_env_steps": res["real_env_steps"],
                    "final_dream_mean": res["history"][-1]["dream_mean"]}

        evo = stages.run(f"evolve_round{r}", evolve_stage)
        real_env_steps += evo["real_env_steps"]
        checks_all += evo["checks"]
        if best is None or evo["best_real"] >= best["real"]:  # ties go to the M trained on more data
            best = {
                "real": evo["best_real"], "round": r, "ctrl": np.load(out / f"evolve_round{r}" / "controller.npy"),
                "m_params": m_params, "m_dir": m_dir, "m_steps": None if r == 1 else cfg.rounds.transition_steps,
                "k_params": k_params,
            }

    assert best is not None
    final_params = {"vae": vae_params, "transition": best["m_params"], "controller": jnp.asarray(best["ctrl"])}
    np.save(out / "controller.npy", best["ctrl"])
    run_dir.write_json(out / "agent.json", {
        "round": best["round"],
        "transition_dir": best["m_dir"].name,
        "transition_steps": best["m_steps"],
        "config": cfg.to_dict(),
    })

    def eval_stage() -> dict[str, Any]:
        res = rollout.evaluate(cfg, final_params, k_eval)
        from wm_jax import plots

        plots.dream_vs_real(checks_all, out / "dream_vs_real.png")
        plots.episode_strip(cfg, {**final_params, "verifier": best["k_params"]}, jax.random.fold_in(k_eval, 99),
                            out / "episode_strip.png",
                            out / "imagined_rollouts.npz")
        return res

    ev = stages.run("evaluate", eval_stage)
    real_env_steps += ev["env_steps"]
    wall = {name: stages.done[name]["wall_s"] for name in stages.done}
    wall["total"] = float(sum(wall.values()))
    summary = {
        "preset": cfg.preset,
        "seed": cfg.seed,
        "real_return_mean": ev["return_mean"],
        "real_return_std": ev["return_std"],
        "real_return_min": ev["return_min"],
        "real_episodes": ev["episodes"],
        "solved": bool(ev["return_mean"] >= cfg.eval.solved_at),
        "real_env_steps": int(real_env_steps),
        "real_env_steps_training": int(real_env_steps - ev["env_steps"]),
        "agent_round": best["round"],
        "dream_real_corr": rollout.correlation([c["dream_return"] for c in checks_all], [c["real_return"] for c in checks_all]),
        "latent_kl": ev["latent_kl"],
        "wall_s": wall,
        "device": device_name(),
        "versions": versions(),
    }
    summary = run_dir.finite_or_none(summary)  # the same values in memory, on disk and on a rerun
    run_dir.write_json(out / "summary.json", summary)
    return summary


def round_config(cfg: Config, r: int) -> Config:
    """The config round r's controller search runs with: later rounds evolve for rounds.generations
    generations in dreams of rounds.horizon steps (when set)."""
    if r == 1:
        return cfg
    horizon = cfg.evolve.horizon if cfg.rounds.horizon is None else cfg.rounds.horizon
    return dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, generations=cfg.rounds.generations,
                                                              horizon=horizon))


def agent_policy(cfg: Config, params: dict[str, Any]) -> data_lib.Policy:
    """The trained agent as a collection policy, with epsilon-random actions for coverage."""
    eps = cfg.rounds.action_noise

    def act(key, carry, obs):
        action, z, _ = rollout.agent_act(cfg, params, carry, obs)
        k1, k2 = jax.random.split(key)
        rand = jax.random.bernoulli(k1).astype(jnp.int32)
        action = jnp.where(jax.random.uniform(k2) < eps, rand, action)
        carry, _ = transition.step(cfg.transition, params["transition"], carry, z, action)  # the executed action
        return action, carry

    return data_lib.Policy(act=act, init_carry=lambda: transition.initial_carry(cfg.transition), uses_pixels=True)


def collect_encoded(cfg: Config, params: dict[str, Any], policy: str, episodes: int, seed: int) -> dict[str, Any]:
    """Fresh episodes (never trained on) of the random policy or of the agent in `params` (with
    rounds.action_noise), encoded by V: per-row arrays as transition.training_arrays."""
    kwargs = {"policy": agent_policy(cfg, params)} if policy == "agent" else {}
    ds = data_lib.collect(jax.random.key(seed), episodes, max_steps=cfg.eval.max_steps, chunk_size=episodes,
                          progress=False, **kwargs)
    cols = data_lib.to_arrays(ds)
    index = data_lib.EpisodeIndex.from_columns(cols["episode"], cols["t"])
    mean, logvar = vae.encode_all(cfg.vae, params["vae"], cols["frame"], index.stack_rows)
    return transition.training_arrays(mean, logvar, cols, index)
