"""The contrastive latent loss for M, second part: K's AUCs, imagined-vs-real returns and the
controllers each M yields (docs/RESULTS.md section 11).

    python experiments/contrastive_eval.py RUN [RUN ...] [--variants plain contrastive=1.0]
        [--generations 40] [--k-steps 500] [--pairs 32] [--out experiments/results]
    python experiments/contrastive_eval.py --report   (only rewrite OUT/contrastive_eval.md from its .json)
    python experiments/contrastive_eval.py RUN [RUN ...] --drift   (add each M's drift curves with K)

Each RUN (one per seed) must hold the M variants experiments/mitigations.py trained
(RUN/mitigations/NAME: 2,000 steps from scratch on the run's round-1 random data, the same key).
For each seed and each M variant:
- K trained against that M on the same rows (--k-steps; RUN/contrastive_eval/k_NAME), and its
  held-out AUCs (200 fresh random episodes, seed 999, as mitigations.py) per kind of negative and at
  open-loop drift 1, 5 and 20, with its final training loss;
- two controllers evolved from scratch in that M's dreams with the run's round-1 search settings
  (30-step dreams, real checks of 16 episodes every 10 generations, the best checked mean kept) for
  --generations generations: the plain dream reward, and the reward weighted by K's confidence;
- each controller: 100 real episodes (return mean, std, min), and --pairs more real episodes: from
  the states they reach at t = 0, 50, ..., 400 (while alive), the real return of the next 100 steps
  beside a 100-step dream of the same controller in the same M from that state's latent (a sample of
  its posterior, M's carry at zero as in the search): the Pearson correlation of imagined and real
  100-step returns, per controller and pooled over the seed's two, with the imagined reward plain
  and K-weighted.
Writes OUT/contrastive_eval.json and .md; a seed's results are kept in RUN/contrastive_eval/result.json
and reused when rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import results_doc  # experiments/, on sys.path when a script runs

from wm_jax import logs, run_dir, stages, stats
from wm_jax.models import transition, verifier
from wm_jax.search import checks, dream, drift, driver, rollout
from wm_jax.store import data

HORIZON = 100  # the imagined-vs-real comparison's length (steps)
STARTS = (0, 50, 100, 150, 200, 250, 300, 350, 400)  # where in a real episode a pair starts (if it is alive)
MODES = ("off", "weight")  # the controllers' dream reward: plain, K-weighted


def _log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def _variant(cfg, name: str, temperature: float):
    """The run's config with M as mitigations.py trained the variant `name` ("plain", "contrastive=W")."""
    tcfg = dataclasses.replace(cfg.transition, train=dataclasses.replace(cfg.transition.train, steps=2000))
    if name != "plain":
        kind, value = name.split("=")
        if kind != "contrastive":
            raise SystemExit(f"--variants: only plain and contrastive=W are measured here, got {name!r}")
        tcfg = dataclasses.replace(tcfg, contrastive=float(value), contrastive_temperature=temperature)
    return dataclasses.replace(cfg, transition=tcfg)


def _paired_returns(cfg, params, k_params, key, episodes: int) -> dict:
    """Pairs of real and imagined HORIZON-step returns from the same states: `episodes` real
    episodes (up to eval.max_steps), and from each state they reach at t0 in STARTS the real return
    of the next HORIZON steps (fewer where the episode ends) beside a HORIZON-step dream of the same
    controller from a sample of that state's posterior (M's carry at zero, as the search's dreams
    start), its reward plain and K-weighted. Later starts give the real returns their spread: a
    controller that balances for 100 steps from the reset would give them none."""
    key_real, key_z, key_dream = jax.random.split(key, 3)
    real = jax.device_get(rollout.run_episodes(cfg, params, key_real, episodes, cfg.eval.max_steps, latents=True))
    length = np.asarray(real["length"]).astype(int)
    pairs = [(e, t0) for e in range(episodes) for t0 in STARTS if t0 < length[e]]
    e_idx, t_idx = (np.array(x) for x in zip(*pairs))
    z0 = stats.gaussian_sample(key_z, jnp.asarray(real["latent_mean"][e_idx, t_idx]),
                               jnp.asarray(real["latent_logvar"][e_idx, t_idx]))
    keys = jax.random.split(key_dream, len(pairs))  # the same dream noise for both rewards
    out = {"start": t_idx.tolist(), "real": np.minimum(HORIZON, length[e_idx] - t_idx).astype(float).tolist()}
    for mode in MODES:
        mcfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode=mode))
        ret = jax.vmap(lambda k, z, c=mcfg: dream.dream(c, k, params["transition"], params["controller"], z, HORIZON,
                                                        k_params)[1])(keys, z0)
        out[f"imagined_{mode}"] = np.asarray(ret, np.float64).tolist()
    return out


def _seed(run: Path, args) -> dict:
    settings = {k: getattr(args, k) for k in ("variants", "generations", "k_steps", "pairs", "temperature")}
    cached = run / "contrastive_eval" / "result.json"
    if cached.exists():
        res = json.loads(cached.read_text())
        if res.get("settings") == settings:
            _log(f"{run}: reusing {cached} (same settings)")
            return res
    t_seed = time.time()
    cfg, params = run_dir.load_agent(run)
    arrays = run_dir.load_arrays([run / "data" / "round1"])
    index = data.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat = np.load(run / "latents_round1.npz")
    m_arrays = transition.training_arrays(lat["mean"], lat["logvar"], arrays, index)
    held = rollout.collect_encoded(cfg, params, "random", 200, 999)
    starts = (jnp.asarray(lat["mean"]), jnp.asarray(lat["logvar"]))
    results = {}
    for name in args.variants:
        vcfg = _variant(cfg, name, args.temperature)
        vcfg = dataclasses.replace(vcfg, evolve=dataclasses.replace(vcfg.evolve, generations=args.generations),
                                   verifier=dataclasses.replace(vcfg.verifier, train=dataclasses.replace(
                                       vcfg.verifier.train, steps=args.k_steps)))
        m_dir = run / "mitigations" / name.replace("=", "_")
        if not m_dir.is_dir():
            raise SystemExit(f"{m_dir}: no such M; train it first with experiments/mitigations.py {run} "
                             f"--steps 2000 --dropout --z-penalty --contrastive ...")
        m = transition.load(vcfg, m_dir)
        out = run / "contrastive_eval"
        k_dir = out / f"k_{name.replace('=', '_')}_{args.k_steps}"
        _log(f"seed {cfg.seed} {name}: K, {args.k_steps} steps")
        _, k_info = verifier.train(vcfg, jax.random.key(cfg.seed + 4000), m_arrays, k_dir, progress=False, m_params=m)
        k = verifier.load(vcfg, k_dir)
        auc = verifier.evaluate(vcfg, jax.random.key(11), m, k, held)
        res = {"k_auc": auc, "k_final": logs.finite_or_none(k_info["final"]), "controllers": {}}
        pooled = {"real": [], "imagined_off": [], "imagined_weight": []}
        for mode in MODES:
            scfg = dataclasses.replace(vcfg, verifier=dataclasses.replace(vcfg.verifier, mode=mode))
            world = checks.World(m_params=m, vae_params=params["vae"], k_params=k, starts=starts)
            t = time.time()
            found = driver.evolve(scfg, jax.random.key(cfg.seed + 5000), world, out / f"evolve_{name}_{mode}",
                                  progress=False)
            agent = {"vae": params["vae"], "transition": m, "controller": jnp.asarray(found["best"])}
            ev = rollout.evaluate(scfg, agent, jax.random.key(cfg.seed + 6000))
            paired = _paired_returns(scfg, agent, k, jax.random.key(cfg.seed + 7000), args.pairs)
            for key_ in pooled:
                pooled[key_] += paired[key_]
            res["controllers"][mode] = {
                "best_check": found["best_real"], "checks": [c["real_return"] for c in found["checks"]],
                "check_steps": int(found["real_env_steps"]), "return_mean": ev["return_mean"],
                "return_std": ev["return_std"], "return_min": ev["return_min"],
                "corr_plain": stats.correlation(paired["imagined_off"], paired["real"]),
                "corr_weighted": stats.correlation(paired["imagined_weight"], paired["real"]),
                "paired": paired, "wall_s": time.time() - t,
            }
            _log(f"seed {cfg.seed} {name} dream={mode}: checks {res['controllers'][mode]['checks']}, real "
                 f"{ev['return_mean']:.1f} +- {ev['return_std']:.1f} (min {ev['return_min']:.0f}); corr imagined/real "
                 f"plain {res['controllers'][mode]['corr_plain']}, weighted {res['controllers'][mode]['corr_weighted']}")
        res["corr_plain"] = stats.correlation(pooled["imagined_off"], pooled["real"])
        res["corr_weighted"] = stats.correlation(pooled["imagined_weight"], pooled["real"])
        results[name] = res
    res = logs.finite_or_none({"run": str(run), "seed": cfg.seed, "settings": settings, "results": results,
                                  "wall_s": time.time() - t_seed})
    run_dir.write_json(cached, res)
    return res


DRIFT_K = (1, 20, 50, 100)


def _drift(run: Path, args) -> dict:
    """Each M's drift curves with K (wm_jax.search.drift.measure: latent MSE, KL, decoded-frame error on 32
    rollouts, K's confidence) along 20 held-out agent episodes (seed 1000, as mitigations.py)."""
    cfg, params = run_dir.load_agent(run)
    held = drift.pad_episodes(rollout.collect_encoded(cfg, params, "agent", 20, 1000))
    out = {}
    for name in args.variants:
        vcfg = _variant(cfg, name, args.temperature)
        vcfg = dataclasses.replace(vcfg, verifier=dataclasses.replace(vcfg.verifier, train=dataclasses.replace(
            vcfg.verifier.train, steps=args.k_steps)))
        m = transition.load(vcfg, run / "mitigations" / name.replace("=", "_"))
        k = verifier.load(vcfg, run / "contrastive_eval" / f"k_{name.replace('=', '_')}_{args.k_steps}")
        d = drift.measure(vcfg, jax.random.key(7), {"vae": params["vae"], "transition": m, "verifier": k}, held,
                          max_k=max(DRIFT_K), stride=25, decode_pairs=32)
        out[name] = {metric: {str(i): d[metric][i] for i in DRIFT_K} for metric in drift.METRICS}
        _log(f"seed {cfg.seed} {name} drift: {out[name]}")
    return out


def _f(x, nd=2):
    return results_doc.fmt(x, nd)


def _ms(values, nd=2):
    return results_doc.mean_std(values, nd)


def _pooled(results: list[dict], imagined: str) -> float | None:
    """The correlation over every (imagined, real) pair of these results' controllers. A seed whose
    controllers all balance for the whole window has no spread in its real returns (its own
    correlation is undefined); pooled over seeds it still counts."""
    pairs = [c["paired"] for r in results for c in r["controllers"].values()]
    value = stats.correlation([x for p in pairs for x in p[imagined]], [x for p in pairs for x in p["real"]])
    return None if value is None or not np.isfinite(value) else float(value)


def tables(seeds: list[dict], variants: list[str]) -> str:
    lines = [("K's held-out AUC (200 random episodes) and the controllers' real return (100 episodes); "
             "mean +- std over seeds, then per seed"), "",
             ("| M | K AUC one-step | open-loop | noise | drift 1 | drift 5 | drift 20 | K loss | "
             "real return, plain dream | real return, K-weighted dream | corr imagined/real (plain reward) | "
             "corr (K-weighted reward) | corr over all seeds' pairs (plain) | (K-weighted) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in variants:
        rs = [s["results"][name] for s in seeds]
        auc = [_ms([r["k_auc"][f"auc/{k}"] for r in rs]) for k in
               ("one_step", "open_loop", "noise", "drift_1", "drift_5", "drift_20")]
        real = [_ms([r["controllers"][m]["return_mean"] for r in rs], 1) for m in MODES]
        lines.append(f"| {name} | {' | '.join(auc)} | {_ms([r['k_final'].get('loss') for r in rs], 3)} | "
                     f"{' | '.join(real)} | {_ms([r['corr_plain'] for r in rs])} | {_ms([r['corr_weighted'] for r in rs])} | "
                     f"{_f(_pooled(rs, 'imagined_off'))} | {_f(_pooled(rs, 'imagined_weight'))} |")
    if all("drift" in s for s in seeds):
        lines += ["", ("Drift along 20 held-out agent episodes (open loop; decoded-frame error on 32 rollouts), "
                      "mean +- std over seeds"), "",
                  "| M | " + " | ".join(f"{m} k={i}" for m in drift.METRICS for i in DRIFT_K) + " |",
                  "|---|" + "---|" * (len(drift.METRICS) * len(DRIFT_K))]
        for name in variants:
            cells = [_ms([s["drift"][name][m][str(i)] for s in seeds], 4 if m != "kl" else 1)
                     for m in drift.METRICS for i in DRIFT_K]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", ("| seed | M | dream reward | checks (16 episodes each) | real return mean +- std (min) | "
              "pairs | imagined / real 100-step return (mean) | corr plain | corr K-weighted |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for name in variants:
            for mode in MODES:
                c = s["results"][name]["controllers"][mode]
                p = c["paired"]
                lines.append(f"| {s['seed']} | {name} | {'plain' if mode == 'off' else 'K-weighted'} | "
                             f"{', '.join(f'{x:.0f}' for x in c['checks'])} | {c['return_mean']:.1f} +- "
                             f"{c['return_std']:.1f} ({c['return_min']:.0f}) | {len(p['real'])} | {np.mean(p['imagined_off']):.1f} / "
                             f"{np.mean(p['real']):.1f} | {_f(c['corr_plain'])} | {_f(c['corr_weighted'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = results_doc.runs_parser(__doc__, required=False)
    p.add_argument("--variants", nargs="+", default=["plain", "contrastive=1.0"])
    p.add_argument("--temperature", type=float, default=0.1, help="the contrastive loss's temperature (as trained)")
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--k-steps", type=int, default=500)
    p.add_argument("--pairs", type=int, default=32, help="real episodes whose states start the pairs")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--report", action="store_true", help="only rewrite OUT/contrastive_eval.md from its .json")
    p.add_argument("--drift", action="store_true",
                   help="add each M's drift curves with K to OUT/contrastive_eval.json (RUNs in the same order)")
    args = p.parse_args()
    if args.drift:  # add the drift curves to a finished OUT/contrastive_eval.json
        saved = json.loads((args.out / "contrastive_eval.json").read_text())
        for seed, run in zip(saved["seeds"], args.runs, strict=True):
            seed["drift"] = logs.finite_or_none(_drift(run, args))
        run_dir.write_json(args.out / "contrastive_eval.json", saved)
    if args.report or args.drift:
        saved = json.loads((args.out / "contrastive_eval.json").read_text())
        (args.out / "contrastive_eval.md").write_text(tables(saved["seeds"], args.variants))
        print(tables(saved["seeds"], args.variants))
        return
    if not args.runs:
        p.error("give one finished run per seed (or --report)")
    for run in args.runs:
        if not (run / "agent.json").exists():
            p.error(f"{run}: not a finished run (no agent.json)")
    t0 = time.time()
    seeds = [_seed(run, args) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python experiments/contrastive_eval.py " + shlex.join(sys.argv[1:]),
              "jax": jax.__version__, "machine": stages.device_name(), "wall_s": time.time() - t0,
              "seeds": seeds}
    run_dir.write_json(args.out / "contrastive_eval.json", report)
    (args.out / "contrastive_eval.md").write_text(tables(seeds, args.variants))
    print(tables(seeds, args.variants))


if __name__ == "__main__":
    main()
