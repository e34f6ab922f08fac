"""The on-disk dataset (schema, atomic save, validated load) and the batchers the models train on.

Rows come from collection.py's `collect`. One row is one step: the observation frame at time t (the
newest frame only; the 4-frame stacks are rebuilt at load from the rows before it), the action
taken, its reward, whether it terminated the episode, and the physics state. The frame after the final action is not stored,
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
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import envs, stats
from wm_jax.envs.draw import FRAME_SIZE, STACK

MANIFEST = "wm_jax_manifest.json"
FORMAT_VERSION = 1
COLUMNS = ("episode", "t", "frame", "action", "reward", "done", "state")
DEFAULT_ENV = "CartPole-v1"  # the task of a dataset whose manifest names none (saved before tasks had names)


def features(env: str = DEFAULT_ENV) -> datasets.Features:
    """The schema of task `env`'s datasets: the action an int32 (discrete) or float32 vector
    (continuous), the state `envs.codec(env).size` float32 numbers."""
    space = envs.spec(env).action_space
    action = (datasets.Value("int32") if space.kind == "discrete"
              else datasets.Sequence(datasets.Value("float32"), length=int(np.prod(space.shape))))
    return datasets.Features(
        {
            "episode": datasets.Value("int32"),
            "t": datasets.Value("int32"),
            "frame": datasets.Array2D((FRAME_SIZE, FRAME_SIZE), "uint8"),
            "action": action,
            "reward": datasets.Value("float32"),
            "done": datasets.Value("bool"),
            "state": datasets.Sequence(datasets.Value("float32"), length=envs.codec(env).size),
        }
    )


FEATURES = features()  # CartPole-v1's


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or does not match the wm_jax schema."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


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


def save_dataset(ds: datasets.Dataset, path: os.PathLike | str, overwrite: bool = False, env: str = DEFAULT_ENV
                 ) -> Path:
    """Save task `env`'s episodes atomically: write into a sibling temporary directory, then rename
    it into place (the manifest names the task; `load_dataset` checks the rows against it).

    The manifest (the task, row count, file sizes and sha256 checksums) is written last, after the data is synced, so
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
        manifest = {"format_version": FORMAT_VERSION, "env": env, "num_rows": ds.num_rows, "files": files,
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


def _check_features(path: Path, ds: datasets.Dataset, env: str) -> None:
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DatasetError(path, f"missing column(s) {missing}; expected {list(COLUMNS)}")
    expected = features(env)
    for name in COLUMNS:
        got, want = ds.features[name], expected[name]
        if name == "frame":
            shape = getattr(got, "shape", None)
            dtype = getattr(got, "dtype", None)
            if tuple(shape or ()) != (FRAME_SIZE, FRAME_SIZE):
                raise DatasetError(path, f"column 'frame' has shape {shape}, expected ({FRAME_SIZE}, {FRAME_SIZE})")
            if dtype != "uint8":
                raise DatasetError(path, f"column 'frame' has dtype {dtype}, expected uint8")
        elif got != want:
            raise DatasetError(path, f"column {name!r} has type {got}, expected {want} ({env}'s)")


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


def load_dataset(path: os.PathLike | str, env: str | None = None) -> datasets.Dataset:
    """Load and validate a dataset written by `save_dataset`: its schema and values are checked as
    its task's (the manifest's; CartPole-v1 where it names none), and with `env`, that task must be
    `env`. Raises DatasetError on any problem."""
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
        task = str(manifest.get("env", DEFAULT_ENV))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
        raise DatasetError(path, f"unreadable manifest {MANIFEST}: {type(e).__name__}: {e}") from None
    if env is not None and task != env:
        raise DatasetError(path, f"holds {task} episodes, not {env}'s")
    if task not in envs.names():
        raise DatasetError(path, f"holds episodes of {task!r}, which is not registered in this process (known: "
                                 f"{', '.join(envs.names())})")
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
    _check_features(path, ds, task)
    _check_episodes(path, column(ds, "episode"), column(ds, "t"))
    _check_values(path, ds, task)
    return ds


def task(path: os.PathLike | str) -> str:
    """The task a saved dataset holds (its manifest's; CartPole-v1 where it names none)."""
    try:
        return str(json.loads((Path(path) / MANIFEST).read_text()).get("env", DEFAULT_ENV))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise DatasetError(path, f"unreadable manifest {MANIFEST}: {type(e).__name__}: {e}") from None


def _first_bad(mask: np.ndarray) -> int | None:
    bad = np.nonzero(mask)[0]
    return int(bad[0]) if bad.size else None


def _action_problems(env: str, action: np.ndarray) -> tuple[np.ndarray, Any]:
    """(rows whose action task `env` cannot take, what to say of row i)."""
    space = envs.spec(env).action_space
    if space.kind == "discrete":
        return ((action < 0) | (action >= space.n),
                lambda i: f"{int(action[i])} ({env} has actions 0 to {space.n - 1})")
    low = np.broadcast_to(np.asarray(space.low, np.float32), action.shape[1:])
    high = np.broadcast_to(np.asarray(space.high, np.float32), action.shape[1:])
    bad = ~(np.isfinite(action) & (action >= low) & (action <= high)).all(axis=1)
    return bad, lambda i: f"{action[i].tolist()} ({env}'s actions are within [{space.low}, {space.high}])"


def _check_values(path: Path, ds: datasets.Dataset, env: str) -> None:
    """Values as task `env` makes them: actions it can take, finite states, finite rewards within what
    one step can pay (EnvSpec.reward_range), done only on an episode's last row."""
    action, state, reward, done = (column(ds, c) for c in ("action", "state", "reward", "done"))
    episode = column(ds, "episode")
    low, high = envs.spec(env).reward_range or (-np.inf, np.inf)
    checks = (
        (*_action_problems(env, action), "action"),
        (~np.isfinite(state).all(axis=1), lambda i: f"{state[i].tolist()} (not finite)", "state"),
        (~(np.isfinite(reward) & (reward >= low) & (reward <= high)), lambda i: f"{float(reward[i])} ({env} pays "
         f"{low:g} per step)" if low == high else f"{float(reward[i])} ({env} pays {low:g} to {high:g} per step)",
         "reward"),
        (done & np.concatenate([episode[1:] == episode[:-1], [False]]), lambda i: "True before the episode's last row",
         "done"),
    )
    for mask, describe, name in checks:
        i = _first_bad(mask)
        if i is not None:
            raise DatasetError(path, f"row {i} (episode {int(episode[i])}): {name} is {describe(i)}")


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """A column as numpy straight from Arrow (the `numpy` formatter upcasts frames to int64)."""
    col = ds.data.column(name).combine_chunks()
    if name == "frame":
        storage = col.storage if hasattr(col, "storage") else col
        return storage.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, FRAME_SIZE, FRAME_SIZE)
    if name == "state" or (name == "action" and isinstance(ds.features[name], datasets.Sequence)):
        width = ds.features[name].length
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)
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
    row, so an episode's first stack repeats its first frame, as the pixel environments' resets do).
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
    key: jax.Array, is_first: jax.Array, is_last: jax.Array, batch_size: int, length: int = 32,
    rows: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Random windows of `length` consecutive rows for sequence models, with boundary masks.

    Returns int32 rows[B, L] and bool masks of shape [B, L]:
      reset: start from a fresh carry before this step (window start or an episode's first row);
      valid: the row exists (windows running past the dataset's end are padded and masked);
      next_valid: valid and the next frame belongs to the same episode (a latent target exists).
    A window may run across an episode boundary: `reset` cuts the recurrence there. `rows` (traced)
    counts the rows that exist when the arrays are padded beyond them (a batch of seeds' datasets
    of different sizes); the same key draws the same windows as from the unpadded arrays.
    """
    n = is_first.shape[0] if rows is None else rows
    start = jax.random.randint(key, (batch_size, 1), 0, n)
    raw = start + jnp.arange(length)[None, :]
    valid = raw < n
    rows = jnp.minimum(raw, n - 1).astype(jnp.int32)
    reset = is_first[rows] | (jnp.arange(length)[None, :] == 0)
    next_valid = valid & ~is_last[rows]
    return {"rows": rows, "reset": reset, "valid": valid, "next_valid": next_valid}


def sequence_batch(
    key: jax.Array, d: dict[str, jax.Array], batch: int, length: int
) -> dict[str, jax.Array]:
    """A training batch: windows of rows with z and z_next resampled from the encoder posterior.

    d holds per-row arrays: mean, logvar [N, latent], action, reward, done [N], is_first, is_last [N],
    and optionally "rows", the count of them that exist (padded arrays: `sample_sequences`).
    """
    key_w, key_z, key_n = jax.random.split(key, 3)
    n = d.get("rows", d["mean"].shape[0])
    seq = sample_sequences(key_w, d["is_first"], d["is_last"], batch, length, d.get("rows"))
    rows = seq["rows"]
    nxt = jnp.minimum(rows + 1, n - 1)

    return {
        "z": stats.gaussian_sample(key_z, d["mean"][rows], d["logvar"][rows]),
        "z_next": stats.gaussian_sample(key_n, d["mean"][nxt], d["logvar"][nxt]),
        "action": d["action"][rows],
        "reward": d["reward"][rows],
        "done": d["done"][rows],
        "reset": seq["reset"],
        "valid": seq["valid"],
        "next_valid": seq["next_valid"],
    }


def training_arrays(mean, logvar, columns: dict[str, Any], index: Any) -> dict[str, Any]:
    """The per-row arrays M's and K's training sample from (`sequence_batch`): V's posteriors plus a
    dataset's columns and boundaries."""
    return {
        "mean": mean, "logvar": logvar, "action": columns["action"], "reward": columns["reward"],
        "done": columns["done"], "is_first": index.is_first, "is_last": index.is_last,
    }
