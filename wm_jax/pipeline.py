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
from wm_jax import evolve, rollout, run_dir, stats, train, transition, vae, verifier
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


@dataclasses.dataclass
class _Run:
    """What the rounds of one run share: its config, directory, stages, keys, V and the running totals."""

    cfg: Config
    out: Path
    stages: _Stages
    keys: dict[str, jax.Array]
    progress: bool
    vae_params: Any = None
    m_params: Any = None  # the latest round's M (the next round fine-tunes it)
    data_paths: list[Path] = dataclasses.field(default_factory=list)
    real_env_steps: int = 0
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The best agent so far, judged by the real checks. A controller reads M's hidden state, so it
    # is kept together with the M it was evolved against: a later round's M would change its inputs.
    best: dict[str, Any] | None = None


def _keys(seed: int) -> dict[str, jax.Array]:
    key = jax.random.key(seed)
    names = ("vae", "transition", "evolve", "evaluate", "rounds")
    keys = dict(zip(names, jax.random.split(key, len(names))))
    keys["verifier"] = jax.random.fold_in(key, 6)  # a new stream: the five above stay as they were
    return keys


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

    ctx = _Run(cfg=cfg, out=out, stages=_Stages(out, progress), keys=_keys(cfg.seed), progress=progress)
    collected = ctx.stages.run("collect", lambda: _collect(ctx, 1))
    ctx.real_env_steps = collected["env_steps"]
    ctx.data_paths = [out / "data" / "round1"]
    ctx.stages.run("vae", lambda: _train_vae(ctx))
    ctx.vae_params = vae.load(cfg, out / "vae")
    for r in range(1, cfg.rounds.rounds + 1):  # round 1 on random data, later ones on the agent's
        _round(ctx, r)
    assert ctx.best is not None
    best = ctx.best
    np.save(out / "controller.npy", best["ctrl"])
    run_dir.write_json(out / "agent.json", {"round": best["round"], "transition_dir": best["m_dir"].name,
                                            "transition_steps": best["m_steps"], "config": cfg.to_dict()})
    ev = ctx.stages.run("evaluate", lambda: _evaluate(ctx))
    summary = _summary(ctx, ev)
    run_dir.write_json(out / "summary.json", summary)
    return summary


def _collect(ctx: _Run, r: int) -> dict[str, Any]:
    """Round 1: the recipe's random episodes (data.seed); round r > 1: the best agent so far, with
    rounds.action_noise random actions."""
    cfg = ctx.cfg
    if r == 1:
        ds = data_lib.collect(jax.random.key(cfg.data.seed), cfg.data.episodes, max_steps=cfg.data.max_steps,
                              chunk_size=cfg.data.chunk_size, progress=ctx.progress)
    else:
        best = ctx.best
        policy = agent_policy(cfg, {"vae": ctx.vae_params, "transition": best["m_params"],
                                    "controller": jnp.asarray(best["ctrl"])})
        ds = data_lib.collect(jax.random.fold_in(ctx.keys["rounds"], r), cfg.rounds.episodes, policy=policy,
                              max_steps=cfg.data.max_steps, chunk_size=cfg.rounds.episodes,
                              episode_offset=r * 1_000_000, progress=ctx.progress)
    data_lib.save_dataset(ds, ctx.out / "data" / f"round{r}", overwrite=True)
    return {"episodes": cfg.data.episodes if r == 1 else cfg.rounds.episodes, "rows": ds.num_rows,
            "env_steps": ds.num_rows}


def _train_vae(ctx: _Run) -> dict[str, Any]:
    from wm_jax import plots  # matplotlib: loaded only when a figure is drawn

    arrays = run_dir.load_arrays(ctx.data_paths)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    params, info = vae.train(ctx.cfg, ctx.keys["vae"], {"frame": arrays["frame"], "stack_rows": index.stack_rows},
                             ctx.out / "vae", ctx.progress)
    real, recon, rows = vae.reconstructions(ctx.cfg.vae, params, arrays["frame"], index.stack_rows)
    plots.reconstruction_grid(real, recon, rows, ctx.out / "vae" / "reconstructions.png")
    plots.loss_curves(train.read_metrics(ctx.out / "vae"), ctx.out / "vae" / "loss.png")
    return {"steps_per_s": info["steps_per_s"], "final": info["final"]}


def _encode(ctx: _Run, r: int, arrays: dict[str, Any], index: data_lib.EpisodeIndex) -> dict[str, Any]:
    """latents_round{r}.npz: V's posteriors of every row so far (rows of earlier rounds come first
    and V is frozen, so only the new rows are encoded); returns M's training arrays."""
    path = ctx.out / f"latents_round{r}.npz"
    if not path.exists():
        prev = np.load(ctx.out / f"latents_round{r - 1}.npz") if r > 1 else None
        done = 0 if prev is None else len(prev["mean"])
        mean, logvar = vae.encode_all(ctx.cfg.vae, ctx.vae_params, arrays["frame"], index.stack_rows[done:])
        if prev is not None:
            mean, logvar = np.concatenate([prev["mean"], mean]), np.concatenate([prev["logvar"], logvar])
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, mean=mean, logvar=logvar)
        os.replace(tmp, path)
    lat = np.load(path)
    return transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)


def _round(ctx: _Run, r: int) -> None:
    """One round of Ha's iterative procedure: (collect with the best agent,) encode, train or
    fine-tune M (and K), evolve C in M's dreams; the best agent is updated from its real checks."""
    cfg, out, stages = ctx.cfg.for_round(r), ctx.out, ctx.stages
    if r > 1:
        got = stages.run(f"collect_round{r}", lambda: _collect(ctx, r))
        ctx.real_env_steps += got["env_steps"]
        ctx.data_paths.append(out / "data" / f"round{r}")
    arrays = run_dir.load_arrays(ctx.data_paths)
    m_arrays = _encode(ctx, r, arrays, data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"]))
    m_dir = out / ("transition" if r == 1 else f"transition_round{r}")

    def train_m() -> dict[str, Any]:
        _, info = transition.train(cfg, jax.random.fold_in(ctx.keys["transition"], r), m_arrays, m_dir, ctx.progress,
                                   init_params=ctx.m_params)
        return {"steps_per_s": info["steps_per_s"], "final": info["final"]}

    stages.run(m_dir.name, train_m)
    m_params = ctx.m_params = transition.load(cfg, m_dir)
    k_params = None
    if cfg.verifier.mode != "off":
        k_dir = out / ("verifier" if r == 1 else f"verifier_round{r}")

        def train_k() -> dict[str, Any]:
            _, info = verifier.train(cfg, jax.random.fold_in(ctx.keys["verifier"], r), m_arrays, k_dir, ctx.progress,
                                     m_params=m_params)
            return {"steps_per_s": info["steps_per_s"], "final": info["final"]}

        stages.run(k_dir.name, train_k)
        k_params = verifier.load(cfg, k_dir)

    def search() -> dict[str, Any]:
        world = evolve.World(m_params=m_params, vae_params=ctx.vae_params, k_params=k_params,
                             starts=(jnp.asarray(m_arrays["mean"]), jnp.asarray(m_arrays["logvar"])))
        res = evolve.evolve(cfg, jax.random.fold_in(ctx.keys["evolve"], r), world, out / f"evolve_round{r}",
                            init_mean=None if ctx.best is None else ctx.best["ctrl"], progress=ctx.progress)
        np.save(out / f"evolve_round{r}" / "controller.npy", res["best"])
        return {"best_real": res["best_real"], "checks": res["checks"], "real_env_steps": res["real_env_steps"],
                "final_dream_mean": res["history"][-1]["dream_mean"]}

    evo = stages.run(f"evolve_round{r}", search)
    ctx.real_env_steps += evo["real_env_steps"]
    ctx.checks += evo["checks"]
    if ctx.best is None or evo["best_real"] >= ctx.best["real"]:  # ties go to the M trained on more data
        ctx.best = {"real": evo["best_real"], "round": r, "ctrl": np.load(out / f"evolve_round{r}" / "controller.npy"),
                    "m_params": m_params, "m_dir": m_dir, "m_steps": cfg.transition.train.steps if r > 1 else None,
                    "k_params": k_params}


def _evaluate(ctx: _Run) -> dict[str, Any]:
    """The final agent's real episodes, and the figures of the run."""
    from wm_jax import plots  # matplotlib: loaded only when a figure is drawn

    cfg, best = ctx.cfg, ctx.best
    params = {"vae": ctx.vae_params, "transition": best["m_params"], "controller": jnp.asarray(best["ctrl"])}
    res = rollout.evaluate(cfg, params, ctx.keys["evaluate"])
    plots.dream_vs_real(ctx.checks, ctx.out / "dream_vs_real.png")
    strip = rollout.episode_strip(cfg, {**params, "verifier": best["k_params"]},
                                  jax.random.fold_in(ctx.keys["evaluate"], 99))
    plots.episode_strip(strip["real"], strip["recon"], strip["dreamed"], ctx.out / "episode_strip.png")
    tmp = ctx.out / ".imagined_rollouts.tmp.npz"
    np.savez_compressed(tmp, **strip["imagined"])  # a batch of imagined rollouts of the final agent
    os.replace(tmp, ctx.out / "imagined_rollouts.npz")
    return res


def _summary(ctx: _Run, ev: dict[str, Any]) -> dict[str, Any]:
    cfg, stages = ctx.cfg, ctx.stages
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
        "real_env_steps": int(ctx.real_env_steps + ev["env_steps"]),
        "real_env_steps_training": int(ctx.real_env_steps),
        "agent_round": ctx.best["round"],
        "dream_real_corr": stats.correlation([c["dream_return"] for c in ctx.checks],
                                             [c["real_return"] for c in ctx.checks]),
        "latent_kl": ev["latent_kl"],
        "wall_s": wall,
        "device": device_name(),
        "versions": versions(),
    }
    return run_dir.finite_or_none(summary)  # the same values in memory, on disk and on a rerun


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
