"""A run directory, read and written in one place: the pipeline writes it, Agent and the
experiments read it.

    run = run_dir.load("runs/cpu")        # cfg, the final agent's params, every round's data
    run.cfg, run.params["vae" | "transition" | "controller"], run.arrays (transition.training_arrays)

Layout (written by pipeline.run): config.json, stages.json, data/round{r} (datasets), vae/,
transition/ (round 1) and transition_round{r}/, latents_round{r}.npz (V's posteriors of every row
so far), evolve_round{r}/, agent.json (which round's M the final controller belongs to),
controller.npy, summary.json, plots.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from wm_jax import data as data_lib
from wm_jax import transition, vae
from wm_jax.config import Config


def finite_or_none(obj: Any) -> Any:
    """Strict JSON: a metric that is undefined (NaN, e.g. a correlation of a constant) becomes null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path | str, obj: Any) -> None:
    """Atomic strict JSON (NaN -> null): a crash leaves the old file or the new one, never half.
    Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def load_arrays(paths: list[Path]) -> dict[str, np.ndarray]:
    """The columns of several stored datasets, concatenated in order."""
    parts = [data_lib.to_arrays(data_lib.load_dataset(p)) for p in paths]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def data_paths(run: Path | str) -> list[Path]:
    """The run's datasets, round 1 first."""
    return sorted((Path(run) / "data").iterdir(), key=lambda p: int(p.name.removeprefix("round")))


def load_agent(run: Path | str) -> tuple[Config, dict[str, Any]]:
    """The final agent of a finished run: (cfg, {"vae", "transition", "controller"})."""
    run = Path(run)
    meta_path = run / "agent.json"
    if not meta_path.exists() or not (run / "controller.npy").exists():
        raise FileNotFoundError(f"{run}: no trained agent (agent.json / controller.npy missing; run `wm-jax run` first)")
    meta = json.loads(meta_path.read_text())
    cfg = Config.from_dict(meta["config"])
    vae_params = vae.load(cfg, run / "vae")
    # The M the controller was evolved with: its round's config (fine-tuning rounds train fewer
    # steps). agent.json files older than the "round" field name a fine-tuned M by its steps.
    r = meta.get("round") or (1 if meta.get("transition_steps") is None else 2)
    m_params = transition.load(cfg.for_round(r), run / meta["transition_dir"])
    return cfg, {"vae": vae_params, "transition": m_params, "controller": jnp.asarray(np.load(run / "controller.npy"))}


@dataclass(frozen=True)
class Run:
    cfg: Config
    params: dict[str, Any]  # the final agent: vae, transition (the M its controller was evolved with), controller
    arrays: dict[str, Any]  # every round's rows as transition.training_arrays (posteriors, actions, boundaries)


def load(run: Path | str) -> Run:
    """A finished run: its config, the final agent and all its data encoded by V."""
    run = Path(run)
    cfg, params = load_agent(run)
    paths = data_paths(run)
    arrays = load_arrays(paths)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat = np.load(run / f"latents_round{len(paths)}.npz")
    return Run(cfg, params, transition.training_arrays(lat["mean"], lat["logvar"], arrays, index))
