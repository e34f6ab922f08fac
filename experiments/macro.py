"""Macro-actions (issue 17): controllers that pick pairs of moves, evolved in two kinds of macro dreams.

    python experiments/macro.py RUN [RUN ...] [--horizons 25 50 100] [--generations N] [--population 64]
        [--rollouts 16] [--episodes 100] [--k-steps N] [--strategy sep_cma_es|cma_es] [--out experiments/results]
    python experiments/macro.py RUN --report   (only redraw macro.md and macro.png from OUT/macro.json)

For each finished run (one per seed), with the macro set wm_jax.search.macro.MACROS (LL, LR, RL, RR):
- macro-M: an M with 4 action inputs trained from scratch on the run's latents (every round's data)
  as macro.training_arrays, for as many steps as the run's final M got in all (round 1 plus the
  fine-tuning round); RUN/macro/transition (resumable);
- K per style (wm_jax.models.verifier.train, the run's verifier settings but --k-steps steps, default 500 of
  the cpu preset's 1,000, for time; 0 keeps the run's): for "twice" against
  the run's final M on the primitive rows (as `wm-jax train-verifier` does), for "macro_m" against
  macro-M on the macro rows (its one-hot has the 4 macros: VerifierConfig.actions, set by
  macro.style_config); RUN/macro/k_twice_STEPS, RUN/macro/k_macro_m_STEPS;
- per style and horizon H: a linear macro controller on [z, h] (Ha's C, 4 outputs) evolved with
  evosax in H-macro-step dreams from stored posteriors (dream.draw_starts), fitness the mean
  dream return over --rollouts dreams with common random numbers, one jitted generation; the
  final search mean is the controller;
- per controller: --episodes real episodes (up to 500 primitive steps), and from the same start
  states (each real episode's first latent, sampled from its posterior) as many dreams of 100
  macro steps: episode length and return imagined vs real within the first 25, 50 and 100 macro
  steps, and per macro step k the latents' mean and spread (averaged over dimensions) and the KL
  between diagonal Gaussians fitted to the real and the imagined latents at step k
  (KL(real || imagined), summed over dimensions; reported where >= MIN_ALIVE of both are alive);
- drift per macro step (wm_jax.search.drift.measure, open loop from teacher-forced states along held-out
  agent episodes' moves, 20 episodes, seed 1000 as experiments/mitigations.py): "twice" steps the
  primitive M 2k times, "macro_m" macro-M k times along the same pairs; latent MSE, KL, K's
  confidence (for "twice" the mean of the macro's two transitions).
Writes OUT/macro.json, macro.md, macro.png. A seed's results are kept in RUN/macro/result.json and
reused when rerun with the same settings.

The search strategy: evosax's full CMA-ES (--strategy cma_es, wm_jax.search.evolve's) decomposes a
1,284 x 1,284 covariance every generation: measured on this loaded 2-core machine, 3.0 s a
generation for CMA-ES alone (6.1 s for one jnp.linalg.eigh), against 0.03 s for evosax's
Sep_CMA_ES (diagonal covariance, Ros & Hansen 2008) with the same ask / tell / std_init; the
default is sep_cma_es so that the dreams, not the strategy, take the time.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import results_doc  # experiments/, on sys.path when a script runs
from evosax.algorithms import CMA_ES, Sep_CMA_ES

from wm_jax import logs, run_dir, stats
from wm_jax.models import controller, transition, verifier
from wm_jax.search import drift, macro, rollout

K_REPORT = (1, 10, 25, 50, 100)
CAPS = (25, 50, 100)
MAX_K = 100
MIN_ALIVE = 10  # fewer live episodes at a step than this: no latent statistics there
STRATEGIES = {"cma_es": CMA_ES, "sep_cma_es": Sep_CMA_ES}
REAL_MACRO_STEPS = 250  # CartPole-v1's 500 primitive steps


def _log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 9, 10, 11, 12))
def _generation(strategy, population, dims, cfg, hp, es_state, key, m_params, starts, rollouts, horizon, style,
                macros):
    """One search generation: ask, score every candidate in the macro dreams, tell (negated: evosax minimizes)."""
    es = STRATEGIES[strategy](population_size=population, solution=jnp.zeros((dims,), jnp.float32))
    es_params = es.default_params.replace(std_init=jnp.asarray(hp["evolve"]["sigma"], jnp.float32))
    key_ask, key_eval, key_tell = jax.random.split(key, 3)
    pop, es_state = es.ask(key_ask, es_state, es_params)
    returns = macro.scores(cfg, hp, key_eval, m_params, pop, *starts, rollouts, horizon, style, macros)
    es_state, _ = es.tell(key_tell, pop, -returns, es_state, es_params)
    return es_state, jnp.mean(returns), jnp.max(returns)


def evolve(cfg, m_params, starts, horizon, style, args, key) -> tuple[np.ndarray, list]:
    """The search mean after args.generations generations, and the per-generation (mean, max) dream return."""
    dims = controller.num_params(cfg.controller, starts[0].shape[-1], cfg.transition.hidden)
    es = STRATEGIES[args.strategy](population_size=args.population, solution=jnp.zeros((dims,), jnp.float32))
    hp = cfg.hyper()
    es_params = es.default_params.replace(std_init=jnp.asarray(hp["evolve"]["sigma"], jnp.float32))
    key_init, key_run = jax.random.split(key)
    state = es.init(key_init, jnp.zeros((dims,), jnp.float32), es_params)
    state = jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), state)  # no weak types (one compile)
    history = []
    for g in range(args.generations):
        state, mean_r, max_r = _generation(args.strategy, args.population, dims, cfg.static(), hp, state,
                                           jax.random.fold_in(key_run, g), m_params, starts, args.rollouts, horizon,
                                           style, macro.MACROS)
        history.append((float(mean_r), float(max_r)))
    return np.asarray(state.mean), history


def _fitted_kl(real: np.ndarray, im: np.ndarray) -> float:
    """KL(N_real || N_imagined) between diagonal Gaussians fitted to two samples [n, latent], summed over dims."""
    mr, vr = real.mean(0), real.var(0) + 1e-6
    mi, vi = im.mean(0), im.var(0) + 1e-6
    return float(np.sum(0.5 * (np.log(vi / vr) + (vr + (mr - mi) ** 2) / vi - 1.0)))


def imagined_vs_real(real: dict, im: dict, key) -> dict:
    """Episode statistics and per-step latent statistics of dreams and real episodes from the same starts."""
    valid, alive = np.asarray(real["valid"]), np.asarray(im["alive"])
    z_real = np.asarray(stats.gaussian_sample(key, jnp.asarray(real["latent_mean"][:, :MAX_K + 1]),
                                              jnp.asarray(real["latent_logvar"][:, :MAX_K + 1])))
    z_im = np.asarray(im["z"])
    out = {}
    for cap in CAPS:
        out[f"real_length@{cap}"] = float(valid[:, :cap].sum(1).mean())
        out[f"imagined_length@{cap}"] = float(alive[:, :cap].sum(1).mean())
        out[f"real_return@{cap}"] = float(np.asarray(real["reward"])[:, :cap].sum(1).mean())
        out[f"imagined_return@{cap}"] = float(np.asarray(im["reward"])[:, :cap].sum(1).mean())
    per_k = {name: [] for name in ("real_mean", "imagined_mean", "real_spread", "imagined_spread", "kl", "mean_gap",
                                   "kl_floor", "real_alive", "imagined_alive")}
    for k in range(1, MAX_K + 1):
        r, i = valid[:, k] > 0, alive[:, k] > 0
        per_k["real_alive"].append(int(r.sum()))
        per_k["imagined_alive"].append(int(i.sum()))
        ok = r.sum() >= MIN_ALIVE and i.sum() >= MIN_ALIVE
        zr, zi = z_real[r, k], z_im[i, k]
        per_k["real_mean"].append(float(zr.mean()) if r.sum() >= MIN_ALIVE else None)
        per_k["imagined_mean"].append(float(zi.mean()) if i.sum() >= MIN_ALIVE else None)
        per_k["real_spread"].append(float(zr.std(0).mean()) if r.sum() >= MIN_ALIVE else None)
        per_k["imagined_spread"].append(float(zi.std(0).mean()) if i.sum() >= MIN_ALIVE else None)
        per_k["kl"].append(_fitted_kl(zr, zi) if ok else None)
        # the estimator's own floor: the same KL between two halves of the real latents (64 dims from
        # few samples is biased upwards even for one distribution)
        half = np.flatnonzero(r)
        per_k["kl_floor"].append(_fitted_kl(z_real[half[0::2], k], z_real[half[1::2], k])
                                 if half.size >= 2 * MIN_ALIVE else None)
        per_k["mean_gap"].append(float(np.sqrt(np.mean((zr.mean(0) - zi.mean(0)) ** 2))) if ok else None)
    out["per_k"] = per_k  # index k - 1
    return out


def _drift(cfg, params, held, style, k_params) -> dict:
    """Drift per macro step k = 0..MAX_K along the held-out episodes (see the module docstring)."""
    key = jax.random.key(7)
    if style == "twice":
        d = drift.measure(cfg, key, {"vae": params["vae"], "transition": params["transition"], "verifier": k_params},
                          drift.pad_episodes(held), max_k=2 * MAX_K, stride=50, decode_pairs=0)
        conf = d["confidence"]
        out = {"latent_mse": d["latent_mse"][0::2], "kl": d["kl"][0::2], "count": d["count"][0::2],
               "confidence": [None] + [None if conf[2 * k] is None or conf[2 * k - 1] is None
                                       else 0.5 * (conf[2 * k] + conf[2 * k - 1]) for k in range(1, MAX_K + 1)]}
    else:
        index = types.SimpleNamespace(is_first=held["is_first"], is_last=held["is_last"])
        rows = macro.training_arrays(held["mean"], held["logvar"], held, index, macro.MACROS)
        d = drift.measure(cfg, key, {"vae": params["vae"], "transition": params["transition"], "verifier": k_params},
                          drift.pad_episodes(rows), max_k=MAX_K, stride=25, decode_pairs=0)
        out = {name: d[name] for name in ("latent_mse", "kl", "count", "confidence")}
    out["rollouts"] = d["rollouts"]
    return out


def _settings(args) -> dict:
    return {"horizons": list(args.horizons), "generations": args.generations, "population": args.population,
            "rollouts": args.rollouts, "episodes": args.episodes, "k_steps": args.k_steps, "strategy": args.strategy,
            "macros": [list(m) for m in macro.MACROS]}


def _seed(run: Path, args) -> dict:
    cached = run / "macro" / "result.json"
    if cached.exists():
        res = json.loads(cached.read_text())
        if res.get("settings") == _settings(args):
            _log(f"{run}: reusing {cached} (same settings)")
            return res
    t_seed = time.time()
    timing = {}
    t = time.time()
    r = run_dir.load(run)
    cfg, params, arrays = r.cfg, r.params, r.arrays
    # Ha's linear C on [z, h]; the run's own controller kind (an MLP for the cpu preset) has too
    # many parameters for a CMA-ES search of this size
    base = dataclasses.replace(cfg, controller=dataclasses.replace(cfg.controller, kind="linear"),
                               verifier=dataclasses.replace(cfg.verifier, mode="off"))
    if args.k_steps:
        base = dataclasses.replace(base, verifier=dataclasses.replace(
            base.verifier, train=dataclasses.replace(base.verifier.train, steps=args.k_steps)))
    cfgs = {s: macro.style_config(base, s, macro.MACROS) for s in macro.STYLES}
    index = types.SimpleNamespace(is_first=arrays["is_first"], is_last=arrays["is_last"])
    m_rows = macro.training_arrays(arrays["mean"], arrays["logvar"], arrays, index, macro.MACROS)
    timing["load"] = time.time() - t

    # macro-M: as many steps as the run's final M (round 1 + the fine-tuning rounds that ran, as
    # their stages recorded them: a skipped round trained none, and rounds.transition_rows_per_step
    # sets a round's steps from its data)
    t = time.time()
    done = run_dir.read_stages(run)
    steps = sum(done[m]["outputs"][m]["step"] for m in ["transition"] + [f"transition_round{r}" for r in range(
        2, cfg.rounds.rounds + 1)] if m in done)
    mcfg = cfgs["macro_m"]
    mcfg = dataclasses.replace(mcfg, transition=dataclasses.replace(
        mcfg.transition, train=dataclasses.replace(mcfg.transition.train, steps=steps)))
    _log(f"seed {cfg.seed}: macro-M, {steps} steps on {len(m_rows['action'])} macro rows")
    _, m_info = transition.train(mcfg, jax.random.key(cfg.seed + 3000), m_rows, run / "macro" / "transition",
                                 progress=False)
    macro_m = transition.load(mcfg, run / "macro" / "transition")
    timing["macro_m_train"] = time.time() - t
    m_params = {"twice": params["transition"], "macro_m": macro_m}

    t = time.time()
    k_params, k_info = {}, {}
    for style, rows in (("twice", arrays), ("macro_m", m_rows)):
        _log(f"seed {cfg.seed}: K for {style}, {cfgs[style].verifier.train.steps} steps")
        k_dir = run / "macro" / f"k_{style}_{cfgs[style].verifier.train.steps}"
        _, info = verifier.train(cfgs[style], jax.random.key(cfg.seed + 4000), rows, k_dir, progress=False, m_params=m_params[style])
        k_params[style] = verifier.load(cfgs[style], k_dir)
        k_info[style] = logs.finite_or_none(info["final"])
    timing["k_train"] = time.time() - t

    t = time.time()
    held = rollout.collect_encoded(cfg, params, "agent", 20, 1000)
    drifts = {s: _drift(cfgs[s], {"vae": params["vae"], "transition": m_params[s]}, held, s, k_params[s])
              for s in macro.STYLES}
    timing["drift"] = time.time() - t
    for s in macro.STYLES:
        _log(f"seed {cfg.seed}: drift {s}: " + ", ".join(
            f"k={k}: mse {drifts[s]['latent_mse'][k]}, kl {drifts[s]['kl'][k]}, conf {drifts[s]['confidence'][k]}"
            for k in K_REPORT if drifts[s]["latent_mse"][k] is not None))

    starts = (jnp.asarray(arrays["mean"]), jnp.asarray(arrays["logvar"]))
    controllers = {}
    timing["evolve"], timing["evaluate"] = 0.0, 0.0
    for style in macro.STYLES:
        scfg = cfgs[style]
        agent = {"vae": params["vae"], "transition": m_params[style]}
        controllers[style] = {}
        for h in args.horizons:
            t = time.time()
            key = jax.random.fold_in(jax.random.key(cfg.seed + 5000), h)
            ctrl, history = evolve(scfg, m_params[style], starts, h, style, args, key)
            timing["evolve"] += time.time() - t
            t = time.time()
            real = jax.device_get(macro.run_episodes(scfg, {**agent, "controller": jnp.asarray(ctrl)},
                                                     jax.random.key(cfg.seed + 6000), args.episodes,
                                                     REAL_MACRO_STEPS, style))
            key_s, key_d, key_z = jax.random.split(jax.random.key(cfg.seed + 7000), 3)
            z0 = stats.gaussian_sample(key_s, jnp.asarray(real["latent_mean"][:, 0]),
                                       jnp.asarray(real["latent_logvar"][:, 0]))
            im = jax.device_get(macro.dreams(scfg, key_d, m_params[style], jnp.asarray(ctrl), z0, MAX_K + 1, style))
            returns = np.asarray(real["return"], np.float64)
            res = {
                "dream_return_last_gen": history[-1][0], "dream_max_last_gen": history[-1][1],
                "dream_curve": [round(x[0], 3) for x in history],
                "real_return_mean": float(returns.mean()), "real_return_std": float(returns.std()),
                "real_return_min": float(returns.min()), "real_length_mean": float(np.mean(real["length"])),
                "macro_use": np.bincount(np.asarray(real["macro"])[np.asarray(real["valid"]) > 0],
                                         minlength=len(macro.MACROS)).tolist(),
                "imagined_vs_real": imagined_vs_real(real, im, key_z),
            }
            timing["evaluate"] += time.time() - t
            controllers[style][str(h)] = res
            ivr = res["imagined_vs_real"]
            _log(f"seed {cfg.seed} {style} H={h}: dream {history[-1][0]:.1f} (first gen {history[0][0]:.1f}), "
                 f"real {res['real_return_mean']:.1f} +- {res['real_return_std']:.1f} (min {res['real_return_min']:.0f}); "
                 f"length@100 imagined {ivr['imagined_length@100']:.1f} vs real {ivr['real_length@100']:.1f}; "
                 "KL " + ", ".join(f"k={k}: {ivr['per_k']['kl'][k - 1]}" for k in K_REPORT))
    res = {"run": str(run), "seed": cfg.seed, "settings": _settings(args), "wall_s": time.time() - t_seed,
           "timing_s": timing, "macro_m": {"steps": steps, "rows": len(m_rows["action"]),
                                           "final": logs.finite_or_none(m_info["final"])},
           "k": k_info, "drift": drifts, "controllers": controllers}
    run_dir.write_json(cached, res)
    return res


def _f(x, nd=1):
    return results_doc.fmt(x, nd)


def _ms(values, nd=1):
    return results_doc.mean_std(values, nd)


def tables(seeds: list[dict], horizons) -> str:
    L = []
    L += ["### Real return of the macro controllers (100 episodes, up to 500 primitive steps)", "",
          ("| dream style | horizon (macro steps) | real return, mean +- spread over seeds | per seed: mean +- std (min) | "
          "real length (primitive steps) | dream return (last generation) |"), "|---|---|---|---|---|---|"]
    for s in macro.STYLES:
        for h in horizons:
            cs = [x["controllers"][s][str(h)] for x in seeds]
            per = ", ".join(f"s{x['seed']}: {c['real_return_mean']:.1f} +- {c['real_return_std']:.1f} "
                            f"({c['real_return_min']:.0f})" for x, c in zip(seeds, cs))
            L.append(f"| {s} | {h} | {_ms([c['real_return_mean'] for c in cs])} | {per} | "
                     f"{_ms([c['real_length_mean'] for c in cs])} | {_ms([c['dream_return_last_gen'] for c in cs])} |")
    L += ["", "### Imagined vs real from the same start states (mean over episodes; mean +- spread over seeds)", "",
          ("Lengths in macro steps and returns within the first 25 / 50 / 100 macro steps; "
          "the dream's reward is M's reward head (about 1 per primitive step)."), "",
          ("| dream style | horizon | length@25 imagined / real | length@100 imagined / real | return@25 imagined / real | "
          "return@50 imagined / real | return@100 imagined / real |"), "|---|---|---|---|---|---|---|"]
    for s in macro.STYLES:
        for h in horizons:
            iv = [x["controllers"][s][str(h)]["imagined_vs_real"] for x in seeds]
            cells = []
            for name, cap in (("length", 25), ("length", 100), ("return", 25), ("return", 50), ("return", 100)):
                cells.append(f"{_ms([v[f'imagined_{name}@{cap}'] for v in iv])} / {_ms([v[f'real_{name}@{cap}'] for v in iv])}")
            L.append(f"| {s} | {h} | " + " | ".join(cells) + " |")
    L += ["", ("### Per-step latent match: KL(real || imagined) between diagonal Gaussians fitted at macro step k "
          "(nats, summed over 64 dims), and the latents' spread imagined / real (std over episodes, mean over dims)"), "",
          ("| dream style | horizon | KL k=1 | k=10 | k=25 | k=50 | k=100 | floor (real half vs half) k=1 | k=25 | "
           "spread k=25 imagined / real | spread k=100 imagined / real | mean gap k=100 (RMS over dims) |"),
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in macro.STYLES:
        for h in horizons:
            pk = [x["controllers"][s][str(h)]["imagined_vs_real"]["per_k"] for x in seeds]
            kl = " | ".join(_ms([p["kl"][k - 1] for p in pk]) for k in K_REPORT)
            sp = " | ".join(f"{_ms([p['imagined_spread'][k - 1] for p in pk], 2)} / {_ms([p['real_spread'][k - 1] for p in pk], 2)}"
                            for k in (25, 100))
            floor = " | ".join(_ms([p["kl_floor"][k - 1] for p in pk]) for k in (1, 25))
            L.append(f"| {s} | {h} | {kl} | {floor} | {sp} | "
                     f"{_ms([p['mean_gap'][99] for p in pk], 2)} |")
    L += ["", "### Drift along held-out agent episodes (open loop from teacher-forced states; k in macro steps = 2k moves)",
          "", ("| dream style | latent MSE k=1 | k=10 | k=25 | k=50 | k=100 | KL k=1 | k=10 | k=25 | k=50 | k=100 | "
          "K conf k=1 | k=10 | k=25 | k=50 | k=100 |"), "|---|" + "---|" * 15]
    for s in macro.STYLES:
        ds = [x["drift"][s] for x in seeds]
        row = [" | ".join(_ms([d[m][k] for d in ds], nd) for k in K_REPORT)
               for m, nd in (("latent_mse", 3), ("kl", 1), ("confidence", 2))]
        L.append(f"| {s} | " + " | ".join(row) + " |")
    L += ["", "Per seed: drift latent MSE at k = 25 / 50 / 100", "", ("| seed | dream style | MSE k=25 | k=50 | k=100 | "
          "KL k=100 | K conf k=100 | rollouts (count at k=100) |"), "|---|---|---|---|---|---|---|---|"]
    for x in seeds:
        for s in macro.STYLES:
            d = x["drift"][s]
            L.append(f"| {x['seed']} | {s} | {_f(d['latent_mse'][25], 3)} | {_f(d['latent_mse'][50], 3)} | "
                     f"{_f(d['latent_mse'][100], 3)} | {_f(d['kl'][100])} | {_f(d['confidence'][100], 2)} | "
                     f"{d['rollouts']} ({d['count'][100]}) |")
    return "\n".join(L) + "\n"


def plot(seeds: list[dict], horizons, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(curves):
        arr = np.array([[np.nan if v is None else v for v in c] for c in curves], float)
        with warnings.catch_warnings():  # steps no seed reaches stay NaN (not drawn)
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(arr, axis=0)

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    k = np.arange(MAX_K + 1)
    for s in macro.STYLES:
        for i, m in enumerate(("latent_mse", "kl", "confidence")):
            a = ax.flat[i]
            a.plot(k, mean_curve([x["drift"][s][m] for x in seeds]), label=s)
            a.set_title(f"drift: {m} (mean over seeds)")
            a.set_xlabel("macro steps k")
        for h in horizons:
            c = mean_curve([x["controllers"][s][str(h)]["imagined_vs_real"]["per_k"]["kl"] for x in seeds])
            ax.flat[3].plot(k[1:], c, label=f"{s}, H={h}")
    ax.flat[3].set_title("imagined vs real: KL(real || imagined) of fitted Gaussians")
    ax.flat[3].set_xlabel("macro steps k")
    ax.flat[3].set_yscale("log")
    for a in ax.flat:
        a.legend(fontsize=7)
    results_doc.save_figure(fig, path, 90)


def main() -> None:
    p = results_doc.runs_parser(__doc__)
    p.add_argument("--horizons", nargs="+", type=int, default=[25, 50, 100])
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--k-steps", type=int, default=500, help="K's training steps (0: the run's own, 1,000 on the cpu preset)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="sep_cma_es")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--report", action="store_true", help="only redraw OUT/macro.md and macro.png from OUT/macro.json")
    args = p.parse_args()
    if args.report:
        _report(json.loads((args.out / "macro.json").read_text()), args.out)
        return
    for run in args.runs:
        if not (run / "agent.json").exists():
            p.error(f"{run}: not a finished run (no agent.json)")
    if max(args.horizons) > MAX_K or min(args.horizons) < 1:
        p.error(f"--horizons must be in [1, {MAX_K}]")
    t0 = time.time()
    seeds = [_seed(run, args) for run in args.runs]
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    saved = {"command": command, "wall_s": wall, "seed_wall_s": [s["wall_s"] for s in seeds],
             "machine": "2-core x86_64 CPU", "jax": jax.__version__, "settings": _settings(args), "seeds": seeds}
    run_dir.write_json(args.out / "macro.json", saved)
    print(_report(saved, args.out))
    _log(f"done in {wall / 60:.1f} min")


def _report(saved: dict, out: Path) -> str:
    """OUT/macro.md and macro.png from macro.json's record."""
    horizons = saved["settings"]["horizons"]
    md = tables(saved["seeds"], horizons)
    (out / "macro.md").write_text(f"`{saved['command']}` ({saved['wall_s'] / 60:.1f} min, {saved['machine']}, "
                                  f"jax {saved['jax']})\n\n" + md)
    plot(saved["seeds"], horizons, out / "macro.png")
    return md


if __name__ == "__main__":
    main()
