"""Experiments as one program: a grid of controller searches vmapped against one world model.

    cells = sweep.grid(cfg, seeds=[0, 1, 2], **{"evolve.tau": [1.0, 1.15, 1.3], "evolve.sigma": [0.1, 0.2]})
    results = sweep.run(cfg, cells, world, "runs/sweep")   # one dict per cell, in `cells` order

Every cell is a (seed, traced hyperparameters) pair: the grid's product of seeds and values. Each
value is validated as a config field (`dataclasses.replace`, so a bad one is a named ConfigError
before any work), then the cells' `cfg.hyper()` pytrees are stacked and `driver.search` runs them
all at once: CMA-ES generations, dreams and the real checks of every cell in one compiled
program per period, split over the devices by wm_jax.sharding. Only traced fields can be swept
(a static one, such as the horizon or the verifier mode, changes the program's shapes: loop over
it in Python, one sweep per value). A cell's first generation equals a lone `driver.evolve` with
the same key and config up to float rounding; later ones part from it as rounding reaches
CMA-ES's eigenvectors: an equivalent search, not the identical one (docs/RESULTS.md section 7).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from wm_jax.search import checks, driver
from wm_jax.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Cell:
    seed: int
    values: dict[str, float]  # traced field path ("evolve.tau") -> value
    config: Config  # the validated config of this cell (its hyper() is what the cell runs with)

    def key(self) -> jax.Array:
        """The cell's search key: the seed's alone, so the cells of one seed share their noise
        (common random numbers: only the hyperparameters differ between them)."""
        return jax.random.key(self.seed)


def _set(cfg: Any, path: list[str], value: float) -> Any:
    field = path[0]
    if not dataclasses.is_dataclass(cfg) or field not in {f.name for f in dataclasses.fields(cfg)}:
        raise ConfigError(f"no config field {'.'.join(path)!r} in {type(cfg).__name__}")
    if len(path) > 1:
        return dataclasses.replace(cfg, **{field: _set(getattr(cfg, field), path[1:], value)})
    if not next(f for f in dataclasses.fields(cfg) if f.name == field).metadata.get("traced"):
        raise ConfigError(f"{type(cfg).__name__}.{field} is static (it shapes the program): sweep it in a Python "
                          f"loop, one sweep per value; traced fields: {traced_fields(Config())}")
    return dataclasses.replace(cfg, **{field: float(value)})


def traced_fields(cfg: Config) -> list[str]:
    """The paths a sweep can vary ("evolve.tau", "verifier.threshold", ...)."""
    out: list[str] = []

    def walk(prefix: str, tree: dict[str, Any]) -> None:
        for k, v in tree.items():
            walk(f"{prefix}{k}.", v) if isinstance(v, dict) else out.append(f"{prefix}{k}")

    walk("", cfg.hyper())
    return out


def with_values(cfg: Config, values: dict[str, float]) -> Config:
    """cfg with traced fields set by path ({"evolve.tau": 1.3}); validated as any config."""
    for path, value in values.items():
        cfg = _set(cfg, path.split("."), value)
    return cfg


def grid(cfg: Config, seeds: Sequence[int] = (0,), **axes: Sequence[float]) -> list[Cell]:
    """The product of seeds and the traced fields' values, seed-major: [Cell(seed, values, config)].

    Keyword names are field paths with dots, so pass them as **{"evolve.tau": [...]}."""
    names = list(axes)
    cells = []
    for seed in seeds:
        for combo in itertools.product(*(axes[n] for n in names)):
            values = dict(zip(names, (float(v) for v in combo)))
            cells.append(Cell(seed=int(seed), values=values, config=with_values(cfg, values)))
    return cells


def stack(cells: Sequence[Cell]) -> tuple[jax.Array, dict[str, Any]]:
    """The cells' keys [N] and their hyper() pytrees stacked leaf by leaf (every leaf [N])."""
    keys = jnp.stack([c.key() for c in cells])
    hp = jax.tree.map(lambda *xs: jnp.stack(xs), *[c.config.hyper() for c in cells])
    return keys, hp


def run(cfg: Config, cells: Sequence[Cell], world: checks.World, out_dir: Path | str,
        init_mean: jax.Array | None = None, progress: bool = True, score: checks.Score = checks.score_candidates,
        check: checks.Check = checks.real_check) -> list[dict[str, Any]]:
    """Every cell's controller search as one vmapped program (see `driver.search`); resumable from
    out_dir's checkpoint. Returns one result dict per cell, with its seed and values added."""
    if not cells:
        raise ConfigError("sweep.run needs at least one cell")
    for c in cells:
        if c.config.static() != cfg.static():
            raise ConfigError(f"cell {c.values} (seed {c.seed}) differs from the sweep's config in a static field")
    keys, hp = stack(cells)
    means = None if init_mean is None else jnp.broadcast_to(jnp.asarray(init_mean), (len(cells),) + jnp.shape(init_mean))
    results = driver.search(cfg, keys, world, out_dir, hp, means, progress, score, check, batched=True)
    return [{"seed": c.seed, **c.values, **r} for c, r in zip(cells, results)]
