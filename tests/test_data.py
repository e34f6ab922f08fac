"""Tests for wm_jax.store.data: collection, the on-disk dataset, its validation, and the batchers.

Offline and small: a few dozen episodes in chunks of 16, so several chunks (and a partial last one)
are exercised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.store import collection
from wm_jax.store import data as D
from wm_jax.envs.cartpole import render

datasets.disable_progress_bars()

N_EPISODES = 40
CHUNK = 16  # 40 episodes -> 3 chunks, the last one partial
THETA_MAX = 12 * 2 * np.pi / 360


def _collect(key, n=N_EPISODES, **kw):
    kw.setdefault("chunk_size", CHUNK)
    return collection.collect(key, n, progress=False, **kw)


@pytest.fixture(scope="module")
def ds() -> datasets.Dataset:
    return _collect(jax.random.key(0))


@pytest.fixture(scope="module")
def arrays(ds) -> dict[str, np.ndarray]:
    return D.to_arrays(ds)


def _episode_bounds(episode: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the runs of equal episode ids."""
    change = np.nonzero(np.diff(episode))[0] + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [episode.size]])
    return list(zip(starts.tolist(), stops.tolist()))


def _step_np(s: np.ndarray, action: int) -> np.ndarray:
    """CartPole-v1 physics (gym's Euler step) in float64."""
    x, x_dot, theta, theta_dot = (float(v) for v in s)
    force = 10.0 if action == 1 else -10.0
    cos, sin = np.cos(theta), np.sin(theta)
    temp = (force + 0.05 * theta_dot**2 * sin) / 1.1
    thetaacc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos**2 / 1.1))
    xacc = temp - 0.05 * thetaacc * cos / 1.1
    return np.array([x + 0.02 * x_dot, x_dot + 0.02 * xacc, theta + 0.02 * theta_dot, theta_dot + 0.02 * thetaacc])


def _out_of_bounds(s: np.ndarray) -> bool:
    return abs(s[0]) > 2.4 or abs(s[2]) > THETA_MAX


# ---------------------------------------------------------------------------------------------
# collect


def test_collect_schema(ds, arrays):
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == list(D.COLUMNS) == ["episode", "t", "frame", "action", "reward", "done", "state"]
    assert ds.features == D.FEATURES
    n = ds.num_rows
    assert n > N_EPISODES
    assert arrays["frame"].dtype == np.uint8 and arrays["frame"].shape == (n, 64, 64)
    assert arrays["state"].dtype == np.float32 and arrays["state"].shape == (n, 4)
    assert arrays["episode"].dtype == np.int32 and arrays["t"].dtype == np.int32
    assert arrays["action"].dtype == np.int32 and set(np.unique(arrays["action"]).tolist()) == {0, 1}
    assert arrays["reward"].dtype == np.float32 and (arrays["reward"] == 1.0).all()
    assert arrays["done"].dtype == bool
    # to_arrays reads Arrow directly; the datasets formatter must agree on every value.
    via_datasets = ds.with_format("numpy")
    for name in D.COLUMNS:
        np.testing.assert_array_equal(np.asarray(via_datasets[name]), arrays[name], err_msg=name)


def test_collect_episode_structure(arrays):
    episode, t, done = arrays["episode"], arrays["t"], arrays["done"]
    bounds = _episode_bounds(episode)
    assert len(bounds) == N_EPISODES
    assert [int(episode[a]) for a, _ in bounds] == list(range(N_EPISODES))  # contiguous, ascending ids
    for a, b in bounds:
        np.testing.assert_array_equal(t[a:b], np.arange(b - a))
        # Random CartPole episodes all terminate well before 500 steps: exactly the last row is done.
        assert b - a < 500
        assert done[b - 1] and not done[a : b - 1].any()
    assert done.sum() == N_EPISODES


def test_collect_states_follow_the_physics(arrays):
    state, action, episode = arrays["state"], arrays["action"], arrays["episode"]
    for a, b in _episode_bounds(episode):
        assert (np.abs(state[a]) <= 0.05).all()  # CartPole's reset distribution
        for i in range(a, b):
            nxt = _step_np(state[i], int(action[i]))
            if i + 1 < b:
                # Each row stores the state the action was taken in; the next row is its successor.
                np.testing.assert_allclose(state[i + 1], nxt, rtol=0, atol=1e-5)
                assert not _out_of_bounds(state[i + 1])
            else:
                assert _out_of_bounds(nxt), "the done row's action must end the episode"


def test_collect_frames_render_the_state(arrays):
    state, frame = arrays["state"], arrays["frame"]
    expected = np.asarray(jax.vmap(render)(jnp.asarray(state[:, 0]), jnp.asarray(state[:, 2])))
    np.testing.assert_array_equal(frame, expected)
    for i in (0, 1, len(frame) // 2, len(frame) - 1):
        np.testing.assert_array_equal(frame[i], np.asarray(render(state[i, 0], state[i, 2])))


def test_collect_truncates_at_max_steps():
    arrays = D.to_arrays(_collect(jax.random.key(2), 20, max_steps=10, chunk_size=8))
    episode, t, done = arrays["episode"], arrays["t"], arrays["done"]
    bounds = _episode_bounds(episode)
    assert len(bounds) == 20
    lengths = [b - a for a, b in bounds]
    assert max(lengths) == 10
    assert sum(length == 10 for length in lengths) >= 10  # most random episodes outlive 10 steps
    for a, b in bounds:
        np.testing.assert_array_equal(t[a:b], np.arange(b - a))
        assert not done[a : b - 1].any()
        if b - a == 10:
            # Cut short by max_steps: not terminated (unless the 10th action happened to end it).
            assert done[b - 1] == _out_of_bounds(_step_np(arrays["state"][b - 1], int(arrays["action"][b - 1])))
        else:
            assert done[b - 1]
    long_rows = [b - 1 for a, b in bounds if b - a == 10]
    assert not done[long_rows].all()


def test_collect_stops_at_a_step_budget(arrays):
    """max_rows: the same episodes in the same order, up to the budget; the episode that reaches it
    is cut there (no done on its last row) and none after it is kept, across chunk boundaries."""
    starts = np.flatnonzero(np.diff(np.append(-1, arrays["episode"])))
    budget = int(starts[20]) + 3  # three steps into episode 20 (chunk 2 of 3)
    assert arrays["episode"][budget - 1] == arrays["episode"][starts[20]] and not arrays["done"][budget - 1]
    cut = D.to_arrays(_collect(jax.random.key(0), max_rows=budget))
    assert len(cut["episode"]) == budget
    for name in D.COLUMNS:
        np.testing.assert_array_equal(cut[name], arrays[name][:budget], err_msg=name)
    assert np.unique(cut["episode"]).size == 21
    whole = D.to_arrays(_collect(jax.random.key(0), max_rows=len(arrays["episode"]) + 5))  # budget never reached
    np.testing.assert_array_equal(whole["episode"], arrays["episode"])
    with pytest.raises(ValueError, match="max_rows"):
        _collect(jax.random.key(0), max_rows=0)


@pytest.mark.slow
def test_collect_is_deterministic(arrays):
    again = D.to_arrays(_collect(jax.random.key(0)))
    for name in D.COLUMNS:
        np.testing.assert_array_equal(again[name], arrays[name], err_msg=name)

    other = D.to_arrays(_collect(jax.random.key(1)))
    assert other["state"].shape != arrays["state"].shape or not np.array_equal(other["state"], arrays["state"])
    assert not np.array_equal(other["state"][:10], arrays["state"][:10])

    offset = D.to_arrays(_collect(jax.random.key(0), episode_offset=1000))
    np.testing.assert_array_equal(offset["episode"], arrays["episode"] + 1000)
    np.testing.assert_array_equal(offset["state"], arrays["state"])


def test_collect_rejects_bad_arguments():
    with pytest.raises(ValueError):
        collection.collect_arrays(jax.random.key(0), 0)
    with pytest.raises(ValueError):
        collection.collect_arrays(jax.random.key(0), 4, max_steps=0)
    with pytest.raises(ValueError):
        collection.collect_arrays(jax.random.key(0), 4, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# save / load


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in D.COLUMNS:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_save_load_round_trip(ds, arrays, tmp_path):
    path = tmp_path / "sub" / "ds"
    assert D.save_dataset(ds, path) == path
    loaded = D.load_dataset(path)
    assert isinstance(loaded, datasets.Dataset) and loaded.num_rows == ds.num_rows
    _assert_same(D.to_arrays(loaded), arrays)
    assert (path / D.MANIFEST).is_file()
    manifest = json.loads((path / D.MANIFEST).read_text())
    assert manifest["num_rows"] == ds.num_rows
    # Atomic save: nothing but the target is left in the parent directory (no .tmp-/.old- dirs).
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds"]
    # An existing empty directory may be written into.
    empty = tmp_path / "empty"
    empty.mkdir()
    D.save_dataset(ds, empty)
    _assert_same(D.to_arrays(D.load_dataset(empty)), arrays)


def test_save_refuses_to_clobber_and_overwrite_replaces(ds, tmp_path):
    path = tmp_path / "ds"
    D.save_dataset(ds, path)
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError):
        D.save_dataset(ds, path)
    assert sorted(os.listdir(path)) == before

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        D.save_dataset(ds, other_dir)
    assert (other_dir / "notes.txt").read_text() == "keep me"

    small = ds.select(range(0, int(np.nonzero(D.to_arrays(ds)["done"])[0][2]) + 1))  # first 3 episodes
    D.save_dataset(small, path, overwrite=True)
    loaded = D.load_dataset(path)
    assert loaded.num_rows == small.num_rows < ds.num_rows
    _assert_same(D.to_arrays(loaded), D.to_arrays(small))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "other"]


def test_save_materialises_an_index_view(ds, tmp_path):
    # A non-contiguous selection (an indices mapping in datasets) is saved as the rows it shows.
    arrays = D.to_arrays(ds)
    first_two = np.nonzero(arrays["episode"] < 2)[0]
    ep3 = np.nonzero(arrays["episode"] == 3)[0]
    view = ds.select(np.concatenate([first_two, ep3]).tolist())
    D.save_dataset(view, tmp_path / "v")
    loaded = D.to_arrays(D.load_dataset(tmp_path / "v"))
    np.testing.assert_array_equal(loaded["episode"], arrays["episode"][np.concatenate([first_two, ep3])])
    np.testing.assert_array_equal(loaded["frame"], arrays["frame"][np.concatenate([first_two, ep3])])


def test_to_arrays_respects_an_index_view(ds, arrays):
    view = ds.select([5, 0, 3])
    got = D.to_arrays(view)
    assert got["t"].shape == (3,)
    np.testing.assert_array_equal(got["state"], arrays["state"][[5, 0, 3]])


def test_failed_save_leaves_old_dataset_and_no_temp_dirs(ds, small_ds, tmp_path, monkeypatch):
    path = D.save_dataset(small_ds, tmp_path / "ds")

    def broken_save(self, dataset_path, *args, **kwargs):
        Path(dataset_path).mkdir(parents=True, exist_ok=True)
        (Path(dataset_path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken_save)
    with pytest.raises(OSError, match="disk full"):
        D.save_dataset(ds, path, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        D.save_dataset(ds, tmp_path / "new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    _assert_same(D.to_arrays(D.load_dataset(path)), D.to_arrays(small_ds))


def test_overwrite_interrupted_between_renames_keeps_a_dataset(ds, small_ds, tmp_path, monkeypatch):
    path = D.save_dataset(small_ds, tmp_path / "ds")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # between "old aside" and "new into place", e.g. a KeyboardInterrupt
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        D.save_dataset(ds, path, overwrite=True)
    monkeypatch.undo()
    D.load_dataset(path)  # either the old or the new dataset must be at `path`


# --- bad datasets ------------------------------------------------------------------------------


def _assert_rejected(path: Path, *words: str) -> D.DatasetError:
    with pytest.raises(D.DatasetError) as info:
        D.load_dataset(path)
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    assert str(path) in msg and err.path == str(path)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return err


@pytest.fixture(scope="module")
def small_ds(ds) -> datasets.Dataset:
    """The first four episodes (enough rows for every corruption, quick to save)."""
    last = int(np.nonzero(D.to_arrays(ds)["done"])[0][3])
    return ds.select(range(last + 1))


def test_load_rejects_non_datasets(tmp_path):
    _assert_rejected(tmp_path / "missing", "no such dataset directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_rejected(empty, D.MANIFEST)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "random.bin").write_bytes(os.urandom(1000))
    _assert_rejected(junk, D.MANIFEST)
    a_file = tmp_path / "file.arrow"
    a_file.write_bytes(b"not a dir")
    _assert_rejected(a_file, "no such dataset directory")


def test_load_rejects_missing_column(small_ds, tmp_path):
    path = D.save_dataset(small_ds.remove_columns("reward"), tmp_path / "ds")
    _assert_rejected(path, "missing column", "reward")


@pytest.mark.parametrize(
    "column, feature, words",
    [
        ("action", datasets.Value("float32"), ("'action'", "float32")),
        ("done", datasets.Value("int32"), ("'done'",)),
        ("frame", datasets.Array2D((64, 64), "uint16"), ("'frame'", "uint16")),
    ],
)
def test_load_rejects_wrong_dtype(small_ds, tmp_path, column, feature, words):
    path = D.save_dataset(small_ds.cast_column(column, feature), tmp_path / "ds")
    _assert_rejected(path, *words)


def test_load_rejects_wrong_frame_shape(small_ds, tmp_path):
    cols = D.to_arrays(small_ds)
    cols["frame"] = np.ascontiguousarray(cols["frame"][:, :32, :32])
    features = datasets.Features({**D.FEATURES, "frame": datasets.Array2D((32, 32), "uint8")})
    path = D.save_dataset(datasets.Dataset.from_dict(cols, features=features), tmp_path / "ds")
    _assert_rejected(path, "'frame'", "shape", "(32, 32)")


def test_load_rejects_gap_in_t(small_ds, tmp_path):
    t = D.to_arrays(small_ds)["t"]
    ep = D.to_arrays(small_ds)["episode"]
    drop = int(np.nonzero((ep == 1) & (t == 4))[0][0])  # a middle row of episode 1
    keep = [i for i in range(small_ds.num_rows) if i != drop]
    path = D.save_dataset(small_ds.select(keep), tmp_path / "ds")
    _assert_rejected(path, "gap in t", "episode 1", f"row {drop}")


def test_load_rejects_non_contiguous_episode(small_ds, tmp_path):
    ep = D.to_arrays(small_ds)["episode"]
    rows = np.concatenate([np.nonzero(ep == 0)[0], np.nonzero(ep == 1)[0], np.nonzero(ep == 0)[0]])
    path = D.save_dataset(small_ds.select(rows.tolist()), tmp_path / "ds")
    _assert_rejected(path, "not contiguous")


def test_load_rejects_truncated_file(small_ds, tmp_path):
    path = D.save_dataset(small_ds, tmp_path / "ds")
    (arrow,) = sorted(path.glob("*.arrow"))
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.truncate(size // 2)
    _assert_rejected(path, arrow.name, "truncated")


def test_load_rejects_unreadable_file_of_the_right_size(small_ds, tmp_path):
    path = D.save_dataset(small_ds, tmp_path / "ds")
    (arrow,) = sorted(path.glob("*.arrow"))
    with open(arrow, "r+b") as f:  # clobber the Arrow stream header, keep the size
        f.write(b"\xff" * 64)
    _assert_rejected(path, arrow.name, "checksum")
    # a manifest without checksums (an older wm_jax's, or edited) is refused before any read
    manifest = json.loads((path / D.MANIFEST).read_text())
    del manifest["sha256"]
    (path / D.MANIFEST).write_text(json.dumps(manifest))
    _assert_rejected(path, "no checksum", "collect it again")


def test_load_rejects_a_same_size_overwrite_inside_the_data(small_ds, tmp_path):
    """Bytes changed in the middle of the Arrow file (the frames), size kept: datasets reads it
    without complaint; the manifest's checksum does not."""
    path = D.save_dataset(small_ds, tmp_path / "ds")
    (arrow,) = sorted(path.glob("*.arrow"))
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x07" * 256)
    D.datasets.load_from_disk(str(path))  # datasets itself reads the damage without complaint
    _assert_rejected(path, arrow.name, "checksum")


def _save_columns(ds, path: Path, **changes):
    """ds with some columns replaced, saved (with a fresh manifest) as a wm_jax dataset."""
    cols = D.to_arrays(ds)
    for name, fn in changes.items():
        cols[name] = fn(cols[name].copy())
    return D.save_dataset(datasets.Dataset.from_dict(cols, features=D.FEATURES), path)


@pytest.mark.parametrize("column, change, words", [
    ("action", lambda a: np.where(np.arange(a.size) == 3, 7, a), ("row 3", "action is 7")),
    ("state", lambda s: np.where(np.arange(len(s))[:, None] == 5, np.nan, s), ("row 5", "state", "not finite")),
    ("reward", lambda r: np.where(np.arange(r.size) == 2, 5.0, r), ("row 2", "reward is 5.0")),
    ("done", lambda d: np.where(np.arange(d.size) == 0, True, d), ("row 0", "done")),
])
def test_load_rejects_values_the_env_cannot_make(small_ds, tmp_path, column, change, words):
    path = _save_columns(small_ds, tmp_path / "ds", **{column: change})
    _assert_rejected(path, *words)


def test_identity_is_the_content(small_ds, tmp_path):
    a = D.save_dataset(small_ds, tmp_path / "a")
    b = D.save_dataset(small_ds, tmp_path / "b")
    assert D.identity(a) == D.identity(b)
    c = _save_columns(small_ds, tmp_path / "c", action=lambda x: 1 - x)
    assert D.identity(c) != D.identity(a)


def test_collection_too_large_for_memory_is_refused_before_any_work():
    with pytest.raises(collection.TooLarge, match="GiB"):
        collection.collect(jax.random.key(0), 100_000_000_000)


@pytest.mark.parametrize("max_steps", [10**9, 10**11])
def test_a_step_limit_whose_scan_buffers_exceed_memory_is_refused_before_any_work(monkeypatch, max_steps):
    """One episode: the kept rows are tiny, but the scan writes max_steps steps for every episode."""
    monkeypatch.setattr(collection, "_collect_chunk_jit", lambda *a: pytest.fail("the scan was compiled"))
    with pytest.raises(collection.TooLarge, match="scan buffers"):
        collection.collect(jax.random.key(0), 1, max_steps=max_steps, progress=False)


def test_the_memory_rule_counts_rows_and_one_chunks_scan(monkeypatch):
    monkeypatch.setattr(collection, "memory_bytes", lambda: 2 * 10**9)  # half: 10**9 bytes
    per_episode_scan = 500 * collection.SCAN_STEP_BYTES
    collection.check_memory(1000, 500, chunk_size=1000)  # 1000 x 22.5 x 4132 + 1000 x 30,000 = 123 MB
    with pytest.raises(collection.TooLarge):  # 10**4 x 22.5 x 4132 = 930 MB of rows + 300 MB of one chunk's scan
        collection.check_memory(10**4, 500, chunk_size=10**4)
    collection.check_memory(10**4, 500, chunk_size=10**9 // per_episode_scan // 20)  # a small chunk fits
    with pytest.raises(collection.TooLarge):  # a pixel policy's episodes are counted at max_steps
        collection.check_memory(1000, 500, policy=collection.Policy(act=lambda p, k, c, o: (0, c)), chunk_size=1)


def test_load_rejects_half_written_directories(small_ds, tmp_path):
    # datasets' own save without the manifest (what a crash before the manifest would leave).
    raw = tmp_path / "raw"
    small_ds.save_to_disk(str(raw))
    _assert_rejected(raw, D.MANIFEST)
    # A wm_jax save whose manifest was lost.
    path = D.save_dataset(small_ds, tmp_path / "ds")
    (path / D.MANIFEST).unlink()
    _assert_rejected(path, D.MANIFEST)
    # A garbled manifest, and a manifest naming a file that is not there.
    path2 = D.save_dataset(small_ds, tmp_path / "ds2")
    (path2 / D.MANIFEST).write_text("{not json")
    _assert_rejected(path2, "manifest")
    path3 = D.save_dataset(small_ds, tmp_path / "ds3")
    (path3 / "state.json").unlink()
    _assert_rejected(path3, "state.json", "missing")


def test_load_rejects_row_count_mismatch(small_ds, tmp_path):
    path = D.save_dataset(small_ds, tmp_path / "ds")
    manifest = json.loads((path / D.MANIFEST).read_text())
    manifest["num_rows"] += 1
    (path / D.MANIFEST).write_text(json.dumps(manifest))
    _assert_rejected(path, "rows")


# ---------------------------------------------------------------------------------------------
# Batching


def _expected_stack_rows(episode: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Independent reference: rows i-3..i, clamped to the episode's first row."""
    out = np.empty((episode.size, 4), np.int64)
    start = 0
    for i in range(episode.size):
        if i > 0 and episode[i] != episode[i - 1]:
            start = i
        out[i] = [max(i - k, start) for k in (3, 2, 1, 0)]
    return out


def _id_frames(n: int) -> np.ndarray:
    """Frames that encode their own row number in two pixels."""
    frames = np.zeros((n, 64, 64), np.uint8)
    frames[:, 0, 0] = np.arange(n) // 256
    frames[:, 0, 1] = np.arange(n) % 256
    return frames


def test_episode_index(arrays):
    episode, t = arrays["episode"], arrays["t"]
    idx = D.EpisodeIndex.from_columns(episode, t)
    n = episode.size
    assert idx.stack_rows.shape == (n, 4)
    np.testing.assert_array_equal(idx.stack_rows, _expected_stack_rows(episode, t))
    np.testing.assert_array_equal(idx.is_first, t == 0)
    is_last = np.zeros(n, bool)
    is_last[[b - 1 for _, b in _episode_bounds(episode)]] = True
    np.testing.assert_array_equal(idx.is_last, is_last)
    # is_last rows are the done rows here (every random episode terminated).
    np.testing.assert_array_equal(idx.is_last, arrays["done"])


def test_stacks_match_the_environment(arrays):
    episode, t, frames, state = arrays["episode"], arrays["t"], arrays["frame"], arrays["state"]
    idx = D.EpisodeIndex.from_columns(episode, t)
    rows = np.arange(episode.size)
    got = np.asarray(D.stacks(jnp.asarray(frames), jnp.asarray(idx.stack_rows), jnp.asarray(rows)))
    assert got.shape == (episode.size, 64, 64, 4) and got.dtype == np.uint8
    for a, b in _episode_bounds(episode):
        # The first stack of an episode is what PixelCartPole.reset shows: four copies of frame 0.
        first = np.asarray(render(state[a, 0], state[a, 2]))
        np.testing.assert_array_equal(got[a], np.repeat(first[..., None], 4, axis=-1))
        # Later stacks: the frames of rows i-3..i (clamped), newest last, as PixelCartPole.step pushes.
        for i in range(a + 1, b):
            prev = got[i - 1]
            np.testing.assert_array_equal(got[i][..., :3], prev[..., 1:])
            np.testing.assert_array_equal(got[i][..., -1], frames[i])


def test_sample_stacks(arrays):
    episode, t = arrays["episode"], arrays["t"]
    n = episode.size
    idx = D.EpisodeIndex.from_columns(episode, t)
    frames = jnp.asarray(_id_frames(n))
    stack_rows = jnp.asarray(idx.stack_rows)
    batch = D.sample_stacks(jax.random.key(0), frames, stack_rows, 512)
    assert batch.shape == (512, 64, 64, 4) and batch.dtype == jnp.uint8
    batch = np.asarray(batch)
    ids = batch[:, 0, 0, :].astype(np.int64) * 256 + batch[:, 0, 1, :]  # [B, 4] row of each frame
    expected = _expected_stack_rows(episode, t)
    newest = ids[:, -1]
    np.testing.assert_array_equal(ids, expected[newest])  # newest last, clamped at the episode start
    assert (episode[ids] == episode[newest][:, None]).all()  # never mixes episodes
    assert (np.diff(ids, axis=1) >= 0).all()
    assert (t[newest] < 3).any() and (t[newest] >= 3).any()
    assert len(np.unique(newest)) > 200  # spread over the dataset

    again = np.asarray(D.sample_stacks(jax.random.key(0), frames, stack_rows, 512))
    np.testing.assert_array_equal(again, batch)
    other = np.asarray(D.sample_stacks(jax.random.key(1), frames, stack_rows, 512))
    assert not np.array_equal(other, batch)

    # On the real frames too: shape, dtype, and stacks that exist in the dataset.
    real = np.asarray(D.sample_stacks(jax.random.key(2), jnp.asarray(arrays["frame"]), stack_rows, 8))
    assert real.shape == (8, 64, 64, 4) and real.dtype == np.uint8


def _check_sequences(out, episode: np.ndarray, t: np.ndarray, batch: int, length: int) -> None:
    n = episode.size
    rows, reset, valid, next_valid = (np.asarray(out[k]) for k in ("rows", "reset", "valid", "next_valid"))
    for arr, dtype in ((rows, np.int32), (reset, bool), (valid, bool), (next_valid, bool)):
        assert arr.shape == (batch, length) and arr.dtype == dtype
    assert (rows >= 0).all() and (rows < n).all()
    assert reset[:, 0].all() and valid[:, 0].all()
    start = rows[:, :1].astype(np.int64)
    raw = start + np.arange(length)[None, :]
    # valid is False exactly for padded positions past the dataset's end.
    np.testing.assert_array_equal(valid, raw < n)
    np.testing.assert_array_equal(rows[valid], raw[valid])
    # Consecutive rows from different episodes: reset at the later one. Otherwise reset only at an
    # episode's first row.
    ep = episode[rows]
    crosses = (ep[:, 1:] != ep[:, :-1]) & valid[:, 1:]
    assert reset[:, 1:][crosses].all()
    np.testing.assert_array_equal(reset[:, 1:][valid[:, 1:]], (t[rows][:, 1:] == 0)[valid[:, 1:]])
    # next_valid: a valid row whose next row exists and belongs to the same episode.
    nxt = np.minimum(rows + 1, n - 1)
    has_next = valid & (rows + 1 < n) & (episode[nxt] == episode[rows])
    np.testing.assert_array_equal(next_valid, has_next)
    assert not next_valid[~valid].any()


def test_sample_sequences(arrays):
    episode, t = arrays["episode"], arrays["t"]
    idx = D.EpisodeIndex.from_columns(episode, t)
    is_first, is_last = jnp.asarray(idx.is_first), jnp.asarray(idx.is_last)
    out = D.sample_sequences(jax.random.key(0), is_first, is_last, 512, 32)
    _check_sequences(out, episode, t, 512, 32)
    valid, reset = np.asarray(out["valid"]), np.asarray(out["reset"])
    assert (~valid).any(), "some windows should run past the end"
    assert reset[:, 1:].any(), "some windows should cross an episode boundary"
    # next_valid is False on the episode-last rows.
    rows, next_valid = np.asarray(out["rows"]), np.asarray(out["next_valid"])
    assert not next_valid[idx.is_last[rows]].any()

    again = D.sample_sequences(jax.random.key(0), is_first, is_last, 512, 32)
    for k in out:
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(out[k]))


def test_sample_sequences_tiny_dataset():
    # Episodes of lengths 3, 1, 4 (the last one truncated): windows longer than the dataset.
    episode = np.array([0, 0, 0, 1, 2, 2, 2, 2], np.int32)
    t = np.array([0, 1, 2, 0, 0, 1, 2, 3], np.int32)
    idx = D.EpisodeIndex.from_columns(episode, t)
    out = D.sample_sequences(jax.random.key(3), jnp.asarray(idx.is_first), jnp.asarray(idx.is_last), 64, 10)
    _check_sequences(out, episode, t, 64, 10)
    assert set(np.asarray(out["rows"])[:, 0].tolist()) == set(range(8))
