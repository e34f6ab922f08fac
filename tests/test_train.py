"""Tests for wm_jax.models.train.fit: bit-exact kill-and-resume, skipped non-finite updates, stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import train as train_lib
from wm_jax.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Kill and resume (a real subprocess killed with SIGKILL)

HELPER = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from wm_jax.models import vae
    from wm_jax.store import data
    from wm_jax.config import Config, TrainConfig, VAEConfig

    run_dir, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    lengths = [20, 35, 15, 30]
    episode = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    t = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    frames = ((rng.random((episode.size, 64, 64)) < 0.2) * 255).astype(np.uint8)
    idx = data.EpisodeIndex.from_columns(episode, t)
    cfg = VAEConfig(
        latent=8, filters=(4, 4, 8, 8), kl_ramp_steps=20,
        train=TrainConfig(steps=60, batch=8, chunk=5, checkpoint_every=10, max_to_keep=2),
    )
    params, info = vae.train(Config(vae=cfg), jax.random.key(7), {"frame": frames, "stack_rows": idx.stack_rows}, run_dir,
                             progress=False)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    print("INFO " + json.dumps({"resumed_from": info["resumed_from"], "skipped": info["skipped_updates"]}))
    """
)


def _cmd(helper: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(helper), str(run_dir), str(run_dir / "params.npz")]


def _env(cache: Path) -> dict[str, str]:
    # A persistent compilation cache shared by the three runs: the first compiles, the other two
    # load the same executables (this only saves time; the programs are identical either way).
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _run(helper: Path, run_dir: Path, env: dict[str, str]) -> dict:
    res = subprocess.run(_cmd(helper, run_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("INFO ")][-1]
    return json.loads(line[5:])


def _finished_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def _last_metric_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (robust to a line being written right now)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return -1
    steps = [-1]
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"

    env = _env(tmp_path / "jax_cache")

    info_a = _run(helper, dir_a, env)  # uninterrupted
    assert info_a["resumed_from"] == 0

    proc = subprocess.Popen(_cmd(helper, dir_b), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            done = [s for s in _finished_steps(dir_b / "checkpoints") if s >= 10]
            # kill once a checkpoint >= 10 exists and a metric line after it was written, so the
            # resume must also drop metric lines newer than the checkpoint it restarts from
            if done and _last_metric_step(dir_b) > max(done):
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = max(done)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    killed_midway = killed_at is not None and proc.returncode == -signal.SIGKILL and not (dir_b / "params.npz").exists()
    if not killed_midway:
        warnings.warn("the run in dir B finished before it could be killed; only checking equality")

    last_metric = _last_metric_step(dir_b)
    info_b = _run(helper, dir_b, env)
    print(f"killed after checkpoint {killed_at}, metrics up to step {last_metric}; resumed from {info_b['resumed_from']}")
    if killed_midway:
        assert 10 <= info_b["resumed_from"] < 60, info_b

    a, b = np.load(dir_a / "params.npz"), np.load(dir_b / "params.npz")
    assert sorted(a.files) == sorted(b.files) and a.files
    for name in a.files:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), f"{name} differs after resume"

    ma, mb = train_lib.read_metrics(dir_a), train_lib.read_metrics(dir_b)
    steps_b = [m["step"] for m in mb]
    assert steps_b == sorted(set(steps_b)), steps_b  # strictly increasing, no duplicates
    assert steps_b == list(range(5, 61, 5))
    assert ma == mb  # the metric lines (same batches, same updates) agree exactly too
    assert _finished_steps(dir_b / "checkpoints") == [50, 60]  # max_to_keep=2


# --------------------------------------------------------------------------------------------
# fit with a tiny quadratic problem


TARGET = jnp.array([1.0, -2.0, 0.5])


def _sample(key, d):
    return d["target"] + 0.01 * jax.random.normal(key, d["target"].shape)


def _loss_fn(bad_steps):
    bad = jnp.asarray(bad_steps, jnp.int32)

    def loss_fn(params, key, batch, step):
        loss = jnp.sum(jnp.square(params["w"] - batch))
        loss = jnp.where(jnp.isin(step, bad), jnp.nan, loss)
        return loss, {"loss": loss}

    return loss_fn


def _fit(tmp_path, cfg, bad_steps=(-1,), name="run"):
    return train_lib.fit(
        "quad", cfg, _loss_fn(tuple(bad_steps)), _sample, {"target": TARGET},
        {"w": jnp.zeros(3)}, jax.random.key(0), tmp_path / name, {"model": "quad"}, progress=False,
    )


def _cfg(**kw):
    base = dict(steps=20, batch=1, lr=0.1, chunk=5, checkpoint_every=10, max_bad_steps=5)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_converges_and_writes_metrics(tmp_path):
    params, info = _fit(tmp_path, _cfg(steps=100, chunk=20, checkpoint_every=100))
    np.testing.assert_allclose(np.asarray(params["w"]), np.asarray(TARGET), atol=0.05)
    assert info["resumed_from"] == 0 and info["skipped_updates"] == 0 and info["steps"] == 100
    m = train_lib.read_metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [20, 40, 60, 80, 100]
    assert m[-1]["loss"] < m[0]["loss"]
    assert all(x["skipped"] == 0 for x in m)


def test_nan_batches_are_skipped_and_counted(tmp_path):
    bad = (3, 7, 8, 15)
    params, info = _fit(tmp_path, _cfg(), bad)
    assert info["skipped_updates"] == len(bad)
    assert np.isfinite(np.asarray(params["w"])).all()
    m = train_lib.read_metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [5, 10, 15, 20]
    assert [x["skipped"] for x in m] == [1, 2, 0, 1]
    assert sum(x["skipped"] for x in m) == len(bad)
    assert all(np.isfinite(x["loss"]) for x in m)  # chunk means use the finite steps only
    assert info["final"]["skipped"] == 1


def test_skipped_update_leaves_state_unchanged(tmp_path):
    """Training 4 steps whose last is non-finite ends exactly where 3 clean steps end."""
    p3, _ = _fit(tmp_path, _cfg(steps=3, checkpoint_every=5), (3,), name="three")
    p4, info = _fit(tmp_path, _cfg(steps=4, checkpoint_every=5), (3,), name="four")
    assert info["skipped_updates"] == 1
    assert np.array_equal(np.asarray(p3["w"]), np.asarray(p4["w"]))


def test_persistent_non_finite_updates_stop_the_run(tmp_path):
    cfg = _cfg(max_bad_steps=3)
    with pytest.raises(train_lib.TrainingError, match="consecutive non-finite"):
        _fit(tmp_path, cfg, tuple(range(20)))
    # stopped after the first chunk, before saving a checkpoint of the bad state
    m = train_lib.read_metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [5]
    assert m[0]["skipped"] == 5
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def test_non_finite_streak_across_chunks_stops_the_run(tmp_path):
    # bad from step 8 on: 2 in the second chunk, 5 in the third -> streak 7 >= 6 at step 15
    with pytest.raises(train_lib.TrainingError, match="consecutive non-finite updates"):
        _fit(tmp_path, _cfg(max_bad_steps=6), tuple(range(8, 20)))


def test_non_finite_streak_inside_a_chunk_stops_the_run(tmp_path):
    # 4 consecutive bad steps (1..4) with max_bad_steps=3, all inside the first chunk of 10
    with pytest.raises(train_lib.TrainingError):
        _fit(tmp_path, _cfg(max_bad_steps=3, chunk=10), (1, 2, 3, 4))


def test_rerun_of_a_finished_fit_does_no_work(tmp_path):
    cfg = _cfg()
    p1, info1 = _fit(tmp_path, cfg, (3,))
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    p2, info2 = _fit(tmp_path, cfg, (3,))
    assert info2["resumed_from"] == cfg.steps == info2["steps"]
    assert info2["final"] == {}
    assert np.isnan(info2["steps_per_s"])
    assert info2["skipped_updates"] == info1["skipped_updates"] == 1  # restored with the state
    assert np.array_equal(np.asarray(p1["w"]), np.asarray(p2["w"]))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before


def test_resume_with_different_train_config_is_refused(tmp_path):
    from wm_jax.store.checkpoint import CheckpointError

    _fit(tmp_path, _cfg())
    with pytest.raises(CheckpointError, match="lr"):
        _fit(tmp_path, _cfg(lr=0.05))


def test_read_metrics_missing_run(tmp_path):
    assert train_lib.read_metrics(tmp_path / "nothing") == []


def test_a_new_learning_rate_does_not_compile_again(tmp_path):
    """lr and clip_norm are traced (TrainConfig.hyper()): fit with another learning rate reuses the
    compiled chunk (the loss is traced once), and the rate really changes the result."""
    traces = []

    def loss_fn(params, key, batch, step):
        traces.append(1)  # runs once per trace, never per call
        return jnp.sum(jnp.square(params["w"] - batch)), {"loss": jnp.sum(jnp.square(params["w"] - batch))}

    results = []
    for i, (lr, clip) in enumerate([(0.1, 1.0), (0.01, 0.5), (0.3, 2.0)]):
        cfg = _cfg(steps=10, chunk=10, checkpoint_every=10, lr=lr, clip_norm=clip)
        params, _ = train_lib.fit("quad", cfg, loss_fn, _sample, {"target": TARGET}, {"w": jnp.zeros(3)},
                                  jax.random.key(0), tmp_path / str(i), {"model": "quad"}, progress=False)
        results.append(np.asarray(params["w"]))
    assert len(traces) == 1
    assert not np.allclose(results[0], results[1]) and not np.allclose(results[0], results[2])
