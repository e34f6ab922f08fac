"""Episode collection on device, the on-disk dataset, and the batchers the models train on.

`collect` runs many CartPole episodes as one jitted, vmapped, fixed-length `lax.scan` with a
validity mask (gymnax `experimental/rollout.py` style), in chunks of episodes so memory stays
bounded. One dataset row is one step: the observation frame at time t (the newest frame only; the
4-frame stacks are rebuilt at load from the rows before it), the action taken, its reward, whether
it terminated the episode, and the physics state. The frame after the final action is not stored,
so the transition model masks its latent target on an episode's last row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import datasets
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wm_jax import interrupt
from wm_jax.envs.cartpole import FRAME_SIZE, STACK, PixelCartPole, push_frame, render

MANIFEST = "wm_jax_manifest.json"
FORMAT_VERSION = 1
COLUMNS = ("episode", "t", "frame", "action", "reward", "done", "state")
FEATURES = datasets.Features(
    {
        "episode": datasets.Value("int32"),
        "t": datasets.Value("int32"),
        "frame": datasets.Array2D((FRAME_SIZE, FRAME_SIZE), "uint8"),
        "action": datasets.Value("int32"),
        "reward": datasets.Value("float32"),
        "done": datasets.Value("bool"),
        "state": datasets.Sequence(datasets.Value("float32"), length=4),
    }
)


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or does not match the wm_jax schema."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


# --------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """A behaviour policy for `collect`, gymnax-style: static code, traced parameters.

    act(params, key, carry, obs) -> (action int32, carry) for ONE episode (collect vmaps it); params
    is collect's `params` pytree, an argument of the compiled program, never a constant in it (one
    program for every round's agent); obs is the uint8[64, 64, 4] stack when `uses_pixels`, else
    None (and no frames are rendered in the loop). init_carry() -> the policy's per-episode state
    (a pytree; `()` for a stateless policy).
    """

    act: Callable[[Any, jax.Array, Any, jax.Array | None], tuple[jax.Array, Any]]
    init_carry: Callable[[], Any] = lambda: ()
    uses_pixels: bool = False


def _random_act(params: Any, key: jax.Array, carry: Any, obs: jax.Array | None) -> tuple[jax.Array, Any]:
    return jax.random.bernoulli(key).astype(jnp.int32), carry


RANDOM_POLICY = Policy(act=_random_act)


# --------------------------------------------------------------------------------------------
# Collection


def _collect_chunk(policy: Policy, max_steps: int, key: jax.Array, num_episodes: int, params: Any
                   ) -> dict[str, jax.Array]:
    """One chunk of episodes as a fixed-length scan; returns time-major buffers and a valid mask."""
    env = PixelCartPole()
    env_params = env.default_params

    def one_episode(key: jax.Array) -> dict[str, jax.Array]:
        key_reset, key_run = jax.random.split(key)
        obs, state = env.reset(key_reset, env_params)

        def body(carry, key_t):
            state, pcarry, alive = carry
            key_act, key_step = jax.random.split(key_t)
            action, pcarry = policy.act(params, key_act, pcarry, state.frames if policy.uses_pixels else None)
            action = jnp.asarray(action, jnp.int32)
            phys = state.physics
            # gymnax's step_env without auto-reset: after termination the mask takes over.
            nxt, reward, terminated = env.step_physics(key_step, phys, action, env_params)
            frames = state.frames
            if policy.uses_pixels:  # static: only pixel policies pay for rendering in the loop
                frames = push_frame(frames, nxt)
            out = {
                "valid": alive,
                "action": action,
                "reward": reward.astype(jnp.float32),
                "done": terminated & alive,
                "state": jnp.stack([phys.x, phys.x_dot, phys.theta, phys.theta_dot]).astype(jnp.float32),
            }
            alive = alive & ~terminated
            new_state = state.replace(physics=nxt, frames=frames)
            return (new_state, pcarry, alive), out

        keys = jax.random.split(key_run, max_steps)
        _, out = jax.lax.scan(body, (state, policy.init_carry(), jnp.array(True)), keys)
        return out

    return jax.vmap(one_episode)(jax.random.split(key, num_episodes))


_collect_chunk_jit = jax.jit(_collect_chunk, static_argnums=(0, 1, 3))


@jax.jit
def _render_batch(states: jax.Array) -> jax.Array:
    return jax.vmap(render)(states[:, 0], states[:, 2])


def render_states(states: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Render uint8[N, 64, 64] frames for float[N, 4] physics states, in fixed-size batches."""
    n = states.shape[0]
    out = np.empty((n, FRAME_SIZE, FRAME_SIZE), np.uint8)
    for lo in range(0, n, batch):
        part = states[lo : lo + batch]
        pad = batch - part.shape[0]
        padded = np.concatenate([part, np.zeros((pad, 4), np.float32)]) if pad else part
        out[lo : lo + part.shape[0]] = np.asarray(_render_batch(jnp.asarray(padded)))[: part.shape[0]]
    return out


ROW_BYTES = FRAME_SIZE * FRAME_SIZE + 4 * 4 + 4 * 5  # a frame, the state, episode/t/action/reward/done
RANDOM_EPISODE_STEPS = 22.5  # mean length of a random-policy CartPole episode (measured: 22.4 over 5,000)
# What one step of one episode takes in a chunk's scan, whether the episode is still running or not:
# its key (8 bytes), the outputs valid, action, reward, done and state (26 bytes) on the device, and
# the same outputs again on the host after device_get.
SCAN_STEP_BYTES = 8 + 2 * 26


class TooLarge(ValueError):
    """A collection that cannot fit in this machine's memory."""


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where POSIX cannot tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(num_episodes: int, max_steps: int, policy: Policy = RANDOM_POLICY, chunk_size: int | None = None,
                 max_rows: int | None = None) -> None:
    """Refuse, before any work, a collection that would not fit in half of this machine's memory.
    The rule: the rows it keeps (all held until saved: episodes x steps x ROW_BYTES, random
    episodes counted at their mean length, other policies' at max_steps, at most max_rows) plus one
    chunk's scan buffers (chunk episodes x max_steps x SCAN_STEP_BYTES: the scan runs max_steps
    for every episode, ended or not) must stay within half of the physical memory."""
    have = memory_bytes()
    if have is None:  # not POSIX: no estimate
        return
    chunk = num_episodes if chunk_size is None else min(chunk_size, num_episodes)
    steps = min(max_steps, RANDOM_EPISODE_STEPS) if policy is RANDOM_POLICY else max_steps
    rows = num_episodes * steps if max_rows is None else min(num_episodes * steps, max_rows)
    kept, scan = rows * ROW_BYTES, chunk * max_steps * SCAN_STEP_BYTES
    if kept + scan > have / 2:
        gib = 2**30
        raise TooLarge(f"{num_episodes:,} episodes of at most {max_steps:,} steps need about {(kept + scan) / gib:,.1f} "
                       f"GiB in memory ({kept / gib:,.1f} GiB of rows kept at {steps:g} steps of {ROW_BYTES:,} bytes, "
                       f"{scan / gib:,.1f} GiB of scan buffers for {chunk:,} episodes at a time), more than half of "
                       f"this machine's {have / gib:.1f} GiB: collect fewer episodes (in several datasets) or lower "
                       f"--max-steps")


def _chunks(
    key: jax.Array, num_episodes: int, policy: Policy, max_steps: int = 500, chunk_size: int = 1000,
    episode_offset: int = 0, progress: bool = True, max_rows: int | None = None, params: Any = None,
):
    """Yield each chunk's rows as a dict of numpy columns (frames rendered), in episode order; with
    max_rows, no more rows than that in all (see `collect`)."""
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")
    if num_episodes <= 0:
        raise ValueError(f"num_episodes must be positive, got {num_episodes}")
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    check_memory(num_episodes, max_steps, policy, chunk_size, max_rows)
    chunk_size = min(chunk_size, num_episodes)
    num_chunks = -(-num_episodes // chunk_size)
    bar = tqdm(total=num_episodes, desc="collect", unit="ep", disable=not progress, leave=False)
    for c in range(num_chunks):
        interrupt.check()  # Ctrl-C between chunks
        # Every chunk has the same size (one compile); surplus episodes of the last are dropped.
        out = jax.device_get(_collect_chunk_jit(policy, max_steps, jax.random.fold_in(key, c), chunk_size, params))
        keep = min(chunk_size, num_episodes - c * chunk_size)
        valid = out["valid"][:keep]  # [E, T]
        ep, t = np.nonzero(valid)  # row-major: episode-major, time ascending
        if max_rows is not None:  # the budget's last episode is cut where the budget ends
            ep, t = ep[:max_rows], t[:max_rows]
            max_rows -= ep.size
        cols = {
            "episode": (ep + c * chunk_size + episode_offset).astype(np.int32),
            "t": t.astype(np.int32),
            "action": out["action"][:keep][ep, t].astype(np.int32),
            "reward": out["reward"][:keep][ep, t].astype(np.float32),
            "done": out["done"][:keep][ep, t].astype(bool),
            "state": out["state"][:keep][ep, t].astype(np.float32),
        }
        cols["frame"] = render_states(cols["state"])
        bar.update(keep)
        yield {k: cols[k] for k in COLUMNS}
        if max_rows == 0:
            break
    bar.close()


def collect_arrays(key: jax.Array, num_episodes: int, policy: Policy = RANDOM_POLICY, **options: Any
                   ) -> dict[str, np.ndarray]:
    """`collect` without the Dataset wrapper: a dict of numpy columns, one row per step; `options`
    are collect's (max_steps, chunk_size, episode_offset, progress, max_rows, params)."""
    parts = list(_chunks(key, num_episodes, policy, **options))
    return {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}


def collect(
    key: jax.Array,
    num_episodes: int = 5000,
    policy: Policy = RANDOM_POLICY,
    max_steps: int = 500,
    chunk_size: int = 1000,
    episode_offset: int = 0,
    progress: bool = True,
    max_rows: int | None = None,
    params: Any = None,
) -> datasets.Dataset:
    """Run `num_episodes` episodes of `policy` (default: uniform random) and return a Dataset.

    With `max_rows`, the collection holds that many steps at most: in episode order, the episode
    that reaches the budget is cut there (a time limit: its last row has no done) and the episodes
    after it are dropped. A chunk's episodes run side by side, so the dropped rows were simulated,
    but they are discarded and not counted: the data and the count are those of an agent stopped
    at the budget.

    All episodes of a chunk run in one jitted program: a fixed-length scan of `max_steps` with a
    validity mask, vmapped over episodes. Frames are rendered afterwards from the stored states
    (`render` is a pure function of (x, theta)), so the random policy never renders dead steps.
    Each chunk becomes a Dataset (`Dataset.from_dict`) as soon as it is collected and the chunks
    are concatenated, so peak memory grows with the chunk, not the collection.
    The recipe's dataset is `collect(jax.random.key(123), 5000)`.
    """
    parts = [
        datasets.Dataset.from_dict(cols, features=FEATURES)
        for cols in _chunks(key, num_episodes, policy, max_steps, chunk_size, episode_offset, progress, max_rows,
                            params)
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --------------------------------------------------------------------------------------------
# Disk


class _quiet_datasets:
    """Silence datasets' own per-call progress bars (ours cover the work)."""

    def __enter__(self) -> None:
        from datasets.utils import logging as ds_logging

        self._was = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from datasets.utils import logging as ds_logging

        if self._was:
            ds_logging.enable_progress_bar()


def _files_manifest(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's bytes (hex): the checksum a dataset's manifest and an export's
    config.json record."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def identity(path: os.PathLike | str) -> str:
    """The content identity of a saved dataset: a hash of its data files' checksums (from the
    manifest, which `load_dataset` verifies). A run directory records it for the stages that
    consumed the data; collecting the same episodes again gives the same identity."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    sums = manifest["sha256"]
    data = sorted((name, value) for name, value in sums.items() if name.endswith(".arrow"))
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def save_dataset(ds: datasets.Dataset, path: os.PathLike | str, overwrite: bool = False) -> Path:
    """Save atomically: write into a sibling temporary directory, then rename it into place.

    The manifest (row count, file sizes and sha256 checksums) is written last, after the data is synced, so
    `load_dataset` refuses anything half-written. A crash leaves the old directory or the complete
    new one at `path`, except in the instant between the two renames of an overwrite, when the old
    data sits in `.NAME.old-*` beside it (`load_dataset` then says so).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        if not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if ds._indices is not None:  # a filtered/shuffled view: materialise it
            ds = ds.flatten_indices()
        with _quiet_datasets():
            ds.save_to_disk(str(tmp))
        for f in tmp.iterdir():  # data on disk before the manifest that vouches for it
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        files = _files_manifest(tmp)
        manifest = {"format_version": FORMAT_VERSION, "num_rows": ds.num_rows, "files": files,
                    "sha256": {name: sha256_file(tmp / name) for name in files}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def swap_in(tmp: Path, path: Path) -> None:
    """Make the finished folder `tmp` the folder `path`: an existing `path` is set aside as
    `.NAME.old-*` first, put back if the move fails, and removed after it succeeds (the datasets
    and the exported agents are saved this way)."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:  # put the previous folder back before giving up
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_features(path: Path, ds: datasets.Dataset) -> None:
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DatasetError(path, f"missing column(s) {missing}; expected {list(COLUMNS)}")
    for name in COLUMNS:
        got, want = ds.features[name], FEATURES[name]
        if name == "frame":
            shape = getattr(got, "shape", None)
            dtype = getattr(got, "dtype", None)
            if tuple(shape or ()) != (FRAME_SIZE, FRAME_SIZE):
                raise DatasetError(path, f"column 'frame' has shape {shape}, expected ({FRAME_SIZE}, {FRAME_SIZE})")
            if dtype != "uint8":
                raise DatasetError(path, f"column 'frame' has dtype {dtype}, expected uint8")
        elif got != want:
            raise DatasetError(path, f"column {name!r} has type {got}, expected {want}")


def _check_episodes(path: Path, episode: np.ndarray, t: np.ndarray) -> None:
    if episode.size == 0:
        raise DatasetError(path, "dataset has no rows")
    new_ep = np.concatenate([[True], episode[1:] != episode[:-1]])
    expected_t = np.arange(episode.size) - np.maximum.accumulate(np.where(new_ep, np.arange(episode.size), 0))
    bad = np.nonzero(t != expected_t)[0]
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            path, f"episode {int(episode[i])} has a gap in t at row {i}: t={int(t[i])}, expected {int(expected_t[i])}"
        )
    starts = episode[new_ep]
    if np.unique(starts).size != starts.size:
        raise DatasetError(path, "an episode's rows are not contiguous")


def load_dataset(path: os.PathLike | str) -> datasets.Dataset:
    """Load and validate a dataset written by `save_dataset`; raises DatasetError on any problem."""
    path = Path(path)
    if not path.is_dir():
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        hint = f" (an interrupted overwrite left the previous data in {leftovers[0]})" if leftovers else ""
        raise DatasetError(path, "no such dataset directory" + hint)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError(path, f"not a wm_jax dataset (no {MANIFEST}; incomplete or foreign directory)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
        num_rows = int(manifest["num_rows"])
        sums = dict(manifest.get("sha256") or {})
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"unreadable manifest {MANIFEST}: {type(e).__name__}: {e}") from None
    if set(sums) != set(files):
        raise DatasetError(path, f"its manifest has no checksum for {sorted(set(files) - set(sums))[:3]} (saved by an "
                                 f"older wm_jax, or edited): collect it again")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise DatasetError(path, f"file {name} is missing")
        if f.stat().st_size != size:
            raise DatasetError(path, f"file {name} is {f.stat().st_size} bytes, expected {size} (truncated or damaged)")
        if sha256_file(f) != sums[name]:
            raise DatasetError(path, f"file {name} does not match its checksum (damaged or changed since it was saved)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets/pyarrow raise many types for damaged files
        raise DatasetError(path, f"cannot be read as a Hugging Face dataset: {type(e).__name__}: {e}") from None
    if not isinstance(ds, datasets.Dataset):
        raise DatasetError(path, f"expected a single Dataset, found {type(ds).__name__}")
    if ds.num_rows != num_rows:
        raise DatasetError(path, f"has {ds.num_rows} rows, manifest says {num_rows}")
    _check_features(path, ds)
    _check_episodes(path, column(ds, "episode"), column(ds, "t"))
    _check_values(path, ds)
    return ds


def _first_bad(mask: np.ndarray) -> int | None:
    bad = np.nonzero(mask)[0]
    return int(bad[0]) if bad.size else None


def _check_values(path: Path, ds: datasets.Dataset) -> None:
    """Values as the env makes them: actions 0 or 1, finite physics states, rewards 1 - done of the
    step before (gymnax CartPole; always 1 within an episode), done only on an episode's last row."""
    action, state, reward, done = (column(ds, c) for c in ("action", "state", "reward", "done"))
    episode = column(ds, "episode")
    checks = (
        ((action != 0) & (action != 1), "action", lambda i: f"{int(action[i])} (CartPole has actions 0 and 1)"),
        (~np.isfinite(state).all(axis=1), "state", lambda i: f"{state[i].tolist()} (not finite)"),
        (reward != 1.0, "reward", lambda i: f"{float(reward[i])} (CartPole pays 1 per step)"),
        (done & np.concatenate([episode[1:] == episode[:-1], [False]]), "done",
         lambda i: "True before the episode's last row"),
    )
    for mask, name, describe in checks:
        i = _first_bad(mask)
        if i is not None:
            raise DatasetError(path, f"row {i} (episode {int(episode[i])}): {name} is {describe(i)}")


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """A column as numpy straight from Arrow (the `numpy` formatter upcasts frames to int64)."""
    col = ds.data.column(name).combine_chunks()
    if name == "frame":
        storage = col.storage if hasattr(col, "storage") else col
        return storage.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, FRAME_SIZE, FRAME_SIZE)
    if name == "state":
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4).astype(np.float32)
    return col.to_numpy(zero_copy_only=False)


def to_arrays(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    """All columns as numpy arrays (frames uint8[N, 64, 64]), honouring select/shuffle/filter views."""
    if ds._indices is not None:
        ds = ds.flatten_indices()
    return {name: column(ds, name) for name in COLUMNS}


# --------------------------------------------------------------------------------------------
# Batching


@dataclasses.dataclass(frozen=True)
class EpisodeIndex:
    """Row bookkeeping derived from (episode, t): stacks and boundaries, all numpy.

    stack_rows[i] = the rows of the 4-frame stack ending at row i (clamped to the episode's first
    row, so an episode's first stack repeats its first frame, as PixelCartPole's reset does).
    is_first[i]: row i starts an episode. is_last[i]: row i ends one (no next frame stored).
    """

    stack_rows: np.ndarray  # int32[N, 4]
    is_first: np.ndarray  # bool[N]
    is_last: np.ndarray  # bool[N]

    @staticmethod
    def from_columns(episode: np.ndarray, t: np.ndarray) -> "EpisodeIndex":
        rows = np.arange(episode.size)
        start = rows - t
        offsets = np.arange(-(STACK - 1), 1)
        stack_rows = np.maximum(rows[:, None] + offsets[None, :], start[:, None]).astype(np.int32)
        is_first = t == 0
        is_last = np.concatenate([episode[1:] != episode[:-1], [True]])
        return EpisodeIndex(stack_rows=stack_rows, is_first=is_first, is_last=is_last)


def stacks(frames: jax.Array, stack_rows: jax.Array, rows: jax.Array) -> jax.Array:
    """uint8[B, 64, 64, 4] frame stacks (newest last) for dataset rows `rows`."""
    return jnp.moveaxis(frames[stack_rows[rows]], -3, -1)


def sample_stacks(key: jax.Array, frames: jax.Array, stack_rows: jax.Array, batch_size: int) -> jax.Array:
    """A uniform random batch of frame stacks; never mixes episodes (stack_rows clamps)."""
    rows = jax.random.randint(key, (batch_size,), 0, stack_rows.shape[0])
    return stacks(frames, stack_rows, rows)


def sample_sequences(
    key: jax.Array, is_first: jax.Array, is_last: jax.Array, batch_size: int, length: int = 32
) -> dict[str, jax.Array]:
    """Random windows of `length` consecutive rows for sequence models, with boundary masks.

    Returns int32 rows[B, L] and bool masks of shape [B, L]:
      reset: start from a fresh carry before this step (window start or an episode's first row);
      valid: the row exists (windows running past the dataset's end are padded and masked);
      next_valid: valid and the next frame belongs to the same episode (a latent target exists).
    A window may run across an episode boundary: `reset` cuts the recurrence there.
    """
    n = is_first.shape[0]
    start = jax.random.randint(key, (batch_size, 1), 0, n)
    raw = start + jnp.arange(length)[None, :]
    valid = raw < n
    rows = jnp.minimum(raw, n - 1).astype(jnp.int32)
    reset = is_first[rows] | (jnp.arange(length)[None, :] == 0)
    next_valid = valid & ~is_last[rows]
    return {"rows": rows, "reset": reset, "valid": valid, "next_valid": next_valid}
