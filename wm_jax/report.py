"""Runs of one recipe on many seeds, reported as a distribution (Agarwal et al., 2021, with rliable).

    wm-jax report runs/held_out                      # every run directory below it
    wm-jax report runs/frugal runs/frugal-s1 --json report.json --plots figures/

Each run directory gives one row (its summary.json): the evaluation's mean, std and minimum return,
whether it reached the task's threshold, the real steps spent on training, the kept agent's round,
the real check that kept it and that check minus the evaluation (the selection gap: a short check
that picks the luckiest candidate overstates the agent), and the minutes of stages. Over the rows:
IQM, median and mean with 95% percentile-bootstrap intervals over seeds (rliable's interval
estimates; one task, so the stratified bootstrap resamples seeds), the count that solved, and the
steps' largest value. Runs of different recipes (configs that differ in more than the seed) are
refused: a distribution is over seeds of one recipe.

Plots: the real return of every collection and check against the real steps spent, one line per seed ending at
its final evaluation, which it holds from there, with the IQM over seeds and its 95% band; and the fraction of seeds
whose final evaluation solved, against the training steps they had spent (an empirical CDF with its
band). rliable is the `analysis` extra (`pip install 'wm_jax[analysis]'`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from wm_jax import plots
from wm_jax.config import Config
from wm_jax.run_dir import read_config, read_json
from wm_jax.schema import diff

REPS = 10_000  # bootstrap draws for the aggregates
CURVE_REPS = 2_000  # for the plots' bands, one per point of a grid of steps
GRID = 60  # points of the plots' step axis


class ReportError(ValueError):
    """No runs to report, runs of different recipes, or the analysis extra missing."""


def _rliable() -> Any:
    try:
        from rliable import library
    except ImportError as e:
        raise ReportError(f"wm-jax report needs the analysis extra (rliable): pip install 'wm_jax[analysis]' "
                          f"({type(e).__name__}: {e})") from None
    return library


def find_runs(paths: list[Path | str]) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories named, where each path is a run directory or a folder
    whose direct subfolders are run directories; a run directory without summary.json is unfinished
    (named in the report, left out of it)."""
    runs, unfinished = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: no such directory")
        if (path / "seeds").is_dir():  # a batch of seeds (wm-jax run --seeds): its seeds' folders
            path = path / "seeds"
        elif (path / "summary.json").is_file():
            runs.append(path)
            continue
        subs = sorted((p for p in path.iterdir() if (p / "config.json").is_file()),  # seeds/2 before seeds/10
                      key=lambda p: (len(p.name), p.name) if p.name.isdigit() else (0, p.name))
        runs += [p for p in subs if (p / "summary.json").is_file()]
        unfinished += [p for p in subs if not (p / "summary.json").is_file()]
        if not subs and (path / "config.json").is_file():
            unfinished.append(path)
    if not runs:
        raise ReportError(f"{', '.join(map(str, paths))}: no finished run directory (none with a summary.json)")
    if len(set(runs)) < len(runs):
        raise ReportError("a run directory is named twice: " + ", ".join(sorted({str(r) for r in runs if runs.count(r) > 1})))
    return runs, unfinished


def kept_check(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The real check that kept the final agent: the best check of the agent's round (the first
    among equals, as the search keeps a later check only when it is better), with its episodes (8
    where 4 more were played after a first 4 that passed)."""
    checks = [e for e in summary["learning_curve"]
              if e.get("source") == "check" and e.get("round") == summary.get("agent_round")]
    return max(checks, key=lambda e: e["real_return"]) if checks else None


def row(run: Path) -> dict[str, Any]:
    """One run directory's row (from its summary.json and config.json); a summary.json without
    what a finished run writes there is a ReportError naming it."""
    path = run / "summary.json"
    summary = read_json(path, "run it again to write it")
    cfg = read_config(run)
    try:
        check = kept_check(summary)
        stages = {k: float(v) for k, v in summary["wall_s"].items() if k != "total"}
        return {"run": str(run), "seed": int(summary["seed"]), "env": cfg.env,
                "return_mean": float(summary["real_return_mean"]), "return_std": float(summary["real_return_std"]),
                "return_min": float(summary["real_return_min"]), "threshold": cfg.eval.solved_at,
                "solved": summary["solved"], "training_steps": int(summary["real_env_steps_training"]),
                "agent_round": summary.get("agent_round"),
                "kept_check": None if check is None else check["real_return"],
                "kept_check_episodes": None if check is None else check["episodes"],
                "selection_gap": None if check is None else check["real_return"] - summary["real_return_mean"],
                "stage_minutes": sum(stages.values()) / 60.0, "device": summary.get("device"),
                "curve": [(e["real_env_steps"], e["real_return"]) for e in summary["learning_curve"]
                          if e.get("source") in ("collect", "check")]
                + [(summary["real_env_steps_training"], summary["real_return_mean"])]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ReportError(f"{path} is not a finished run's summary ({type(e).__name__}: {e}); run it again "
                          f"to write it") from None


def same_recipe(runs: list[Path]) -> Config:
    """The runs' config with their first run's seed: a ReportError names the first field where a
    run's config (read as the Config it is, defaults filled in) differs from the first run's in
    more than the seed."""
    configs = [read_config(r) for r in runs]
    first = {**configs[0].to_dict(), "seed": None}
    for run, cfg in zip(runs[1:], configs[1:]):
        changed = diff(first, {**cfg.to_dict(), "seed": None})
        if changed:
            field, a, b = changed[0]
            raise ReportError(f"{run} is another recipe than {runs[0]} ({field}: {b!r} against {a!r}"
                              f"{f', and {len(changed) - 1} more fields' if len(changed) > 1 else ''}): "
                              f"report each recipe apart")
    return configs[0]


def iqm(values: np.ndarray) -> np.ndarray:
    """Interquartile mean over axis 0, ignoring NaNs: the mean of the middle values once
    int(0.25 n) are cut at each end, n the column's values (scipy's trim_mean, as rliable's
    aggregate_iqm); NaN where a column has none."""
    x = np.sort(np.asarray(values, np.float64), axis=0)  # NaNs last
    n = (~np.isnan(x)).sum(0)
    cut = (0.25 * n).astype(int)
    sums = np.concatenate([np.zeros((1,) + x.shape[1:]), np.nancumsum(x, axis=0)])
    keep = n - 2 * cut
    total = np.take_along_axis(sums, (n - cut)[None], 0)[0] - np.take_along_axis(sums, cut[None], 0)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep > 0, total / np.maximum(keep, 1), np.nan)


def _estimates(rly: Any, scores: Any, stats: Any, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """rliable's point estimate and 95% percentile-bootstrap interval [2, ...] of `stats` over the
    rows (seeds) of scores [seeds, 1] (or of a list of such, each resampled on its own: rliable's
    independent bootstrap), the same for the same seed. rliable 1.2's bootstraps draw their indices
    from NumPy's global generator whatever random_state says, so that generator is seeded here and
    restored after (arch's warning about random_state silenced)."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            point, ci = rly.get_interval_estimates({"x": scores}, stats, reps=reps,
                                                   random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(saved)
    return np.asarray(point["x"]), np.asarray(ci["x"])


def interval(values: np.ndarray | list[float], reps: int = REPS, seed: int = 0) -> dict[str, Any]:
    """IQM, median and mean of per-seed values, each with rliable's 95% percentile-bootstrap interval.
    The median is over seeds: rliable's aggregate_median is the median over tasks of each task's
    mean, which for one task would be the mean."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"n": 0}
    rly = _rliable()
    stats = lambda s: np.array([iqm(s[:, 0]), np.median(s[:, 0]), np.mean(s[:, 0])])  # noqa: E731
    point, ci = _estimates(rly, values[:, None], stats, reps, seed)
    out: dict[str, Any] = {"n": int(values.size)}
    for i, key in enumerate(("iqm", "median", "mean")):
        out[key] = float(point[i])
        out[f"{key}_ci95"] = [float(ci[0, i]), float(ci[1, i])]
    return out


def improvement(x: Any, y: Any, reps: int = REPS, seed: int = 0) -> dict[str, Any]:
    """P(X > Y): the probability that a seed of X scores above a seed of Y (ties count half;
    rliable's probability_of_improvement, a Mann-Whitney statistic) with its 95% bootstrap interval,
    X's and Y's seeds resampled apart: two methods' seeds are never paired."""
    x, y = (np.asarray(v, np.float64)[:, None] for v in (x, y))
    from rliable import metrics

    point, ci = _estimates(_rliable(), [x, y], lambda a, b: np.array([metrics.probability_of_improvement(a, b)]),
                           reps, seed)
    return {"p": float(point[0]), "p_ci95": [float(ci[0, 0]), float(ci[1, 0])], "n": [len(x), len(y)]}


def compare(x: dict[str, Any], y: dict[str, Any], reps: int = REPS) -> dict[str, Any]:
    """Two reports' seeds against each other: P(X's final return > Y's) and P(X spends fewer real
    training steps than Y), each with its interval (`improvement`). Both must be of one task."""
    tasks = [(r["aggregate"]["env"], r["aggregate"]["threshold"]) for r in (x, y)]
    if tasks[0] != tasks[1]:
        raise ReportError(f"the two groups are runs of other tasks ({tasks[0][0]}, threshold {tasks[0][1]}; "
                          f"{tasks[1][0]}, threshold {tasks[1][1]}): compare runs of one task")
    return {"return": improvement([r["return_mean"] for r in x["rows"]], [r["return_mean"] for r in y["rows"]], reps),
            "fewer_steps": improvement([-r["training_steps"] for r in x["rows"]],
                                       [-r["training_steps"] for r in y["rows"]], reps)}


def profiles(results: dict[str, dict[str, Any]], out: Path | str, reps: int = CURVE_REPS) -> list[Path]:
    """performance_profile.png (the fraction of each report's seeds whose final return exceeds tau,
    against tau, with 95% bands: a performance profile) and solved_fraction.png with every report's
    curve, in `out`."""
    out = Path(out)
    finals = {name: np.array([r["return_mean"] for r in res["rows"]]) for name, res in results.items()}
    low, top = min(v.min() for v in finals.values()), max(v.max() for v in finals.values())
    taus = np.linspace(low - 0.02 * (top - low + 1.0), top + 0.02 * (top - low + 1.0), GRID)
    curves = {name: bands(lambda idx, v=v: (v[idx, None] > taus).mean(0), len(v), reps) for name, v in finals.items()}
    first = next(iter(results.values()))["aggregate"]
    plots.performance_profiles(taus, curves, first["threshold"], out / "performance_profile.png")
    _solved_fractions({f"{name} ({len(res['rows'])} seeds)": res for name, res in results.items()},
                      first.get("training_steps", {}).get("goal"), reps, out / "solved_fraction.png")
    return [out / "performance_profile.png", out / "solved_fraction.png"]


def comparison_text(names: list[str], comp: dict[str, Any]) -> str:
    """`compare`'s figures as `wm-jax report --against` prints them."""
    def line(what: str, c: dict[str, Any]) -> str:
        lo, hi = c["p_ci95"]
        return f"P({names[0]} {what} {names[1]}) = {c['p']:.2f} [{lo:.2f}, {hi:.2f}]"

    return "\n".join([f"{names[0]} ({comp['return']['n'][0]} seeds) against {names[1]} ({comp['return']['n'][1]} seeds), "
                      "seeds never paired (95% bootstrap intervals, rliable):",
                      line("scores above", comp["return"]), line("spends fewer training steps than", comp["fewer_steps"])])


def aggregate(rows: list[dict[str, Any]], step_goal: int | None = None) -> dict[str, Any]:
    """The distribution over the rows' seeds (see the module's docstring)."""
    steps = np.array([r["training_steps"] for r in rows], np.float64)
    solved = [r["solved"] for r in rows if r["solved"] is not None]
    gaps = [r["selection_gap"] for r in rows if r["selection_gap"] is not None]
    minutes = np.array([r["stage_minutes"] for r in rows])
    return {"seeds": [r["seed"] for r in rows], "env": rows[0]["env"], "threshold": rows[0]["threshold"],
            "devices": sorted({str(r["device"]) for r in rows}),
            "return": interval([r["return_mean"] for r in rows]),
            "solved": int(sum(solved)) if solved else None, "judged": len(solved),
            "training_steps": {**interval(steps), "max": int(steps.max()),
                               **({"goal": step_goal, "within_goal": int((steps <= step_goal).sum())}
                                  if step_goal else {})},
            "selection_gap": interval(gaps),
            "stage_minutes": {"median": float(np.median(minutes)), "max": float(minutes.max())}}


def report(paths: list[Path | str], reps: int = REPS) -> dict[str, Any]:
    """{"rows": one per run, "aggregate": over them} for the run directories `paths` names."""
    runs, unfinished = find_runs(paths)
    cfg = same_recipe(runs)
    rows = [row(r) for r in runs]
    rows.sort(key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rows]
    if len(set(seeds)) < len(seeds):
        raise ReportError(f"seeds {sorted({s for s in seeds if seeds.count(s) > 1})} appear twice: one run per seed")
    return {"rows": rows, "aggregate": aggregate(rows, cfg.rounds.budget), "unfinished": list(map(str, unfinished))}


def curve_at(curves: list[list[tuple[int, float]]], grid: np.ndarray) -> np.ndarray:
    """[seeds, len(grid)]: each seed's latest return at or before each step of the grid, NaN before
    its first point; after its last (its final evaluation) a seed holds that value."""
    out = np.full((len(curves), grid.size), np.nan)
    for i, points in enumerate(curves):
        steps, returns = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        at = np.searchsorted(steps, grid, side="right") - 1
        out[i, at >= 0] = returns[at[at >= 0]]
    return out


def bands(values_at: Any, n: int, reps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A statistic over seeds and its 95% percentile-bootstrap band: `values_at(idx)` maps an array
    of seed indices to a curve; rliable resamples the indices (rows) as it resamples seeds."""
    rly = _rliable()
    point, ci = _estimates(rly, np.arange(n, dtype=np.float64)[:, None], lambda s: values_at(s[:, 0].astype(int)),
                           reps, seed)
    return point, ci


def draw(result: dict[str, Any], out: Path | str, reps: int = CURVE_REPS) -> list[Path]:
    """learning_curves.png and solved_fraction.png in `out` (see the module's docstring)."""
    rows, agg = result["rows"], result["aggregate"]
    out = Path(out)
    top = max(max(s for s, _ in r["curve"]) for r in rows)
    grid = np.linspace(0, top, GRID)
    at = curve_at([r["curve"] for r in rows], grid)

    curve, curve_ci = bands(lambda idx: iqm(at[idx]), len(rows), reps)
    paths = [out / "learning_curves.png", out / "solved_fraction.png"]
    plots.seed_curves([r["curve"] for r in rows], grid, curve, curve_ci,
                      [(r["training_steps"], r["return_mean"]) for r in rows], agg["threshold"], paths[0])
    _solved_fractions({f"{len(rows)} seeds": result}, agg.get("training_steps", {}).get("goal"), reps, paths[1])
    return paths


def _solved_fractions(results: dict[str, dict[str, Any]], goal: int | None, reps: int, path: Path) -> None:
    """solved_fraction.png: for each named report, the fraction of its seeds solved within each count
    of training steps, with its 95% band; a line ends where its runs ended."""
    steps = {name: np.array([r["training_steps"] for r in res["rows"]], np.float64) for name, res in results.items()}
    most = max(s.max() for s in steps.values())
    grid = np.unique(np.concatenate([np.linspace(0, most * 1.05, GRID), *steps.values()]))
    curves = {}
    for name, res in results.items():
        s, ok = steps[name], np.array([bool(r["solved"]) for r in res["rows"]])
        f, ci = bands(lambda idx, s=s, ok=ok: ((s[idx, None] <= grid) & ok[idx, None]).mean(0), len(s), reps)
        beyond = grid > s.max()  # no run went this far: nothing to draw
        curves[name] = (np.where(beyond, np.nan, f), np.where(beyond, np.nan, ci))
    plots.fraction_curves(grid, curves, goal, path)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ci(stat: dict[str, Any], key: str, digits: int = 1) -> str:
    lo, hi = stat[f"{key}_ci95"]
    return f"{_fmt(stat[key], digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def text(result: dict[str, Any]) -> str:
    """The per-seed table and the aggregates, as `wm-jax report` prints them."""
    rows, agg = result["rows"], result["aggregate"]
    lines = [f"{len(rows)} runs of {agg['env']} (threshold {_fmt(agg['threshold'])}) on {'; '.join(agg['devices'])}",
             "seed  return mean +- std (min)   solved  round  train steps  kept check (eps)  gap     minutes"]
    for r in rows:
        check = "-" if r["kept_check"] is None else f"{r['kept_check']:.1f} ({r['kept_check_episodes']})"
        gap = "-" if r["selection_gap"] is None else f"{r['selection_gap']:+.1f}"
        lines.append(f"{r['seed']:<5} {r['return_mean']:7.1f} +- {r['return_std']:5.1f} ({r['return_min']:5.0f})"
                     f"   {str(r['solved']):<6}  {str(r['agent_round']):<5}  {r['training_steps']:>11,}"
                     f"  {check:<16}  {gap:<7} {r['stage_minutes']:.1f}")
    ret, steps = agg["return"], agg["training_steps"]
    lines += ["", "95% bootstrap intervals over seeds (rliable):",
              f"return: IQM {_ci(ret, 'iqm')}, median {_ci(ret, 'median')}, mean {_ci(ret, 'mean')}",
              f"solved: {agg['solved']} of {agg['judged']}" if agg["solved"] is not None else "solved: no threshold",
              f"training steps: median {_ci(steps, 'median', 0)}, IQM {_ci(steps, 'iqm', 0)}, largest {steps['max']:,}"
              + (f", {steps['within_goal']} of {len(rows)} within {steps['goal']:,}" if "goal" in steps else "")]
    if agg["selection_gap"]["n"]:
        gap = agg["selection_gap"]
        lines.append(f"selection gap (kept check - evaluation): mean {_ci(gap, 'mean')}, median {_ci(gap, 'median')}")
    lines.append(f"minutes of stages: median {agg['stage_minutes']['median']:.1f}, "
                 f"slowest {agg['stage_minutes']['max']:.1f}")
    if result.get("unfinished"):
        lines.append(f"left out, unfinished (no summary.json): {', '.join(result['unfinished'])}")
    return "\n".join(lines)


def write(result: dict[str, Any], path: Path | str) -> None:
    """The report as JSON: the rows (each with its learning curve, [real steps, real return] pairs),
    the aggregates and the unfinished run directories left out."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


__all__ = ["ReportError", "aggregate", "compare", "comparison_text", "draw", "find_runs", "improvement", "interval",
           "profiles", "report", "row", "text", "write"]
