"""Checkpoints: orbax-checkpoint's CheckpointManager (args API), one path for every model.

A checkpoint holds the training state (params, optimizer state, step, as a pytree) and the model
config (JSON) side by side. orbax writes each step into a temporary directory and renames it when
complete, so a step directory that exists is whole. Damage on disk is still possible (a deleted or
overwritten file): a step whose stored array shapes differ from the model's is a shape mismatch
(CheckpointError, from orbax's metadata, before any array is read); any other failure to read it
is damage. `restore_latest` (training, which may go back) falls back to the previous step with a
warning; `restore_step` (a finished stage's exact step) never does. `digest` is the content hash
a run directory records for the parameters a stage produced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from wm_jax.schema import diff


class CheckpointError(ValueError):
    """No usable checkpoint, a damaged one, or one that does not match the requested config."""


class Damaged(CheckpointError):
    """A checkpoint step that exists but cannot be read back (files missing, truncated or overwritten)."""


def _drop_closed_loop_noise(unraisable: Any) -> None:
    """orbax's TensorStore futures finish on background threads after a failed read or write has
    closed their asyncio loop; each then reports 'Event loop is closed' as an unraisable exception
    (dozens of tracebacks for one damaged file). Those, and only those, are dropped."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook
sys.unraisablehook = _drop_closed_loop_noise


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs through absl: a warning for every item of a Composite that is not restored, and an
    error with a traceback for every failed write (a full disk); the exception itself is what counts."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


FORMAT_VERSION = 2  # stored with every checkpoint's config; a checkpoint of another version is refused


def _one_process() -> dict[str, Any]:
    """Under jax.distributed, process 0 alone keeps the checkpoints (orbax writes arrays held in
    host memory from process 0 only): it is told it checkpoints alone, with no barrier on the
    others. The other processes save nothing and receive what process 0 restores (_from_process0)."""
    if jax.process_count() == 1:
        return {}
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})}


def _host(tree: Any) -> Any:
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def manager(directory: Path | str, max_to_keep: int = 2) -> ocp.CheckpointManager | None:
    """The manager that saves into `directory` (None in a process other than 0 under jax.distributed:
    `save` then does nothing)."""
    if jax.process_index() != 0:
        return None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,  # simple and deterministic: the save is done on return
        create=jax.process_count() == 1,  # with several processes, orbax leaves the directory to us
        **_one_process(),
    )
    handlers = {"state": ocp.StandardCheckpointHandler(**_one_process()),  # metadata reads
                "config": ocp.JsonCheckpointHandler(**_one_process())}
    Path(directory).mkdir(parents=True, exist_ok=True)
    with _quiet_orbax():
        return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager | None, step: int, state: Any, config: dict[str, Any]) -> None:
    if mngr is None:  # not process 0 (manager)
        return
    with _quiet_orbax():
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_host(state)),
                                    config=ocp.args.JsonSave({**config, "format_version": FORMAT_VERSION})),
            force=True,
        )
        mngr.wait_until_finished()


def digest(tree: Any) -> str:
    """sha256 of a pytree's arrays (paths, dtypes, shapes and bytes, in tree order): the identity a
    run directory records for the parameters a stage produced. Equal trees give equal digests on
    any machine; the files around them (timestamps in orbax's metadata) do not enter."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_config(directory: Path, step: int, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    version = saved.get("format_version") if isinstance(saved, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory} step {step} is a checkpoint of format version {version or 1}; this wm_jax "
                              f"reads version {FORMAT_VERSION}: delete {directory.parent} to train it again, or use "
                              f"the wm_jax that wrote it")
    diffs = diff({k: v for k, v in saved.items() if k != "format_version"}, wanted)
    if diffs:
        shown = "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs[:5])
        raise CheckpointError(f"{directory} step {step} was trained with a different config ({shown})")


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
    stored array shapes must equal `like`'s, else CheckpointError names the array. A newest
    checkpoint that cannot be read (Damaged) falls back to the previous one with a warning; with
    `set_aside` (training, which will save that step again) the unreadable step directory is
    renamed out of orbax's view, kept for inspection. Under jax.distributed process 0 reads, and
    every process gets its result.
    """
    read = lambda: _restore_latest(Path(directory), like, config, max_to_keep, compare_config, set_aside)  # noqa: E731
    return read() if jax.process_count() == 1 else _from_process0(read, like)


def _restore_latest(directory: Path, like: Any, config: dict[str, Any], max_to_keep: int,
                    compare_config: dict[str, Any] | None, set_aside: bool) -> tuple[int, Any] | None:
    if not directory.exists():
        return None
    mngr = manager(directory, max_to_keep)
    wanted = config if compare_config is None else compare_config
    errors = []
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                return step, _restore(directory, mngr, step, like, wanted)
            except Damaged as e:
                errors.append(str(e))
                warnings.warn(f"{e}; " + ("set aside, " if set_aside else "") + "trying the previous step")
                if set_aside:
                    _set_aside(directory, step)
    finally:
        mngr.close()
    if errors:
        raise CheckpointError(f"{directory}: no readable checkpoint ({'; '.join(errors)})")
    return None


def restore_step(directory: Path | str, step: int, like: Any, config: dict[str, Any]) -> Any:
    """Exactly checkpoint `step` (a finished stage's): CheckpointError if it is gone, Damaged if it
    cannot be read; never an older step. Under jax.distributed process 0 reads, and every process
    gets its result."""
    if jax.process_count() > 1:
        return _from_process0(lambda: (step, _restore_step(Path(directory), step, like, config)), like)[1]
    return _restore_step(Path(directory), step, like, config)


def _restore_step(directory: Path, step: int, like: Any, config: dict[str, Any]) -> Any:
    if not (directory / str(step)).is_dir():
        raise Damaged(f"checkpoint step {step} in {directory} is missing")
    mngr = manager(directory, max(1, len(list(directory.iterdir()))))  # never deletes a step
    try:
        return _restore(directory, mngr, step, like, config)
    finally:
        mngr.close()


def _from_process0(read: Any, like: Any) -> tuple[int, Any] | None:
    """Under jax.distributed: process 0 runs `read` (-> (step, state shaped as `like`) or None) on
    its checkpoints, and every process returns its result, bit for bit, through jax's collectives
    (multihost_utils.broadcast_one_to_all); an error there is raised in every process, its line the same."""
    from jax.experimental import multihost_utils

    head, got, error = np.zeros(16 + 4096, np.uint8), None, None
    if jax.process_index() == 0:
        try:
            got = read()
            head[:16] = np.frombuffer(np.asarray([0 if got is None else 1, got[0] if got else 0], np.int64).tobytes(),
                                      np.uint8)
        except Exception as e:  # noqa: BLE001  every process raises it (below), or the others would wait forever
            error = e
            kind = 2 if isinstance(e, Damaged) else 3 if isinstance(e, CheckpointError) else 4
            head[:8] = np.frombuffer(np.asarray([kind], np.int64).tobytes(), np.uint8)
            text = str(e).encode()[:4096]
            head[16:16 + len(text)] = np.frombuffer(text, np.uint8)
    head = multihost_utils.broadcast_one_to_all(head)
    kind, step = np.frombuffer(head[:16].tobytes(), np.int64)
    if kind >= 2:
        if error is not None:
            raise error
        raise (Damaged if kind == 2 else CheckpointError)(head[16:].tobytes().rstrip(b"\0").decode(errors="replace"))
    if kind == 0:
        return None
    bits = lambda t: jax.tree.map(lambda x: np.ascontiguousarray(jax.device_get(x)).reshape(-1).view(np.uint8), t)  # noqa: E731
    source = bits(got[1]) if got is not None else bits(jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), like))
    out = multihost_utils.broadcast_one_to_all(source)  # bytes: a sum with zeros keeps every bit
    return int(step), jax.tree.map(lambda b, x: jnp.asarray(np.asarray(b).view(x.dtype).reshape(np.shape(x))), out, like)


def _set_aside(directory: Path, step: int) -> None:
    """Rename an unreadable step out of orbax's view (kept for inspection), so training can save it anew."""
    src = directory / str(step)
    if src.exists():
        os.replace(src, directory / f"damaged-{step}-{uuid.uuid4().hex[:6]}")


def _chain(error: BaseException) -> list[BaseException]:
    """The error and the causes below it, outermost first."""
    chain: list[BaseException] = []
    while error is not None and len(chain) < 20:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _short(error: BaseException) -> str:
    """The root cause of an orbax/TensorStore error on one line (orbax wraps TensorStore's reason,
    e.g. 'NOT_FOUND: Error reading "params.w/0" ...', in a message that prints the whole spec)."""
    error = _chain(error)[-1]
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(" See full TensorStore details")[0].split(' in OCDBT database at local file')[0]
    return text[:160]


# Failures to read that say nothing about the files: the checkpoint is not damaged, the reader is
# (no permission, out of file descriptors or memory). They are reported, never set aside.
_NOT_DAMAGE = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "Permission denied", "Too many open files",
               "Cannot allocate memory")
_NOT_DAMAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def _damage(where: str, error: BaseException) -> CheckpointError:
    if any(getattr(c, "errno", None) in _NOT_DAMAGE_ERRNOS or any(t in str(c) for t in _NOT_DAMAGE)
           for c in _chain(error)):
        return CheckpointError(f"cannot read {where} ({_short(error)}); it is not damaged: fix the cause and rerun")
    return Damaged(f"{where} is damaged ({_short(error)})")


def _restore(directory: Path, mngr: ocp.CheckpointManager, step: int, like: Any, wanted: dict[str, Any]) -> Any:
    where = f"checkpoint step {step} in {directory}"
    try:
        with _quiet_orbax():
            saved_config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            stored = mngr.item_metadata(step)["state"]
        stored_shapes = _shapes(stored, lambda m: tuple(m.shape))
    except Exception as e:  # noqa: BLE001  missing or damaged JSON / metadata: orbax raises many types
        raise _damage(where, e) from None
    _check_config(directory, step, saved_config, wanted)
    _check_shapes(where, stored_shapes, _shapes(like, np.shape))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _host(like))
    try:
        with _quiet_orbax():
            return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001  the shapes matched: a failed read now is damage (TensorStore reads)
        raise _damage(where, e) from None


def key_name(k: Any) -> str:
    """A pytree path entry as text (a dict key, an attribute name or an index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree: Any, shape_of: Any) -> dict[str, tuple[int, ...]]:
    """{'params/Conv_0/kernel': shape}: orbax's metadata keeps dict keys where the live tree has
    attributes and tuple indices; both read the same through their names."""
    return {"/".join(key_name(k) for k in path): tuple(shape_of(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(where: str, stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> None:
    if stored.keys() != wanted.keys():
        extra, missing = sorted(stored.keys() - wanted.keys()), sorted(wanted.keys() - stored.keys())
        raise CheckpointError(f"{where} does not match the model's structure (stored only: {extra[:3]}, "
                              f"model only: {missing[:3]})")
    for name, shape in wanted.items():
        if stored[name] != shape:
            raise CheckpointError(f"{where} does not match the model's shapes: {name} has shape {stored[name]}, "
                                  f"expected {shape}")


def read_config(directory: Path | str) -> dict[str, Any]:
    """The config JSON stored with the newest checkpoint (as `save` was given it)."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no checkpoint directory")
    mngr = manager(directory)
    try:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{directory}: no checkpoint")
        try:
            with _quiet_orbax():
                saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # noqa: BLE001  orbax raises many types for a damaged item
            raise Damaged(f"checkpoint step {step} in {directory} is damaged ({_short(e)})") from None
        return {k: v for k, v in saved.items() if k != "format_version"}
    finally:
        mngr.close()
