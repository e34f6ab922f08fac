"""The recipe end to end: collect -> V -> M -> evolve C in the dream -> real evaluation.

`run(cfg, out_dir)` writes a run directory; every stage records its result in stages.json when it
finishes, and a rerun with the same command skips finished stages (training stages also resume
mid-way from their checkpoints). With cfg.rounds.rounds > 1, Ha's iterative procedure follows:
collect with the current controller (with action noise), fine-tune M on all data, evolve again;
with evolve.stop_at set, the rounds after rounds.min_rounds end once a real check of the best agent
reaches it; with rounds.budget set, the rounds and the searches' checks end once the run has spent it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import interrupt, logs, plots, run_dir, stats, video
from wm_jax import stages as stages_lib
from wm_jax.models import train, transition, vae, verifier
from wm_jax.search import checks, driver, rollout
from wm_jax.store import checkpoint, collection
from wm_jax.store import data as data_lib
from wm_jax.config import Config
from wm_jax.presets import check_env
from wm_jax.schema import diff
from wm_jax.run_dir import RunDirError

STRIP_STEPS = 10  # episode_strip.png: the first steps of the episode the video shows

@dataclasses.dataclass
class _Run:
    """What the rounds of one run share: its config, directory, stages, keys, V and the running totals."""

    cfg: Config
    out: Path
    stages: stages_lib.Stages
    keys: dict[str, jax.Array]
    progress: bool
    vae_params: Any = None
    vae_id: Any = None  # identity of V as its stage recorded it
    m_params: Any = None  # the latest round's M (the next round fine-tunes it)
    m_id: Any = None
    latents: dict[str, np.ndarray] | None = None  # the latest round's latents and their identity
    lat_id: Any = None
    data_paths: list[Path] = dataclasses.field(default_factory=list)
    real_env_steps: int = 0
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The best agent so far, judged by the real checks. A controller reads M's hidden state, so it
    # is kept together with the M it was evolved against: a later round's M would change its inputs.
    best: dict[str, Any] | None = None

    def load(self, stage: str, folder: str, loader: Callable[..., Any], cfg: Config) -> tuple[Any, Any]:
        """A finished stage's parameters, exactly as it recorded them: (params, identity)."""
        identity = run_dir.stage_output(self.out, self.stages.done, stage, folder)
        try:
            return loader(cfg, self.out / folder, identity), identity
        except checkpoint.Damaged as e:
            raise run_dir.damaged(self.out, stage, folder, e) from None

    def data_ids(self) -> dict[str, str]:
        """The identities of the datasets so far, checked against their collect stages' records."""
        return {f"data/round{r}": run_dir.dataset_id(self.out, self.stages.done, "collect" if r == 1 else
                                                     f"collect_round{r}", f"data/round{r}")
                for r in range(1, len(self.data_paths) + 1)}


def check_config(out: Path, cfg: Config) -> None:
    """config.json: written by the first run, and the same configuration on every rerun. A directory
    that holds a run but no config.json (deleted, or never written) is refused: its stages cannot be
    told apart from another configuration's."""
    cfg_path = out / "config.json"
    if cfg_path.exists():
        saved = run_dir.read_config(out)  # through from_dict: fields added since compare as defaults
        changed = diff(json.loads(saved.to_json()), json.loads(cfg.to_json()))
        if changed:
            shown = "; ".join(f"{k}: {a!r} in config.json, {b!r} now" for k, a, b in changed[:4])
            more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
            raise RunDirError(f"{out} holds a run with a different config ({shown}{more}); rerun it with its own "
                              f"arguments, or use a new --out")
        return
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if held:
        raise RunDirError(f"{out} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) but has no "
                          f"config.json, so what made it is unknown; restore config.json or use a new --out")
    run_dir.write_config(out, cfg)


def run(cfg: Config, out: Path | str, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the whole pipeline in `out`; returns the summary dict (also summary.json).

    One process at a time per directory (run_dir.locked). Ctrl-C stops at the next chunk boundary
    (KeyboardInterrupt); the same call resumes. A rerun of a finished run rewrites the derived files
    (agent.json, controller.npy, summary.json) that are missing or damaged."""
    out = run_dir.for_process(Path(out))
    check_env(cfg)  # the task's actions and step limit (a macro controller's config plays through search.macro)
    with run_dir.locked(out), interrupt.deferred():
        if (out / "seeds.json").exists():
            raise RunDirError(f"{out} holds a batch of seeds (wm-jax run --seeds); rerun it with its own --seeds, or "
                              f"use a new --out")
        check_config(out, cfg)
        stages = stages_lib.Stages(out, progress)
        summary = stages_lib.finished_summary(out, stages)
        if summary is not None:
            _repair_agent_files(out, cfg, stages)
            return summary
        return _run(_Run(cfg=cfg, out=out, stages=stages, keys=run_dir.run_keys(cfg.seed), progress=progress))


def _run(ctx: _Run) -> dict[str, Any]:
    cfg, out = ctx.cfg, ctx.out
    collected = ctx.stages.run("collect", lambda: _collect(ctx, 1))
    ctx.real_env_steps = collected["env_steps"]
    ctx.data_paths = [out / "data" / "round1"]
    ctx.stages.run("vae", lambda: _train_vae(ctx), inputs=ctx.data_ids(), folder=out / "vae")
    ctx.vae_params, ctx.vae_id = ctx.load("vae", "vae", vae.load, cfg)
    for r in range(1, cfg.rounds.rounds + 1):  # round 1 on random data, later ones on the agent's
        later = f"round {r}" if r == cfg.rounds.rounds else f"rounds {r}-{cfg.rounds.rounds}"
        if cfg.skips_round(r, None if ctx.best is None else ctx.best["real"]):
            ctx.stages.note(f"{later} skipped: the agent's real check reached "
                            f"evolve.stop_at={cfg.evolve.stop_at:g} ({ctx.best['real']:g})")
            break
        if r > 1 and not cfg.later_round_fits(ctx.real_env_steps):
            ctx.stages.note(f"{later} skipped: the run spent its rounds.budget={cfg.rounds.budget} real steps "
                            f"({ctx.real_env_steps}; Config.later_round_fits)")
            break
        _round(ctx, r)
    assert ctx.best is not None
    _write_agent_files(out, cfg, ctx.stages.done, ctx.best["round"], ctx.best["ctrl"], ctx.best["ctrl_id"])
    ev = ctx.stages.run("evaluate", lambda: _evaluate(ctx), inputs=_agent_id(ctx))
    summary = _summary(ctx, ev)
    run_dir.write_json(out / "summary.json", summary)
    return summary


def _agent_id(ctx: _Run) -> dict[str, Any]:
    best = ctx.best
    return {"vae": ctx.vae_id, "transition": best["m_id"], "controller": best["ctrl_id"]}


def _controller(out: Path, done: dict[str, Any], r: int) -> tuple[np.ndarray, str]:
    """Round r's best controller and its identity, from the evolve stage's record."""
    name = f"evolve_round{r}"
    identity = run_dir.stage_output(out, done, name, name)
    if not isinstance(done[name].get("controller"), list):
        raise RunDirError(f"{out / 'stages.json'} records no controller for {name}; start afresh with a new --out")
    ctrl = np.asarray(done[name]["controller"], np.float32)
    if checkpoint.digest(ctrl) != identity:
        raise RunDirError(f"{out / 'stages.json'}: the controller of {name} does not match its recorded hash; "
                          f"start afresh with a new --out")
    return ctrl, identity


def _write_agent_files(out: Path, cfg: Config, done: dict[str, Any], r: int, ctrl: np.ndarray, ctrl_id: str) -> None:
    """agent.json and controller.npy: the final agent (round r's M and controller), rewritten only
    when missing or different (a rerun repairs them from the stages' records)."""
    m_dir = "transition" if r == 1 else f"transition_round{r}"
    meta = run_dir.agent_record(out, cfg, done, r, m_dir, ctrl_id)
    try:
        same = json.loads((out / "agent.json").read_text()) == logs.finite_or_none(meta)
    except (OSError, ValueError, UnicodeDecodeError):
        same = False
    if not same:
        run_dir.write_json(out / "agent.json", meta)
    if run_dir.read_controller(out / "controller.npy", ctrl_id) is None:
        run_dir.save_npy(out / "controller.npy", ctrl)


def _repair_agent_files(out: Path, cfg: Config, stages: stages_lib.Stages) -> None:
    """A finished run's derived agent files, rewritten from the evolve stages' records if missing or
    damaged."""
    done = stages.done
    rounds = stages_lib.rounds_run(cfg, done)
    if not rounds:  # nothing to repair from (a summary written by other means)
        return
    for r in rounds:
        ctrl, ctrl_id = _controller(out, done, r)
        path = out / f"evolve_round{r}" / "controller.npy"
        if path.parent.is_dir() and run_dir.read_controller(path, ctrl_id) is None:
            run_dir.save_npy(path, ctrl)
    r = stages_lib.best_round(cfg, done)
    _write_agent_files(out, cfg, done, r, *_controller(out, done, r))


def _collect(ctx: _Run, r: int) -> dict[str, Any]:
    """Round 1: the recipe's random episodes (data.seed); round r > 1: the best agent so far, with
    rounds.action_noise random actions, for rounds.episodes episodes or until Config.collect_cap's rows."""
    cfg = ctx.cfg
    if r == 1:
        ds = collection.collect(jax.random.key(cfg.data.seed), cfg.data.episodes, max_steps=cfg.data.max_steps,
                                chunk_size=cfg.data.chunk_size, progress=ctx.progress, env=cfg.env)
    else:
        best = ctx.best
        params = {"vae": ctx.vae_params, "transition": best["m_params"], "controller": jnp.asarray(best["ctrl"])}
        ds = collection.collect(jax.random.fold_in(ctx.keys["rounds"], r), cfg.rounds.episodes, policy=rollout.agent_policy(cfg),
                              max_steps=cfg.data.max_steps, chunk_size=cfg.rounds.episodes,
                              episode_offset=r * 1_000_000, progress=ctx.progress,
                              max_rows=cfg.collect_cap(ctx.real_env_steps), params=params, env=cfg.env)
    path = ctx.out / "data" / f"round{r}"
    data_lib.save_dataset(ds, path, overwrite=True, env=cfg.env)
    return {**collected(ds, cfg.data.max_steps), "outputs": {f"data/round{r}": data_lib.identity(path)}}


def collected(ds: Any, max_steps: int) -> dict[str, Any]:
    """A collection's record: episodes (begun), rows = env_steps, and the mean return (the sum of
    its rewards) of the episodes that ran to their end; an episode cut by rounds.env_steps is
    counted in the steps but not in the mean."""
    episode, done = data_lib.column(ds, "episode"), data_lib.column(ds, "done").astype(bool)
    starts = np.flatnonzero(np.concatenate([[True], episode[1:] != episode[:-1]]))
    lengths = np.diff(np.append(starts, episode.size))
    returns = np.add.reduceat(data_lib.column(ds, "reward").astype(np.float64), starts)
    ended = done[starts + lengths - 1] | (lengths >= max_steps)
    whole = returns[ended] if ended.any() else returns
    return {"episodes": int(starts.size), "rows": int(episode.size), "env_steps": int(episode.size),
            "return_mean": float(whole.mean()), "cut": int((~ended).sum())}


def _train_vae(ctx: _Run) -> dict[str, Any]:
    arrays = run_dir.load_arrays(ctx.data_paths, ctx.cfg.env)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    params, info = vae.train(ctx.cfg, ctx.keys["vae"], {"frame": arrays["frame"], "stack_rows": index.stack_rows},
                             ctx.out / "vae", ctx.progress)
    real, recon, rows = vae.reconstructions(ctx.cfg.vae, params, arrays["frame"], index.stack_rows)
    plots.reconstruction_grid(real, recon, rows, ctx.out / "vae" / "reconstructions.png")
    plots.loss_curves(train.read_metrics(ctx.out / "vae"), ctx.out / "vae" / "loss.png")
    return {"steps_per_s": info["steps_per_s"], "final": info["final"], "outputs": {"vae": info["identity"]}}


def _encode(ctx: _Run, r: int, arrays: dict[str, Any], index: data_lib.EpisodeIndex,
            prev: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """latents_round{r}.npz: V's posteriors of every row so far (rows of earlier rounds come first
    and V is frozen, so only the new rows are encoded after `prev`, round r-1's)."""
    done = 0 if prev is None else len(prev["mean"])
    mean, logvar = vae.encode_all(ctx.cfg.vae, ctx.vae_params, arrays["frame"], index.stack_rows[done:])
    if prev is not None:
        mean, logvar = np.concatenate([prev["mean"], mean]), np.concatenate([prev["logvar"], logvar])
    name = f"latents_round{r}.npz"
    tmp = ctx.out / f".{name}.tmp.npz"
    np.savez(tmp, mean=mean, logvar=logvar)
    os.replace(tmp, ctx.out / name)
    return {"rows": len(mean), "outputs": {name: checkpoint.digest({"mean": mean, "logvar": logvar})}}


def _latents(ctx: _Run, r: int, arrays: dict[str, Any], index: data_lib.EpisodeIndex,
             prev: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], str]:
    """Round r's latents, checked against their stage's record; a damaged or changed file is
    derived data: encoded again (the stages built on it run again only if the result differs)."""
    name, stage = f"latents_round{r}.npz", f"encode_round{r}"
    inputs = {"vae": ctx.vae_id, **ctx.data_ids(), "previous": None if prev is None else ctx.lat_id}
    for _ in range(2):  # the second time, after encoding it again
        rec = ctx.stages.run(stage, lambda: _encode(ctx, r, arrays, index, prev), inputs=inputs)
        recorded = rec.get("outputs", {}).get(name)
        lat = None if recorded is None else run_dir.read_latents(ctx.out / name, recorded)
        if lat is not None:
            return lat, recorded
        ctx.stages.note(f"{name} is missing, damaged or changed; encoding it again")
        ctx.stages.forget(stage)
    raise RunDirError(f"{ctx.out / name} cannot be written and read back")


def _round(ctx: _Run, r: int) -> None:
    """One round of Ha's iterative procedure: (collect with the best agent,) encode, train or
    fine-tune M (and K), evolve C in M's dreams; the best agent is updated from its real checks."""
    out, stages = ctx.out, ctx.stages
    if r > 1:
        got = stages.run(f"collect_round{r}", lambda: _collect(ctx, r), inputs=_agent_id(ctx))
        ctx.real_env_steps += got["env_steps"]
        ctx.data_paths.append(out / "data" / f"round{r}")
    cfg = run_dir.round_config(ctx.cfg, stages.done, r)  # after the collection: M's steps may follow its rows
    arrays = run_dir.load_arrays(ctx.data_paths, ctx.cfg.env)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat, ctx.lat_id = _latents(ctx, r, arrays, index, ctx.latents)
    ctx.latents = lat
    m_arrays = transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)
    m_name = "transition" if r == 1 else f"transition_round{r}"
    stages.run(m_name, lambda: _train_m(ctx, cfg, r, m_arrays, m_name),
               inputs={"latents": ctx.lat_id, "init": ctx.m_id, **ctx.data_ids()}, folder=out / m_name)
    m_params, m_id = ctx.load(m_name, m_name, transition.load, cfg)
    ctx.m_params, ctx.m_id = m_params, m_id
    k_params, k_id = None, None
    if cfg.verifier.mode != "off":
        k_name = "verifier" if r == 1 else f"verifier_round{r}"
        stages.run(k_name, lambda: _train_k(ctx, cfg, r, m_arrays, m_params, k_name),
                   inputs={"latents": ctx.lat_id, "transition": m_id, **ctx.data_ids()}, folder=out / k_name)
        k_params, k_id = ctx.load(k_name, k_name, verifier.load, cfg)
    e_name = f"evolve_round{r}"
    inputs = {"vae": ctx.vae_id, "transition": m_id, "verifier": k_id, "latents": ctx.lat_id,
              "init": None if ctx.best is None else ctx.best["ctrl_id"]}
    evo = stages.run(e_name, lambda: _search(ctx, cfg, r, lat, m_params, k_params), inputs=inputs,
                     folder=out / e_name)
    ctrl, ctrl_id = _controller(out, stages.done, r)
    ctx.real_env_steps += evo["real_env_steps"]
    ctx.checks += evo["checks"]
    if ctx.best is None or evo["best_real"] >= ctx.best["real"]:  # ties go to the M trained on more data (stages.best_round)
        ctx.best = {"real": evo["best_real"], "round": r, "ctrl": ctrl, "ctrl_id": ctrl_id, "m_params": m_params,
                    "m_id": m_id, "k_params": k_params}


def _train_m(ctx: _Run, cfg: Config, r: int, m_arrays: dict[str, Any], m_name: str) -> dict[str, Any]:
    """Round r's M: trained (round 1) or fine-tuned from the latest round's M."""
    _, info = transition.train(cfg, jax.random.fold_in(ctx.keys["transition"], r), m_arrays, ctx.out / m_name,
                               ctx.progress, init_params=ctx.m_params)
    return {"steps_per_s": info["steps_per_s"], "final": info["final"], "outputs": {m_name: info["identity"]}}


def _train_k(ctx: _Run, cfg: Config, r: int, m_arrays: dict[str, Any], m_params: Any, k_name: str) -> dict[str, Any]:
    """Round r's K, against that round's M."""
    _, info = verifier.train(cfg, jax.random.fold_in(ctx.keys["verifier"], r), m_arrays, ctx.out / k_name,
                             ctx.progress, m_params=m_params)
    return {"steps_per_s": info["steps_per_s"], "final": info["final"], "outputs": {k_name: info["identity"]}}


def _search(ctx: _Run, cfg: Config, r: int, lat: dict[str, np.ndarray], m_params: Any, k_params: Any
            ) -> dict[str, Any]:
    """Round r's controller search in its M's dreams, from the best controller so far."""
    e_name = f"evolve_round{r}"
    world = checks.World(m_params=m_params, vae_params=ctx.vae_params, k_params=k_params,
                         starts=(jnp.asarray(lat["mean"]), jnp.asarray(lat["logvar"])))
    res = driver.evolve(cfg, jax.random.fold_in(ctx.keys["evolve"], r), world, ctx.out / e_name,
                        init_mean=None if ctx.best is None else ctx.best["ctrl"], progress=ctx.progress,
                        real_steps=cfg.budget_left(ctx.real_env_steps))
    best = np.asarray(res["best"], np.float32)
    if not np.isfinite(best).all():  # stored in stages.json, whose JSON has no NaN
        raise train.TrainingError(f"{e_name}: the controller search diverged (its best controller has "
                                  f"non-finite weights); delete {ctx.out / e_name} to search again")
    run_dir.save_npy(ctx.out / e_name / "controller.npy", best)
    return {"best_real": res["best_real"], "checks": res["checks"], "real_env_steps": res["real_env_steps"],
            "trainer": cfg.evolve.trainer, "generations": res["generations"],
            "imagined_steps": driver.imagined_steps(cfg, res["generations"], len(res["checks"])),
            "final_dream_mean": res["history"][-1]["dream_mean"], "controller": best.tolist(),
            "outputs": {e_name: checkpoint.digest(best)}}


def _evaluate(ctx: _Run) -> dict[str, Any]:
    """The final agent's real episodes, and the figures of the run."""
    cfg, best = ctx.cfg, ctx.best
    params = {"vae": ctx.vae_params, "transition": best["m_params"], "controller": jnp.asarray(best["ctrl"])}
    res = rollout.evaluate(cfg, params, ctx.keys["evaluate"])
    plots.dream_vs_real(ctx.checks, ctx.out / "dream_vs_real.png")
    # One real episode beside V's reconstructions and M's open-loop dream: its first steps are the
    # strip, the whole of it the video; imagined rollouts of the controller from the strip's latents.
    params = {**params, "verifier": best["k_params"]}
    k_episode, k_dreams = jax.random.split(jax.random.fold_in(ctx.keys["evaluate"], 99))
    rec = rollout.open_loop(cfg, params, k_episode, cfg.eval.max_steps)
    n = STRIP_STEPS
    plots.episode_strip(rec["real"][:n], rec["recon"][:n], rec["dreamed"][:n], ctx.out / "episode_strip.png")
    video.write(ctx.out / "episode.gif", video.frames(rec, names=video.action_names(cfg)))
    tmp = ctx.out / ".imagined_rollouts.tmp.npz"
    np.savez_compressed(tmp, **rollout.imagined_rollouts(cfg, params, k_dreams, rec["z"][:n]))
    os.replace(tmp, ctx.out / "imagined_rollouts.npz")
    return res


def solved(cfg: Config, ev: dict[str, Any]) -> bool | None:
    """Whether the evaluation `ev` reached the task's threshold (eval.solved_at); None where the task
    has none, or where eval.max_steps cut some episodes short of the task's step limit (their
    returns are not whole episodes')."""
    if cfg.eval.solved_at is None or ev.get("cut", 0):
        return None
    return bool(ev["return_mean"] >= cfg.eval.solved_at)


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
        "env": cfg.env,
        "solved": solved(cfg, ev),
        "real_env_steps": int(ctx.real_env_steps + ev["env_steps"]),
        "real_env_steps_training": int(ctx.real_env_steps),
        "learning_curve": stages_lib.learning_curve(cfg, stages.done),
        "trainer": cfg.evolve.trainer,
        "imagined_steps": stages_lib.imagined_steps(cfg, stages.done),
        "agent_round": ctx.best["round"],
        "dream_real_corr": stats.correlation([c["dream_return"] for c in ctx.checks],
                                             [c["real_return"] for c in ctx.checks]),
        "latent_kl": ev["latent_kl"],
        "wall_s": wall,
        "device": stages_lib.device_name(),
        "versions": stages_lib.versions(),
    }
    return logs.finite_or_none(summary)  # the same values in memory, on disk and on a rerun


def train_verifier(run: Path | str, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train K for a finished run that has none (RUN/verifier_added): against the final agent's M,
    on all the run's data, with the run's verifier settings (`steps` overrides the step count).
    Resumable; holds the run's lock. Returns what it wrote in done.json (steps, final metrics)."""
    run = Path(run)
    with run_dir.locked(run), interrupt.deferred():
        r = run_dir.load(run)
        if r.cfg.verifier.mode != "off":
            raise RunDirError(f"{run} trained its own verifier (verifier.mode={r.cfg.verifier.mode!r}); nothing to add")
        cfg = run_dir.with_k_steps(r.cfg, steps)
        out = run / run_dir.ADDED_VERIFIER
        # K is usable only once this run finishes: an interrupted one leaves no done.json (rerun to resume)
        (out / "done.json").unlink(missing_ok=True)
        key = jax.random.fold_in(run_dir.run_keys(cfg.seed)["verifier"], 0)  # rounds use 1, 2, ...
        _, info = verifier.train(cfg, key, r.arrays, out, progress, m_params=r.params["transition"])
        _, meta, _ = run_dir.read_agent_record(run)
        record = {"steps": cfg.verifier.train.steps, "final": logs.finite_or_none(info["final"]),
                  "identity": info["identity"], "m_identity": run_dir.final_m_identity(meta)}
        run_dir.write_json(out / "done.json", record)
    return record
