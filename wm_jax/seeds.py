"""Seeds as a batch axis: the whole recipe for many seeds in one run directory, each stage run over
all of them at once.

    summary = seeds.run(cfg, [0, 1, 2, 3], "runs/frugal-seeds")      # wm-jax run --seeds 0:4

Seed S is the run `wm-jax run --seed S` makes (its keys are run_dir.run_keys(S)), carried on a
leading axis of seeds: V, M and K train as one program each (train.Seeds: each seed its own key,
data, row count and step count); each round's controller searches are one batched program in which
every seed dreams in its own M, checks through its own V and stops on its own (stop_at, budget:
driver.search; a stopped seed costs nothing). Round 1's random data (data.seed) is the same for every seed: collected
once. The rounds follow each seed's own rules (Config.skips_round, rounds.budget); a seed whose
rounds ended stands still while the others go on. Later rounds' collections, the encoding and the
final evaluation run seed after seed, through one compiled program each.

A batched seed is an equivalent run of its seed, not always the identical one: batched programs may
round floats otherwise, and CMA-ES amplifies last bits (docs/RESULTS.md section 14).

OUT: config.json, seeds.json, stages.json (per-seed results in a record's "seeds" list), data/round1
(shared), data/round{r}/seed{S}, vae, transition*, verifier*, evolve_round{r} (a checkpoint of every
seed each), latents_round{r}.npz (LATENTS), seeds/{S}/ (config.json, summary.json, controller.npy:
`wm-jax report OUT` reads them), summary.json (each seed's figures and their aggregates).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import interrupt, logs, pipeline, report, run_dir, stats
from wm_jax import stages as stages_lib
from wm_jax.config import Config, ConfigError
from wm_jax.models import train, transition, vae, verifier
from wm_jax.presets import check_env
from wm_jax.run_dir import RunDirError
from wm_jax.search import checks, driver, rollout
from wm_jax.store import checkpoint, collection
from wm_jax.store import data as data_lib

SEEDS_FILE = "seeds.json"
LATENTS = ("mean", "logvar", "rows")  # latents_round{r}.npz of a batch: padded, with each seed's row count


def _take(tree: Any, i: Any) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of different lengths as one [seeds, longest, ...] array, each padded with its last row
    (rows past a seed's own count are never drawn: its count travels beside it)."""
    n = max(len(a) for a in arrays)
    return np.stack([np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)]) for a in arrays])


def map_batch(kind: str, seeds: int) -> int:
    """Seeds a training step vmaps together (train.Seeds.batch): all, but on a CPU V's convolutions
    one seed at a time (vmapped they are slower per seed)."""
    return 1 if kind == "vae" and jax.default_backend() == "cpu" else seeds


@dataclasses.dataclass
class _Batch:
    """What the rounds of a batch of seeds share; per-seed values on a leading axis (numpy on the host)."""

    cfg: Config
    out: Path
    seeds: list[int]
    stages: stages_lib.Stages
    keys: dict[str, jax.Array]  # one [seeds] key array per stream of run_dir.run_keys
    progress: bool
    vae_params: Any = None
    vae_id: Any = None
    m_params: Any = None  # the latest round's M of every seed
    m_id: Any = None
    latents: dict[str, np.ndarray] | None = None  # mean, logvar [seeds, rows, latent], rows [seeds]
    lat_id: Any = None
    data: list[list[Path]] = dataclasses.field(default_factory=list)  # each seed's datasets
    real: np.ndarray | None = None  # real steps spent on training, per seed
    best_real: np.ndarray | None = None  # the best agent's check (-inf before its first)
    best_round: np.ndarray | None = None  # its round (0 before the first)
    best_ctrl: np.ndarray | None = None  # [seeds, dims]
    rounds: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # r -> its M (every seed) and id

    @property
    def n(self) -> int:
        return len(self.seeds)

    def load(self, stage: str, folder: str, loader: Any, cfg: Config, count: int | None = None) -> tuple[Any, Any]:
        """A finished stage's parameters of `count` seeds (default: all), as it recorded them."""
        identity = run_dir.stage_output(self.out, self.stages.done, stage, folder)
        try:
            return loader(cfg, self.out / folder, identity, seeds=count or self.n), identity
        except checkpoint.Damaged as e:
            raise run_dir.damaged(self.out, stage, folder, e) from None

    def data_ids(self) -> dict[str, str]:
        """Every dataset's identity, checked against its collect stage's record."""
        names = [("data/round1", "collect")] + [(str(p.relative_to(self.out)), f"collect_{p.parent.name}")
                                                for paths in self.data for p in paths[1:]]
        return {name: run_dir.dataset_id(self.out, self.stages.done, stage, name) for name, stage in names}

    def agent(self, i: int) -> dict[str, Any]:
        """Seed i's best agent: V, its best round's M and its controller."""
        r = int(self.best_round[i])
        return {"vae": _take(self.vae_params, i), "transition": _take(self.rounds[r]["m"], i),
                "controller": jnp.asarray(self.best_ctrl[i])}

    def agent_ids(self) -> dict[str, Any]:
        return {"vae": self.vae_id, "rounds": [int(r) for r in self.best_round],
                "transition": {str(r): self.rounds[r]["m_id"] for r in sorted(set(int(x) for x in self.best_round) - {0})},
                "controllers": checkpoint.digest(self.best_ctrl) if self.best_ctrl is not None else None}


def _parse_seeds(seeds: Any) -> list[int]:
    if not (seeds := [int(s) for s in seeds]):
        raise ConfigError("--seeds names no seed")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(f"--seeds names seed {twice[0]} twice")
    return seeds


def _check_seeds(out: Path, seeds: list[int]) -> None:
    """seeds.json: written by the first run, the same seeds on every rerun."""
    path = out / SEEDS_FILE
    if path.exists():
        saved = run_dir.read_json(path, f"delete {out} to start afresh")
        if saved != seeds:
            raise RunDirError(f"{out} holds a batch of seeds {saved}, not {seeds}; rerun it with its own --seeds, "
                              f"or use a new --out")
        return
    run_dir.write_json(path, seeds)


def run(cfg: Config, seeds: Any, out: Path | str, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the recipe `cfg` for every seed of `seeds` in `out`, as a batch; returns the
    summary (also OUT/summary.json): each seed's figures, as a lone run's summary.json has them, and
    their aggregates over the seeds (wm_jax.report). Resumable as pipeline.run is: a rerun with the
    same arguments skips finished stages and resumes a training or search from its checkpoint."""
    seeds = _parse_seeds(seeds)
    check_env(cfg)
    cfg = dataclasses.replace(cfg, seed=seeds[0])
    out = run_dir.for_process(Path(out))
    with run_dir.locked(out), interrupt.deferred():
        pipeline.check_config(out, cfg)
        if not (out / SEEDS_FILE).exists() and (out / "stages.json").exists() and run_dir.read_stages(out):
            raise RunDirError(f"{out} holds a run of one seed (no {SEEDS_FILE}), not a batch; use a new --out")
        stages = stages_lib.Stages(out, progress)
        _check_seeds(out, seeds)
        keys = [run_dir.run_keys(s) for s in seeds]
        b = _Batch(cfg=cfg, out=out, seeds=seeds, stages=stages, progress=progress,
                   keys={name: jnp.stack([k[name] for k in keys]) for name in keys[0]})
        return _run(b)


def _run(b: _Batch) -> dict[str, Any]:
    cfg, out, stages = b.cfg, b.out, b.stages
    got = stages.run("collect", lambda: _collect_random(b))
    b.real = np.full(b.n, got["env_steps"], np.int64)
    b.data = [[out / "data" / "round1"] for _ in b.seeds]
    b.best_real, b.best_round = np.full(b.n, -np.inf), np.zeros(b.n, np.int64)
    stages.run("vae", lambda: _train_vae(b), inputs=b.data_ids(), folder=out / "vae")
    b.vae_params, b.vae_id = b.load("vae", "vae", vae.load, cfg)
    active = np.ones(b.n, bool)
    for r in range(1, cfg.rounds.rounds + 1):
        for i in np.flatnonzero(active):
            best = None if b.best_round[i] == 0 else float(b.best_real[i])
            if cfg.skips_round(r, best) or (r > 1 and not cfg.later_round_fits(int(b.real[i]))):
                active[i] = False
                stages.note(f"seed {b.seeds[i]}: rounds {r}-{cfg.rounds.rounds} skipped (its agent reached "
                            f"evolve.stop_at, or it spent rounds.budget)")
        if not active.any():
            break
        _round(b, r, active.copy())
    ev = stages.run("evaluate", lambda: _evaluate(b), inputs=b.agent_ids())
    return _summaries(b, ev)


def _collect_random(b: _Batch) -> dict[str, Any]:
    """Round 1's random episodes (data.seed): the same for every seed, collected once."""
    cfg = b.cfg
    ds = collection.collect(jax.random.key(cfg.data.seed), cfg.data.episodes, max_steps=cfg.data.max_steps,
                            chunk_size=cfg.data.chunk_size, progress=b.progress, env=cfg.env)
    path = b.out / "data" / "round1"
    data_lib.save_dataset(ds, path, overwrite=True, env=cfg.env)
    return {**pipeline.collected(ds, cfg.data.max_steps), "outputs": {"data/round1": data_lib.identity(path)}}


def _collect_agents(b: _Batch, r: int, active: np.ndarray) -> dict[str, Any]:
    """Round r's collection by every active seed's best agent (with rounds.action_noise), each
    capped by its own Config.collect_cap; one compiled program for every seed (parameters are
    arguments)."""
    cfg = b.cfg
    per_seed, outputs = [], {}
    for i, seed in enumerate(b.seeds):
        if not active[i]:
            per_seed.append(None)
            continue
        ds = collection.collect(jax.random.fold_in(b.keys["rounds"][i], r), cfg.rounds.episodes,
                                policy=rollout.agent_policy(cfg), max_steps=cfg.data.max_steps,
                                chunk_size=cfg.rounds.episodes, episode_offset=r * 1_000_000, progress=False,
                                max_rows=cfg.collect_cap(int(b.real[i])), params=b.agent(i), env=cfg.env)
        name = f"data/round{r}/seed{seed}"
        data_lib.save_dataset(ds, b.out / name, overwrite=True, env=cfg.env)
        per_seed.append(pipeline.collected(ds, cfg.data.max_steps))
        outputs[name] = data_lib.identity(b.out / name)
    return {"seeds": per_seed, "outputs": outputs}


def _train_vae(b: _Batch) -> dict[str, Any]:
    arrays = run_dir.load_arrays(b.data[0], b.cfg.env)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    _, info = vae.train(b.cfg, b.keys["vae"], {"frame": arrays["frame"], "stack_rows": index.stack_rows},
                        b.out / "vae", b.progress, seeds=train.Seeds(shared_data=True, batch=map_batch("vae", b.n)))
    return {"steps_per_s": info["steps_per_s"], "final": info["final"], "outputs": {"vae": info["identity"]}}


def _encode(b: _Batch, r: int, arrays: list[dict[str, Any]], active: np.ndarray) -> dict[str, Any]:
    """latents_round{r}.npz: each seed's V's posteriors of its rows so far (only the new rows are
    encoded; a seed whose rounds ended keeps round r-1's)."""
    prev = b.latents
    means, logvars = [], []
    for i in range(b.n):
        done = 0 if prev is None else int(prev["rows"][i])
        old = None if prev is None else (prev["mean"][i, :done], prev["logvar"][i, :done])
        if active[i]:
            index = data_lib.EpisodeIndex.from_columns(arrays[i]["episode"], arrays[i]["t"])
            m, lv = vae.encode_all(b.cfg.vae, _take(b.vae_params, i), arrays[i]["frame"], index.stack_rows[done:])
            old = (m, lv) if old is None else (np.concatenate([old[0], m]), np.concatenate([old[1], lv]))
        means.append(old[0])
        logvars.append(old[1])
    lat = {"mean": pad_stack(means), "logvar": pad_stack(logvars), "rows": np.asarray([len(m) for m in means], np.int32)}
    name = f"latents_round{r}.npz"
    tmp = b.out / f".{name}.tmp.npz"
    np.savez(tmp, **lat)
    os.replace(tmp, b.out / name)
    return {"rows": lat["rows"].tolist(), "outputs": {name: checkpoint.digest(lat)}}


def _latents(b: _Batch, r: int, arrays: list[dict[str, Any]], active: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    name, stage = f"latents_round{r}.npz", f"encode_round{r}"
    inputs = {"vae": b.vae_id, **b.data_ids(), "previous": None if b.latents is None else b.lat_id,
              "active": active.tolist()}
    for _ in range(2):  # the second time, after encoding it again
        rec = b.stages.run(stage, lambda: _encode(b, r, arrays, active), inputs=inputs)
        recorded = rec.get("outputs", {}).get(name)
        lat = None if recorded is None else run_dir.read_latents(b.out / name, recorded, LATENTS)
        if lat is not None:
            return lat, recorded
        b.stages.note(f"{name} is missing, damaged or changed; encoding it again")
        b.stages.forget(stage)
    raise RunDirError(f"{b.out / name} cannot be written and read back")


def _training_arrays(lat: dict[str, np.ndarray], arrays: list[dict[str, Any]]) -> dict[str, Any]:
    """M's and K's per-row training arrays of every seed, padded to one shape, with "rows"."""
    per_seed = []
    for i, a in enumerate(arrays):
        n = int(lat["rows"][i])
        index = data_lib.EpisodeIndex.from_columns(a["episode"], a["t"])
        per_seed.append(transition.training_arrays(lat["mean"][i, :n], lat["logvar"][i, :n], a, index))
    out = {k: pad_stack([np.asarray(s[k]) for s in per_seed]) for k in transition.DATA_KEYS}
    return {**out, "rows": lat["rows"]}


def _round(b: _Batch, r: int, active: np.ndarray) -> None:
    """Round r for the seeds `active` marks: (collect with each one's best agent,) encode, train
    or fine-tune M (and K), search C in the dreams. The others stand still and cost nothing: M, K
    and the searches run on the active seeds only (`idx`), written back into the batch's arrays."""
    cfg, out, stages = b.cfg, b.out, b.stages
    idx = np.flatnonzero(active)
    new_rows: list[int | None] = [None] * b.n
    if r > 1:
        got = stages.run(f"collect_round{r}", lambda: _collect_agents(b, r, active),
                         inputs={**b.agent_ids(), "active": active.tolist()})
        for i, g in enumerate(got["seeds"]):
            if g is not None:
                b.real[i] += g["env_steps"]
                b.data[i].append(out / "data" / f"round{r}" / f"seed{b.seeds[i]}")
                new_rows[i] = g["rows"]
    seed_cfgs = [cfg.for_round(r, new_rows[i]) if active[i] else None for i in range(b.n)]
    limits = np.asarray([c.transition.train.steps if c is not None else 0 for c in seed_cfgs])
    # the round's config: its searches' and M's settings, M's steps the most any seed trains
    rcfg = cfg.for_round(r, max((x for x in new_rows if x is not None), default=None))
    rcfg = dataclasses.replace(rcfg, transition=dataclasses.replace(
        rcfg.transition, train=dataclasses.replace(rcfg.transition.train, steps=int(limits.max()))))
    arrays = [run_dir.load_arrays(paths, cfg.env) for paths in b.data]
    b.latents, b.lat_id = _latents(b, r, arrays, active)
    m_arrays = _training_arrays(b.latents, arrays)
    del arrays
    m_name = "transition" if r == 1 else f"transition_round{r}"
    stages.run(m_name, lambda: _train_m(b, rcfg, r, _take(m_arrays, idx), m_name, limits[idx], idx),
               inputs={"latents": b.lat_id, "init": b.m_id, **b.data_ids(), "limits": limits.tolist()},
               folder=out / m_name)
    m_part, b.m_id = b.load(m_name, m_name, transition.load, rcfg, len(idx))
    b.m_params = m_part if b.m_params is None else jax.tree.map(lambda a, p: a.at[idx].set(p), b.m_params, m_part)
    k_part, k_id = None, None
    if cfg.verifier.mode != "off":
        k_name = "verifier" if r == 1 else f"verifier_round{r}"
        stages.run(k_name, lambda: _train_k(b, rcfg, r, _take(m_arrays, idx), m_part, k_name, idx),
                   inputs={"latents": b.lat_id, "transition": b.m_id, **b.data_ids(), "active": active.tolist()},
                   folder=out / k_name)
        k_part, k_id = b.load(k_name, k_name, verifier.load, rcfg, len(idx))
    b.rounds[r] = {"m": b.m_params, "m_id": b.m_id}
    e_name = f"evolve_round{r}"
    inputs = {"vae": b.vae_id, "transition": b.m_id, "verifier": k_id, "latents": b.lat_id,
              "init": None if b.best_ctrl is None else checkpoint.digest(b.best_ctrl), "active": active.tolist(),
              "real": b.real.tolist()}
    evo = stages.run(e_name, lambda: _search(b, rcfg, r, idx, m_part, k_part), inputs=inputs, folder=out / e_name)
    ctrls = _controllers(b, e_name)
    for i, rec in enumerate(evo["seeds"]):
        if rec is None:
            continue
        b.real[i] += rec["real_env_steps"]
        if b.best_round[i] == 0 or rec["best_real"] >= b.best_real[i]:  # ties go to the later round's M
            b.best_real[i], b.best_round[i] = rec["best_real"], r
            b.best_ctrl = np.array(ctrls) if b.best_ctrl is None else b.best_ctrl
            b.best_ctrl[i] = ctrls[i]


def _train_m(b: _Batch, rcfg: Config, r: int, m_arrays: dict[str, Any], m_name: str, limits: np.ndarray,
             idx: np.ndarray) -> dict[str, Any]:
    """Round r's M of the seeds idx (m_arrays and limits theirs): trained, or fine-tuned from their latest M."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, r))(b.keys["transition"][idx])
    init = None if b.m_params is None else _take(b.m_params, idx)
    _, info = transition.train(rcfg, keys, m_arrays, b.out / m_name, b.progress, init_params=init,
                               seeds=train.Seeds(shared_data=False, batch=map_batch("transition", len(idx))),
                               limits=limits)
    return {"steps_per_s": info["steps_per_s"], "final": info["final"], "outputs": {m_name: info["identity"]}}


def _train_k(b: _Batch, rcfg: Config, r: int, m_arrays: dict[str, Any], m_part: Any, k_name: str, idx: np.ndarray
             ) -> dict[str, Any]:
    """Round r's K of the seeds idx, each against its round-r M (m_part)."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, r))(b.keys["verifier"][idx])
    _, info = verifier.train(rcfg, keys, m_arrays, b.out / k_name, b.progress, m_params=m_part,
                             seeds=train.Seeds(batch=map_batch("verifier", len(idx))))
    return {"steps_per_s": info["steps_per_s"], "final": info["final"], "outputs": {k_name: info["identity"]}}


def _search(b: _Batch, rcfg: Config, r: int, idx: np.ndarray, m_part: Any, k_part: Any) -> dict[str, Any]:
    """Round r's controller searches of the seeds idx as one batched program, each seed in its own
    world (its round-r M, m_part), from its own best controller, stopping at its own stop_at and
    budget. The stage records a controller for every seed (a left-out seed keeps its best)."""
    e_name = f"evolve_round{r}"
    world = checks.World(m_params=m_part, vae_params=_take(b.vae_params, idx), k_params=k_part,
                         starts=(jnp.asarray(b.latents["mean"][idx]), jnp.asarray(b.latents["logvar"][idx])),
                         rows=jnp.asarray(b.latents["rows"][idx]), cells=True)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, r))(b.keys["evolve"][idx])
    hp = _stack([rcfg.hyper()] * len(idx))
    budget = None if rcfg.rounds.budget is None else [rcfg.budget_left(int(b.real[i])) for i in idx]
    init = None if b.best_ctrl is None else jnp.asarray(b.best_ctrl[idx])
    res = dict(zip(idx.tolist(), driver.search(rcfg, keys, world, b.out / e_name, hp, init, b.progress, batched=True,
                                               real_steps=budget)))
    ctrls = np.stack([np.asarray(res[i]["best"], np.float32) if i in res else b.best_ctrl[i] for i in range(b.n)])
    if not np.isfinite(ctrls[idx]).all():
        raise train.TrainingError(f"{e_name}: a controller search diverged (non-finite weights); delete "
                                  f"{b.out / e_name} to search again")
    run_dir.save_npy(b.out / e_name / "controllers.npy", ctrls)
    per_seed = [None if i not in res else {
        "best_real": res[i]["best_real"], "checks": res[i]["checks"], "real_env_steps": res[i]["real_env_steps"],
        "generations": res[i]["generations"],
        "imagined_steps": driver.imagined_steps(rcfg, res[i]["generations"], len(res[i]["checks"])),
        "final_dream_mean": res[i]["history"][-1]["dream_mean"] if res[i]["history"] else None}
        for i in range(b.n)]
    return {"seeds": per_seed, "controllers": ctrls.tolist(), "outputs": {e_name: checkpoint.digest(ctrls)}}


def _controllers(b: _Batch, e_name: str) -> np.ndarray:
    """A search stage's controllers [seeds, dims], checked against its recorded hash."""
    identity = run_dir.stage_output(b.out, b.stages.done, e_name, e_name)
    ctrls = np.asarray(b.stages.done[e_name].get("controllers"), np.float32)
    if checkpoint.digest(ctrls) != identity:
        raise RunDirError(f"{b.out / 'stages.json'}: the controllers of {e_name} do not match their recorded hash; "
                          f"start afresh with a new --out")
    return ctrls


def _evaluate(b: _Batch) -> dict[str, Any]:
    """Every seed's final agent in eval.episodes real episodes (its own evaluation key)."""
    out = []
    for i in range(b.n):
        ev = rollout.evaluate(b.cfg, b.agent(i), b.keys["evaluate"][i])
        out.append({k: v for k, v in ev.items() if k != "latents"})
    return {"seeds": out}


def _seed_view(done: dict[str, Any], i: int) -> dict[str, Any]:
    """Seed i's records as a lone run's stages.json has them (for its learning curve)."""
    view = {}
    for name, rec in done.items():
        if isinstance(rec.get("seeds"), list):
            if rec["seeds"][i] is not None:
                view[name] = rec["seeds"][i]
        else:
            view[name] = rec
    return view


def _summaries(b: _Batch, ev: dict[str, Any]) -> dict[str, Any]:
    """Each seed's summary (OUT/seeds/{S}: summary.json as a lone run writes it, with the batch's
    stage times divided among its seeds, config.json and controller.npy) and the batch's."""
    cfg, done = b.cfg, b.stages.done
    wall = {name: rec["wall_s"] / b.n for name, rec in done.items()}
    wall["total"] = float(sum(wall.values()))
    rows = []
    for i, seed in enumerate(b.seeds):
        view = _seed_view(done, i)
        e = ev["seeds"][i]
        curve = stages_lib.learning_curve(cfg, view)
        chk = [p for p in curve if p["source"] == "check"]
        summary = logs.finite_or_none({
            "preset": cfg.preset, "seed": seed, "real_return_mean": e["return_mean"],
            "real_return_std": e["return_std"], "real_return_min": e["return_min"], "real_episodes": e["episodes"],
            "env": cfg.env, "solved": pipeline.solved(cfg, e), "real_env_steps": int(b.real[i] + e["env_steps"]),
            "real_env_steps_training": int(b.real[i]), "learning_curve": curve, "trainer": cfg.evolve.trainer,
            "imagined_steps": stages_lib.imagined_steps(cfg, view), "agent_round": int(b.best_round[i]),
            "dream_real_corr": stats.correlation([c["dream_return"] for c in chk], [c["real_return"] for c in chk]),
            "latent_kl": e["latent_kl"], "wall_s": wall, "batch": {"seeds": b.seeds, "run": str(b.out)},
            "device": stages_lib.device_name(), "versions": stages_lib.versions()})
        folder = b.out / "seeds" / str(seed)
        folder.mkdir(parents=True, exist_ok=True)
        run_dir.write_config(folder, dataclasses.replace(cfg, seed=seed))
        run_dir.save_npy(folder / "controller.npy", b.best_ctrl[i])
        run_dir.write_json(folder / "summary.json", summary)
        rows.append(report.row(folder))
    try:
        agg = report.aggregate(rows, cfg.rounds.budget)
    except report.ReportError as e:  # rliable is the analysis extra's: the seeds' figures stand without it
        b.stages.note(str(e))
        agg = None
    summary = logs.finite_or_none({"seeds": b.seeds, "preset": cfg.preset, "env": cfg.env, "aggregate": agg,
                                   "per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
                                   "wall_s": {name: rec["wall_s"] for name, rec in done.items()},
                                   "device": stages_lib.device_name(), "versions": stages_lib.versions()})
    run_dir.write_json(b.out / "summary.json", summary)
    return summary
