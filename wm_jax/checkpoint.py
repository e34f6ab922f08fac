"""Checkpoints: orbax-checkpoint's CheckpointManager (args API), one path for every model.

A checkpoint holds the training state (params, optimizer state, step, as a pytree) and the model
config (JSON) side by side. orbax writes each step into a temporary directory and renames it when
complete, so a step directory that exists is whole; restore still guards against damage on disk by
falling back to the previous step with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not match the requested config."""


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs a warning through absl for every item of a Composite that is not restored."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def manager(directory: Path | str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,  # simple and deterministic: the save is done on return
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: dict[str, Any]) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
        force=True,
    )
    mngr.wait_until_finished()


def _check_config(directory: Path, step: int, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    diffs = _diff(saved, wanted)
    if diffs:
        shown = "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs[:5])
        raise CheckpointError(f"{directory} step {step} was trained with a different config ({shown})")


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix, a, b)]


def restore_latest(
    directory: Path | str,
    like: Any,
    config: dict[str, Any],
    max_to_keep: int = 2,
    compare_config: dict[str, Any] | None = None,
    set_aside: bool = False,
) -> tuple[int, Any] | None:
    """Restore the newest complete checkpoint into the structure of `like`.

    Returns (step, state), or None when the directory holds no checkpoint. The saved config must
    equal `compare_config` (default: `config`), else CheckpointError names the differing fields;
    array shapes are checked against `like` as well. A newest checkpoint that cannot be read
    falls back to the previous one with a warning; with `set_aside` (training, which will save that
    step again) the unreadable step directory is renamed out of orbax's view, kept for inspection.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    mngr = manager(directory, max_to_keep)
    try:
        wanted = config if compare_config is None else compare_config
        return _restore_newest_readable(directory, mngr, like, wanted, set_aside)
    finally:
        mngr.close()


def _set_aside(directory: Path, step: int) -> None:
    """Rename an unreadable step out of orbax's view (kept for inspection), so training can save it anew."""
    src = directory / str(step)
    if src.exists():
        os.replace(src, directory / f"damaged-{step}-{uuid.uuid4().hex[:6]}")


def _unreadable(directory: Path, step: int, error: Exception, errors: list[str], set_aside: bool) -> None:
    """Note an unreadable step (and set it aside when asked); the caller tries the previous one."""
    errors.append(f"step {step}: {type(error).__name__}: {error}")
    warnings.warn(f"{directory}: checkpoint step {step} is unreadable ({type(error).__name__}); "
                  + ("set aside, " if set_aside else "") + "trying the previous one")
    if set_aside:
        _set_aside(directory, step)


def _restore_newest_readable(
    directory: Path, mngr: ocp.CheckpointManager, like: Any, wanted: dict[str, Any], set_aside: bool
):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    errors = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            with _quiet_orbax():
                saved_config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # damaged JSON or missing item: try the previous step
            _unreadable(directory, step, e, errors, set_aside)
            continue
        _check_config(directory, step, saved_config, wanted)
        try:
            with _quiet_orbax():
                restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:
            if "shape" in str(e).lower():  # a readable checkpoint of other sizes: not damage
                raise CheckpointError(f"{directory} step {step} does not match the model's shapes: {e}") from None
            _unreadable(directory, step, e, errors, set_aside)
            continue
        _check_shapes(directory, step, restored, like)
        return step, restored
    if errors:
        raise CheckpointError(f"{directory}: no readable checkpoint ({'; '.join(errors)})")
    return None


def _check_shapes(directory: Path, step: int, restored: Any, like: Any) -> None:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(like)):
        if np.shape(a) != np.shape(b):
            raise CheckpointError(
                f"{directory} step {step}: {jax.tree_util.keystr(path)} has shape {np.shape(a)}, expected {np.shape(b)}"
            )


def read_config(directory: Path | str) -> dict[str, Any]:
    """The config JSON stored with the newest checkpoint."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no checkpoint directory")
    mngr = manager(directory)
    try:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{directory}: no checkpoint")
        with _quiet_orbax():
            return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    finally:
        mngr.close()
