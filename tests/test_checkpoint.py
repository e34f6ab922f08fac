"""Tests for wm_jax.store.checkpoint: round trip, config/shape mismatches, partial and damaged steps."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.models import transition
from wm_jax.store import checkpoint
from wm_jax.models import train as train_lib
from wm_jax.store.checkpoint import CheckpointError
from wm_jax.config import TrainConfig, TransitionConfig

CONFIG = {"model": {"latent": 32, "filters": [4, 4, 8, 8]}, "train": {"steps": 40}}


def _state(scale: float = 1.0):
    return {
        "w": jnp.arange(6.0).reshape(2, 3) * scale,
        "b": jnp.ones(3) * scale,
        "step": jnp.int32(int(scale)),
        "nested": {"v": jnp.full((4,), scale, jnp.float32)},
    }


def _save_steps(directory: Path, steps, max_to_keep: int = 5, config=CONFIG) -> None:
    mngr = checkpoint.manager(directory, max_to_keep)
    try:
        for s in steps:
            checkpoint.save(mngr, s, _state(float(s)), config)
    finally:
        mngr.close()


def _assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _step_dirs(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_round_trip(tmp_path):
    _save_steps(tmp_path, [10, 20])
    step, state = checkpoint.restore_latest(tmp_path, _state(), CONFIG)
    assert step == 20
    _assert_tree_equal(state, _state(20.0))
    assert checkpoint.read_config(tmp_path) == CONFIG


def test_no_checkpoint_returns_none(tmp_path):
    assert checkpoint.restore_latest(tmp_path / "missing", _state(), CONFIG) is None
    (tmp_path / "empty").mkdir()
    assert checkpoint.restore_latest(tmp_path / "empty", _state(), CONFIG) is None


def test_round_trip_train_state(tmp_path):
    """The structure fit saves: params, optax state (namedtuples), step counters."""
    cfg = TrainConfig(steps=10)
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    state = train_lib.init_state(cfg, params)
    state = state.replace(step=jnp.int32(7), bad_total=jnp.int32(2))
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 7, state, CONFIG)
    mngr.close()
    step, restored = checkpoint.restore_latest(tmp_path, train_lib.init_state(cfg, params), CONFIG)
    assert step == 7 and isinstance(restored, train_lib.TrainState)
    _assert_tree_equal(restored, state)


def test_compare_config_overrides(tmp_path):
    _save_steps(tmp_path, [10])
    other = {**CONFIG, "train": {"steps": 80}}
    step, _ = checkpoint.restore_latest(tmp_path, _state(), other, compare_config=CONFIG)
    assert step == 10


def _transition_config_dict(cfg: TransitionConfig, latent: int) -> dict:
    """The config train.fit stores for a transition model (see transition.train)."""
    model = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "train"}
    model["latent"] = latent
    return {"model": model, "train": dataclasses.asdict(cfg.train)}


@pytest.mark.slow
def test_config_mismatch_names_the_field(tmp_path):
    cfg = TransitionConfig(hidden=16, seq_len=8, mixtures=2)
    params32 = transition.init(jax.random.key(0), cfg, 32)
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 10, params32, _transition_config_dict(cfg, 32))
    mngr.close()

    params64 = transition.init(jax.random.key(0), cfg, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config mismatch is not "damage": no fallback warning
        with pytest.raises(CheckpointError) as exc:
            checkpoint.restore_latest(tmp_path, params64, _transition_config_dict(cfg, 64))
    msg = str(exc.value)
    assert "latent" in msg and "32" in msg and "64" in msg
    assert "shape" not in msg.lower() and "broadcast" not in msg.lower()
    # the same config restores fine
    step, restored = checkpoint.restore_latest(tmp_path, params32, _transition_config_dict(cfg, 32))
    assert step == 10
    _assert_tree_equal(restored, params32)


def test_config_mismatch_lists_several_fields(tmp_path):
    _save_steps(tmp_path, [10])
    wanted = {"model": {"latent": 64, "filters": [4, 4, 8, 16]}, "train": {"steps": 40}}
    with pytest.raises(CheckpointError, match=r"model\.filters.*model\.latent"):
        checkpoint.restore_latest(tmp_path, _state(), wanted)


def test_tuple_and_list_compare_equal(tmp_path):
    _save_steps(tmp_path, [10])  # stored as JSON: filters is a list
    wanted = {"model": {"latent": 32, "filters": (4, 4, 8, 8)}, "train": {"steps": 40}}
    assert checkpoint.restore_latest(tmp_path, _state(), wanted)[0] == 10


def test_a_checkpoint_of_an_older_format_is_refused(tmp_path):
    """A checkpoint written without a format version (format 1) is refused by name, not restored."""
    import orbax.checkpoint as ocp

    mngr = checkpoint.manager(tmp_path)
    mngr.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(10.0)), config=ocp.args.JsonSave(CONFIG)),
              force=True)
    mngr.wait_until_finished()
    mngr.close()
    with pytest.raises(CheckpointError, match="format version 1; this wm_jax reads version 2"):
        checkpoint.restore_latest(tmp_path, _state(), CONFIG)


def test_shape_mismatch_with_equal_config(tmp_path):
    _save_steps(tmp_path, [10])
    like = dict(_state())
    like["w"] = jnp.zeros((3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as exc:
            checkpoint.restore_latest(tmp_path, like, CONFIG)
    assert "shape" in str(exc.value)


def test_partial_write_is_never_restored(tmp_path):
    """A step directory orbax was still writing (its temporary name) is ignored."""
    _save_steps(tmp_path, [10, 20])
    # orbax 0.12.8 writes into '<step>.orbax-checkpoint-tmp' and renames it when complete
    # (atomicity.AtomicRenameTemporaryPath); step.find_all skips names with that suffix.
    partial_a = tmp_path / "30.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "20", partial_a)
    (partial_a / "state" / "manifest.ocdbt").unlink()  # half written
    partial_b = tmp_path / "40.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "20", partial_b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even tried
        step, state = checkpoint.restore_latest(tmp_path, _state(), CONFIG)
    assert step == 20
    _assert_tree_equal(state, _state(20.0))


def _damage_manifest(step_dir: Path) -> None:
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _damage_garbage(step_dir: Path) -> None:
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            p = Path(root) / f
            p.write_bytes(b"\x00garbage\xff" * (p.stat().st_size // 9 + 1))


def _damage_config(step_dir: Path) -> None:
    (step_dir / "config" / "metadata").write_text("{not json")


def _damage_truncate(step_dir: Path) -> None:
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            p = Path(root) / f
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


@pytest.mark.parametrize("damage", [_damage_manifest, _damage_garbage, _damage_truncate, _damage_config])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage):
    _save_steps(tmp_path, [10, 20])
    damage(tmp_path / "20")
    with pytest.warns(UserWarning, match="step 20"):
        step, state = checkpoint.restore_latest(tmp_path, _state(), CONFIG)
    assert step == 10
    _assert_tree_equal(state, _state(10.0))


def test_all_damaged_raises(tmp_path):
    _save_steps(tmp_path, [10, 20])
    _damage_manifest(tmp_path / "10")
    _damage_manifest(tmp_path / "20")
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointError, match="no readable checkpoint"):
            checkpoint.restore_latest(tmp_path, _state(), CONFIG)


def test_max_to_keep(tmp_path):
    _save_steps(tmp_path, [10, 20, 30, 40], max_to_keep=2)
    assert _step_dirs(tmp_path) == [30, 40]
    assert checkpoint.restore_latest(tmp_path, _state(), CONFIG, max_to_keep=2)[0] == 40


# --------------------------------------------------------------------------------------------
# Through train.fit


def _quad_fit(run_dir: Path, cfg: TrainConfig):
    def loss_fn(params, key, batch, step):
        loss = jnp.sum(jnp.square(params["w"] - batch))
        return loss, {"loss": loss}

    def sample_fn(key, d):
        return d + 0.1 * jax.random.normal(key, d.shape)

    return train_lib.fit(
        "quad", cfg, loss_fn, sample_fn, jnp.array([1.0, -2.0, 0.5]), {"w": jnp.zeros(3)},
        jax.random.key(0), run_dir, {"model": "quad"}, progress=False,
    )


def test_fit_config_mismatch_names_the_field(tmp_path):
    cfg = TrainConfig(steps=10, batch=1, chunk=5, checkpoint_every=5)
    _quad_fit(tmp_path, cfg)
    with pytest.raises(CheckpointError, match=r"train\.batch"):
        _quad_fit(tmp_path, dataclasses.replace(cfg, batch=2))


@pytest.mark.slow
def test_fit_resumes_past_a_damaged_newest_checkpoint(tmp_path):
    cfg = TrainConfig(steps=20, batch=1, chunk=5, checkpoint_every=5, max_to_keep=3)
    clean, _ = _quad_fit(tmp_path / "clean", cfg)
    _quad_fit(tmp_path / "run", cfg)
    _damage_manifest(tmp_path / "run" / "checkpoints" / "20")
    with pytest.warns(UserWarning, match="step 20"):
        params, info = _quad_fit(tmp_path / "run", cfg)
    assert info["resumed_from"] == 15
    assert np.array_equal(np.asarray(params["w"]), np.asarray(clean["w"]))


# --------------------------------------------------------------------------------------------
# Damage told apart from a shape mismatch; a finished stage's exact step; the parameters' digest


def _delete_largest_data_file(step_dir: Path) -> None:
    files = list((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())
    max(files, key=lambda p: p.stat().st_size).unlink()


def _big_state(scale: float = 1.0):
    return {"w": jax.random.normal(jax.random.key(int(scale)), (32, 64)) * scale, "b": jnp.ones(64) * scale}


def test_damaged_data_file_is_damage_not_a_shape_mismatch(tmp_path):
    """TensorStore's read errors print the array spec (with 'shape' in it): once a substring test
    called them a shape mismatch and refused to fall back."""
    mngr = checkpoint.manager(tmp_path, 5)
    for s in (10, 20):
        checkpoint.save(mngr, s, _big_state(float(s)), CONFIG)
    mngr.close()
    _delete_largest_data_file(tmp_path / "20")
    with pytest.warns(UserWarning, match="step 20 .* is damaged"):
        step, state = checkpoint.restore_latest(tmp_path, _big_state(), CONFIG)
    assert step == 10
    _assert_tree_equal(state, _big_state(10.0))
    with pytest.raises(checkpoint.Damaged, match="step 20 .* is damaged") as info:
        checkpoint.restore_step(tmp_path, 20, _big_state(), CONFIG)
    assert "shape" not in str(info.value) and len(str(info.value)) < 400


def test_shape_mismatch_is_told_from_metadata(tmp_path):
    _save_steps(tmp_path, [10])
    like = {**_state(), "nested": {"v": jnp.zeros((5,))}}
    with pytest.raises(CheckpointError, match=r"nested/v has shape \(4,\), expected \(5,\)") as info:
        checkpoint.restore_step(tmp_path, 10, like, CONFIG)
    assert not isinstance(info.value, checkpoint.Damaged)


def test_restore_step_never_falls_back(tmp_path):
    _save_steps(tmp_path, [10, 20])
    _assert_tree_equal(checkpoint.restore_step(tmp_path, 10, _state(), CONFIG), _state(10.0))
    _damage_manifest(tmp_path / "20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back warning either
        with pytest.raises(checkpoint.Damaged):
            checkpoint.restore_step(tmp_path, 20, _state(), CONFIG)
    with pytest.raises(checkpoint.Damaged, match="missing"):
        checkpoint.restore_step(tmp_path, 30, _state(), CONFIG)


def test_digest_is_the_content():
    assert checkpoint.digest(_state(2.0)) == checkpoint.digest(jax.tree.map(np.asarray, _state(2.0)))
    assert checkpoint.digest(_state(2.0)) != checkpoint.digest(_state(3.0))
    other_dtype = {**_state(), "b": jnp.ones(3, jnp.bfloat16)}
    assert checkpoint.digest(other_dtype) != checkpoint.digest(_state())


def test_load_params_with_identity_checks_the_hash(tmp_path):
    cfg = TrainConfig(steps=10, batch=1, chunk=5, checkpoint_every=5)
    params, info = _quad_fit(tmp_path, cfg)
    ident = info["identity"]
    assert ident["step"] == 10 and ident["sha256"] == checkpoint.digest(params)
    got = train_lib.load_params(cfg, {"w": jnp.zeros(3)}, tmp_path, {"model": "quad"}, ident)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(params["w"]))
    with pytest.raises(checkpoint.Damaged, match="other parameters"):
        train_lib.load_params(cfg, {"w": jnp.zeros(3)}, tmp_path, {"model": "quad"}, {**ident, "sha256": "0" * 64})
    with pytest.raises(checkpoint.Damaged, match="missing"):
        train_lib.load_params(cfg, {"w": jnp.zeros(3)}, tmp_path, {"model": "quad"}, {**ident, "step": 15})


@pytest.mark.parametrize("error", [
    ValueError("PERMISSION_DENIED: Error opening file"), OSError(24, "Too many open files"),
    PermissionError(13, "Permission denied"),
])
def test_a_reader_failure_is_not_damage(error):
    """No permission, no file descriptors: the checkpoint is not damaged and must not be set aside."""
    got = checkpoint._damage("checkpoint step 3 in x", error)
    assert isinstance(got, CheckpointError) and not isinstance(got, checkpoint.Damaged)
    assert "not damaged" in str(got)
    assert isinstance(checkpoint._damage("w", ValueError("NOT_FOUND: Error reading")), checkpoint.Damaged)
