"""The one optax training loop every model uses.

`fit` runs optimizer steps in chunks, each chunk one jitted `lax.scan`; Python only drives chunks,
the progress bar, metrics.jsonl and checkpoints. The batch for step s is drawn with
`fold_in(key, s)`, so a run killed at any moment and restarted with the same command resumes from
its last complete checkpoint and ends with the same parameters, bit for bit on CPU, as an
uninterrupted run. Updates whose loss or gradients are not finite are skipped (parameters and
optimizer state kept) and counted; `max_bad_steps` in a row stop the run with TrainingError.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from wm_jax import logs, sharding
from wm_jax.store import checkpoint
from wm_jax.store.resume import Resumable
from wm_jax.config import TrainConfig

LossFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
SampleFn = Callable[[jax.Array, Any], Any]


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. persistent non-finite updates)."""


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32
    bad_streak: jax.Array  # consecutive skipped (non-finite) updates
    bad_total: jax.Array


@dataclasses.dataclass(frozen=True)
class Bound:
    """`fn(cfg, *args)` as a value: equal (and hashing equal) for equal configs. `run_chunk` takes the
    loss and sample functions as static arguments, so models hand them over as Bound(fn, cfg.static()):
    a second `fit` with an equal static config, another (traced) learning rate included, reuses the
    compiled chunk, where a fresh closure per call would compile it again."""

    fn: Callable[..., Any]
    cfg: Any

    def __call__(self, *args: Any) -> Any:
        return self.fn(self.cfg, *args)


def split_init(key: jax.Array, init: Callable[[jax.Array], Any], seeds: Seeds | None) -> tuple[Any, jax.Array]:
    """(params, training key) from `key`: split in two, parameters from the first half. With
    `seeds`, key is [seeds] and both come back with a leading axis of seeds, each seed's equal
    to its lone split and init."""
    if seeds is None:
        key_init, key_train = jax.random.split(key)
        return init(key_init), key_train
    pairs = jax.vmap(jax.random.split)(key)
    return jax.vmap(init)(pairs[:, 0]), pairs[:, 1]


def seeds_like(like: Any, seeds: int | None) -> Any:
    """A parameter template with a leading axis of `seeds` (None: unchanged), for load_params."""
    return like if seeds is None else jax.tree.map(lambda x: jnp.broadcast_to(x, (seeds,) + x.shape), like)


def optimizer(hp: dict[str, Any]) -> optax.GradientTransformation:
    """Adam after global-norm clipping; hp = TrainConfig.hyper(): lr and clip_norm, traced, so a new
    learning rate reuses the compiled training chunk (Adam's state does not depend on either)."""
    return optax.chain(optax.clip_by_global_norm(hp["clip_norm"]), optax.adam(hp["lr"]))


def init_state(cfg: TrainConfig, params: Any) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    opt_state = optimizer(cfg.hyper()).init(params)
    return TrainState(params=params, opt_state=opt_state, step=zero, bad_streak=zero, bad_total=zero)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass(frozen=True)
class Seeds:
    """A leading axis of seeds on `fit`'s key, parameters and state (and on its data unless
    `shared_data`), run as one program: `jax.lax.map` in groups of `batch` seeds, each group
    vmapped (batch=1: one seed after another, a lone run's arithmetic; on CPU a vmapped convolution
    is slower per seed than a lone one, while M's small matrices gain from it). With several
    devices every seed is vmapped and the seed axis split over them (wm_jax.sharding)."""

    shared_data: bool = True
    batch: int = 1


def _train_step(
    hp: dict[str, Any], loss_fn: LossFn, sample_fn: SampleFn, key: jax.Array, data: Any, state: TrainState,
    limit: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    key_batch, key_loss = jax.random.split(jax.random.fold_in(key, state.step))
    batch = sample_fn(key_batch, data)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key_loss, batch, state.step)
    updates, opt_state = optimizer(hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = _all_finite(loss) & _all_finite(grads)
    # past its own step count (a seed of a batch that trains for fewer steps) the state stands still
    active = jnp.array(True) if limit is None else state.step < limit
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite & active, n, o), new, old)  # noqa: E731
    bad = ~finite & active
    new_state = TrainState(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + active.astype(jnp.int32),
        bad_streak=jnp.where(bad, state.bad_streak + 1, jnp.where(active, 0, state.bad_streak)),
        bad_total=state.bad_total + bad.astype(jnp.int32),
    )
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "finite": finite | ~active,
               "bad_streak": new_state.bad_streak, "active": active}
    return new_state, metrics


@partial(jax.jit, static_argnums=(1, 2, 3, 8))
def run_chunk(hp, loss_fn, sample_fn, length, key, data, state, limit=None, seeds=None):
    """`length` training steps as one `lax.scan`; with `seeds` (a Seeds), key, state and limit
    carry a leading axis of seeds (data too unless seeds.shared_data) and every seed runs its own
    steps (up to its `limit`)."""
    def one(key, data, state, limit):
        return jax.lax.scan(lambda s, _: _train_step(hp, loss_fn, sample_fn, key, data, s, limit), state, None,
                            length=length)

    if seeds is None:
        return one(key, data, state, limit)
    if jax.device_count() > 1:  # every seed vmapped, the seed axis split over the devices
        if seeds.shared_data:
            key, state, limit = sharding.shard_leading((key, state, limit))
            return sharding.replicated(jax.vmap(lambda k, s, n: one(k, data, s, n))(key, state, limit))
        key, data, state, limit = sharding.shard_leading((key, data, state, limit))
        return sharding.replicated(jax.vmap(one)(key, data, state, limit))
    if seeds.shared_data:
        return jax.lax.map(lambda x: one(x[0], data, x[1], x[2]), (key, state, limit), batch_size=seeds.batch)
    return jax.lax.map(lambda x: one(*x), (key, data, state, limit), batch_size=seeds.batch)


def _summarise(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """A chunk's metrics (leaves [steps]) as one log row: means over its finite updates."""
    active = metrics["active"].astype(bool)
    finite = metrics["finite"].astype(bool) & active
    out = {}
    for k, v in metrics.items():
        if k in ("finite", "bad_streak", "active"):
            continue
        v = np.asarray(v, np.float64)[finite] if finite.any() else np.asarray([np.nan])
        out[k] = float(np.mean(v))
    out["skipped"] = int((~finite & active).sum())
    return out


def _start(name: str, cfg: TrainConfig, params: Any, seeds: int | None, limits: Any) -> tuple[TrainState, Any]:
    """fit's first state and step limits (None for one seed; else [seeds], cfg.steps by default)."""
    if seeds is None:
        return init_state(cfg, params), None
    limit = jnp.asarray(np.full(seeds, cfg.steps) if limits is None else limits, jnp.int32)
    if limit.shape != (seeds,) or int(limit.max()) > cfg.steps or int(limit.min()) < 0:
        raise ValueError(f"{name}: limits must be {seeds} step counts in [0, {cfg.steps}], got {limits!r}")
    return jax.vmap(lambda p: init_state(cfg, p))(params), limit


def _rows(metrics: dict[str, np.ndarray], step: int, seeds: int | None) -> list[dict[str, Any]]:
    """A chunk's metrics.jsonl rows: one, or one per seed ("cell": its position in the batch, as a
    batched search's evolve.jsonl has it)."""
    if seeds is None:
        return [{"step": step, **_summarise(metrics)}]
    return [{"step": step, "cell": i, **_summarise(jax.tree.map(lambda x: x[i], metrics))} for i in range(seeds)]


def fit(name: str, cfg: TrainConfig, loss_fn: LossFn, sample_fn: SampleFn, data: Any, params: Any, key: jax.Array,
        run_dir: Path | str, model_config: dict[str, Any], progress: bool = True, seeds: Seeds | None = None,
        limits: Any = None) -> tuple[Any, dict[str, Any]]:
    """Train `params` for cfg.steps steps; resumable; returns (params, info).

    loss_fn(params, key, batch, step) -> (loss, metrics dict); sample_fn(key, data) -> batch, a
    pure function (data is passed to the jitted chunk as an argument, not baked in as a constant).
    Writes run_dir/checkpoints (orbax) and appends one JSON line per chunk to run_dir/metrics.jsonl.
    `model_config` is stored with each checkpoint and must match on resume.

    With `seeds`, key and params (data too unless seeds.shared_data) carry a leading axis of seeds,
    trained as one program, each seed for its own `limits` steps ([seeds], default cfg.steps) and
    equal to its lone fit up to float rounding; metrics.jsonl has a row per chunk and seed.
    """
    stored_config = {"model": model_config, "train": dataclasses.asdict(cfg)}
    n = None if seeds is None else int(key.shape[0])
    state0, limit = _start(name, cfg, params, n, limits)
    loop = Resumable(run_dir, state0, stored_config, ("metrics.jsonl",), "step", cfg.steps, name, "step", progress,
                     cfg.max_to_keep)
    # Through the host: restored (or loaded, when fine-tuning) arrays are committed to a device and
    # a chunk's outputs are not, so the second chunk would compile the program again (4 s for M)
    state = jax.tree.map(jnp.asarray, jax.device_get(loop.state))
    first = int(np.sum(np.asarray(state.step)))  # steps taken before this call (every seed's)
    every = max(cfg.chunk, -(-cfg.checkpoint_every // cfg.chunk) * cfg.chunk)
    t0, last = time.perf_counter(), {}
    with loop:
        for step in loop.chunks():
            length = min(cfg.chunk, cfg.steps - step)
            state, metrics = run_chunk(cfg.hyper(), loss_fn, sample_fn, length, key, data, state, limit, seeds)
            metrics = jax.device_get(metrics)
            rows = _rows(metrics, step + length, n)
            last = rows[0] if seeds is None else {"step": step + length, "seeds": rows}
            worst = int(np.max(metrics["bad_streak"]))  # a streak may start and end inside a chunk
            if worst >= cfg.max_bad_steps:
                logs.append(Path(run_dir) / "metrics.jsonl", rows)
                which = "" if seeds is None else (
                    f" (seed {', '.join(map(str, np.flatnonzero(np.max(metrics['bad_streak'], axis=-1) >= cfg.max_bad_steps)))}"
                    f" of the batch, by position)")
                raise TrainingError(
                    f"{name}: {worst} consecutive non-finite updates before step {step + length}{which} "
                    f"(lower the learning rate or check the data); last checkpoint kept in {loop.ckpt_dir}"
                )
            done = step + length
            loop.record(length, state, {"metrics.jsonl": rows}, save=done % every == 0 or done == cfg.steps)
            losses = [r["loss"] for r in rows if np.isfinite(r["loss"])]  # a seed past its steps has none
            loop.bar.set_postfix(loss=f"{np.mean(losses) if losses else float('nan'):.4g}")
    elapsed = time.perf_counter() - t0
    steps_done = int(np.sum(np.asarray(state.step))) - first  # a seed past its own steps takes none
    info = {
        "steps": cfg.steps,
        "resumed_from": loop.start,
        "wall_s": elapsed,
        "steps_per_s": steps_done / elapsed if steps_done else float("nan"),
        "skipped_updates": int(np.sum(state.bad_total)),
        "final": last,
        # What a run directory records for the stage: the step saved last and its parameters' hash.
        "identity": {"step": int(loop.done), "sha256": checkpoint.digest(state.params)},
    }
    return state.params, info


def load_params(
    cfg: TrainConfig, params_like: Any, run_dir: Path | str, model_config: dict[str, Any],
    identity: dict[str, Any] | None = None, batched: bool = False,
) -> Any:
    """The parameters `fit` wrote into run_dir: the newest readable checkpoint, or with `identity`
    (fit's info["identity"], as a finished stage records it) exactly that step, whose parameters
    must hash to identity["sha256"]: damage or a change on disk is a checkpoint.Damaged error,
    never a silent fall back to an older step.

    The stored config must match (model_config and cfg), else checkpoint.CheckpointError. With
    `batched` the checkpoint is a seed-batched `fit`'s (params_like: [seeds]-leading leaves).
    """
    run_dir = Path(run_dir)
    stored = {"model": model_config, "train": dataclasses.asdict(cfg)}
    like = init_state(cfg, params_like) if not batched else jax.vmap(lambda p: init_state(cfg, p))(params_like)
    if identity is not None:
        step = int(identity["step"])
        params = checkpoint.restore_step(run_dir / "checkpoints", step, like, stored).params
        if checkpoint.digest(params) != identity["sha256"]:
            raise checkpoint.Damaged(f"checkpoint step {step} in {run_dir / 'checkpoints'} holds other parameters "
                                     f"than the finished stage recorded (changed or damaged on disk)")
        return params
    restored = checkpoint.restore_latest(run_dir / "checkpoints", like, stored, cfg.max_to_keep)
    if restored is None:
        raise checkpoint.CheckpointError(f"{run_dir}: no checkpoint (train it first)")
    return restored[1].params


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line that does not parse (torn by a crash, damaged) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
