"""A run directory, read and written in one place: the pipeline writes it, Agent and the
experiments read it.

    run = run_dir.load("runs/cpu")        # cfg, the final agent's params, every round's data
    run.cfg, run.params["vae" | "transition" | "controller"], run.arrays (transition.training_arrays)

Layout (written by pipeline.run): config.json, stages.json, data/round{r} (datasets), vae/,
transition/ (round 1) and transition_round{r}/, latents_round{r}.npz (V's posteriors of every row
so far), evolve_round{r}/, agent.json (which round's M the final controller belongs to),
controller.npy, summary.json, plots, and .lock (held by the process running in it).

stages.json records, for every finished stage, what it produced and what it was built on
("outputs" and "inputs": a checkpoint's step and parameter hash, a dataset's checksum identity,
an array file's content hash). Loading a finished stage's artifact checks it against that record,
so damage or a change on disk is an error naming the file, never a silent use of something else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import logs
from wm_jax.models import transition, vae, verifier
from wm_jax.store import checkpoint
from wm_jax.store import data as data_lib
from wm_jax.config import Config
from wm_jax.schema import ConfigError, diff, json_digest


class RunDirError(ValueError):
    """The run directory belongs to another configuration, is damaged, or is in use."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


def read_json(path: Path | str, remedy: str) -> Any:
    """A JSON file of the run directory; damage is a RunDirError naming the file and `remedy`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RunDirError(f"{path} is damaged ({type(e).__name__}: {e}); {remedy}") from None


@contextlib.contextmanager
def locked(directory: Path | str) -> Iterator[None]:
    """Hold DIRECTORY/.lock (fcntl, released by the kernel when the process ends, however it ends):
    a second process on the same directory gets RunDirBusy naming the holder's PID."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{directory} is a file, not a run directory; choose another --out")
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    if lock.is_dir() and not lock.is_symlink():
        raise RunDirError(f"{lock} is a directory, not wm-jax's lock file; remove it (rmdir {lock}) and rerun")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        busy = unlockable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                unlockable = True
            elif e.errno in (errno.EAGAIN, errno.EACCES):
                busy = True
            else:
                raise
        if busy:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(f"{directory} is in use by another wm-jax process (PID {holder}); wait for it to "
                             f"finish or use another --out")
        if unlockable:
            warnings.warn(f"{directory}: this file system cannot lock files; nothing stops a second process "
                          f"from running in this directory at the same time", stacklevel=3)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def for_process(out: Path) -> Path:
    """The run directory this process writes: `out` in process 0 (and without jax.distributed), and
    OUT.processI beside it in process I, a working copy (datasets, latents, logs, summaries) so that
    none waits on another's files; the copies are equal, as every value a run writes is the same in
    every process (the programs that split work over the processes replicate their results). Only
    process 0 keeps checkpoints (store.checkpoint sends what it restores to the others)."""
    i = jax.process_index()
    return out if i == 0 else out.with_name(f"{out.name}.process{i}")


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The keys of `wm-jax run --seed seed`, one per stream: each stage draws from its own."""
    key = jax.random.key(seed)
    names = ("vae", "transition", "evolve", "evaluate", "rounds")
    keys = dict(zip(names, jax.random.split(key, len(names))))
    keys["verifier"] = jax.random.fold_in(key, 6)  # a stream of its own: the five above stay as they are
    return keys


def round_config(cfg: Config, stages: dict[str, Any], r: int) -> Config:
    """Round r's config (Config.for_round) with the rows its collection recorded in `stages`
    (stages.json's records): M's fine-tuning steps follow them under rounds.transition_rows_per_step."""
    rows = stages.get(f"collect_round{r}", {}).get("rows") if r > 1 else None
    return cfg.for_round(r, rows)


def read_stages(run: Path | str) -> dict[str, Any]:
    """stages.json; damage is a RunDirError. The records are what every check of the run's files is
    made against, so a missing stages.json is {} only while the directory holds nothing they would
    cover (a new run writes stages.json right after config.json, before any stage starts): with
    finished work beside it, it is refused, never rebuilt from files nothing can check."""
    path = Path(run) / "stages.json"
    if not path.exists():
        held = sorted(p.name for p in Path(run).iterdir() if not p.name.startswith(".") and p.name != "config.json") \
            if Path(run).is_dir() else []
        if held:
            raise RunDirError(f"{path} is missing but {run} holds a run's work ({', '.join(held[:4])}"
                              f"{', ...' if len(held) > 4 else ''}); without its records none of it can be checked: "
                              f"restore stages.json, or start afresh with a new --out")
        return {}
    stages = read_json(path, "it records which stages finished and what they produced, so the run cannot be "
                             "checked: start afresh with a new --out")
    if not isinstance(stages, dict):
        raise RunDirError(f"{path} is damaged (not a JSON object); start afresh with a new --out")
    return stages


FORMAT_VERSION = 2  # config.json's "format_version": the layout of a run directory this wm_jax reads


def write_config(run: Path | str, cfg: Config) -> None:
    """config.json: the run's configuration and the run-directory format it is written in."""
    write_json(Path(run) / "config.json", {**cfg.to_dict(), "format_version": FORMAT_VERSION})


def read_config(run: Path | str) -> Config:
    """config.json of a run directory, as a Config; damage, a bad value or a run directory of
    another format version is a RunDirError."""
    path = Path(run) / "config.json"
    remedy = "it records the run's configuration: restore it, or start afresh with a new --out"
    saved = read_json(path, remedy)
    if isinstance(saved, dict) and saved.get("format_version") != FORMAT_VERSION:
        raise RunDirError(f"{run} is a run directory of format version {saved.get('format_version') or 1}; this wm_jax "
                          f"reads version {FORMAT_VERSION}: start afresh with a new --out (or use the wm_jax that "
                          f"wrote it)")
    try:
        if not isinstance(saved, dict):
            raise ConfigError("not a JSON object")
        return Config.from_dict({k: v for k, v in saved.items() if k != "format_version"})
    except ConfigError as e:
        raise RunDirError(f"{path} is damaged ({e}); {remedy}") from None


def stage_output(run: Path | str, stages: dict[str, Any], stage: str, name: str) -> Any:
    """The identity the finished stage `stage` recorded for its output `name`. Without that record
    the output could not be checked, so it is a RunDirError, never a load of whatever is on disk."""
    try:
        return stages[stage]["outputs"][name]
    except (KeyError, TypeError):
        raise RunDirError(f"{Path(run) / 'stages.json'} records no {name} made by a finished stage {stage!r}, so "
                          f"{Path(run) / name} cannot be checked; rerun the `wm-jax run` that made this directory "
                          f"(same --out) to finish it, or start afresh with a new --out") from None


def dataset_id(run: Path, stages: dict[str, Any], stage: str, name: str) -> str:
    """The identity of the dataset run/name, checked against what its collect stage recorded."""
    path = run / name
    recorded = stage_output(run, stages, stage, name)
    try:
        now = data_lib.identity(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise data_lib.DatasetError(path, f"unreadable manifest ({type(e).__name__}: {e}); delete {path} to "
                                          f"collect it again") from None
    if now != recorded:
        raise damaged(run, stage, name, RunDirError(f"{path} is not the dataset its stage saved"))
    return now


def damaged(run: Path, stage: str, folder: str, error: Exception) -> RunDirError:
    """The one error for a finished stage's artifact that is damaged or changed on disk."""
    return RunDirError(f"{error}: it is the output of the finished stage {stage!r}, which later stages were built "
                       f"on; delete {run / folder} to redo that stage (and what depends on it), or start afresh "
                       f"with a new --out")


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def read_controller(path: Path, recorded: str | None) -> np.ndarray | None:
    """The controller in `path` if it is a readable float32 array hashing to the stage's record
    (when there is one); None when it is missing, damaged or different."""
    try:
        ctrl = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(ctrl, np.ndarray):  # an .npz at that name
        ctrl.close()
        return None
    if ctrl.dtype != np.float32 or (recorded is not None and checkpoint.digest(ctrl) != recorded):
        return None
    return ctrl


def write_json(path: Path | str, obj: Any) -> None:
    """Atomic strict JSON (NaN -> null): a crash leaves the old file or the new one, never half.
    Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(logs.finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def load_arrays(paths: list[Path], env: str | None = None) -> dict[str, np.ndarray]:
    """The columns of several stored datasets (each of task `env`, when given), concatenated in order."""
    parts = []
    for p in paths:
        try:
            parts.append(data_lib.to_arrays(data_lib.load_dataset(p, env)))
        except data_lib.DatasetError as e:  # a run collects a round that is gone again, the same episodes
            raise data_lib.DatasetError(p, f"{e.problem}; delete {p} and rerun the same `wm-jax run` command to "
                                           f"collect it again") from None
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def data_paths(run: Path | str) -> list[Path]:
    """The run's datasets, round 1 first."""
    rounds = [p for p in (Path(run) / "data").iterdir() if p.name.startswith("round") and p.name[5:].isdigit()]
    return sorted(rounds, key=lambda p: int(p.name[5:]))  # not the .roundN.tmp-* a killed save leaves


RERUN = "rerun the `wm-jax run` that made this directory (same --out) to rewrite it"


def agent_record(run: Path | str, cfg: Config, stages: dict[str, Any], r: int, m_dir: str,
                 ctrl_id: str) -> dict[str, Any]:
    """agent.json: the final agent is round r's M (in m_dir) with its controller, under cfg. It
    names the identities of everything the agent is rebuilt from (V, that M, the controller, as
    stages.json records them) and carries a SHA-256 of its own content, so an edit (a compute
    dtype, a seed, a round) is refused rather than evaluated."""
    meta = {"round": r, "transition_dir": m_dir,
            "transition_steps": round_config(cfg, stages, r).transition.train.steps if r > 1 else None,
            "config": cfg.to_dict(),
            "built_from": {"vae": stage_output(run, stages, "vae", "vae"),
                           m_dir: stage_output(run, stages, m_dir, m_dir), "controller": ctrl_id}}
    meta = logs.finite_or_none(meta)
    return {**meta, "sha256": json_digest(meta)}


def read_agent_record(run: Path | str) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    """agent.json as (cfg, record, stages.json's records), checked: its own hash, its config against
    config.json's, and the identities it names ("built_from") against stages.json's records."""
    run = Path(run)
    path = run / "agent.json"
    meta = read_json(path, RERUN)
    body = {k: v for k, v in meta.items() if k != "sha256"} if isinstance(meta, dict) else None
    if body is None or meta.get("sha256") != json_digest(body):
        raise RunDirError(f"{path} was changed after the run wrote it (its content's SHA-256 differs from the one it "
                          f"records); {RERUN}")
    try:
        cfg = Config.from_dict(meta["config"])
        r, m_dir = int(meta["round"]), str(meta["transition_dir"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{path} is damaged ({type(e).__name__}: {e}); {RERUN}") from None
    changed = diff(read_config(run).to_dict(), cfg.to_dict())
    if changed:
        k, a, b = changed[0]
        raise RunDirError(f"{path} holds another config than {run / 'config.json'} ({k}: {b!r} there, {a!r} in "
                          f"config.json); {RERUN}")
    stages = read_stages(run)
    recorded = {"vae": stage_output(run, stages, "vae", "vae"), m_dir: stage_output(run, stages, m_dir, m_dir),
                "controller": stage_output(run, stages, f"evolve_round{r}", f"evolve_round{r}")}
    if meta.get("built_from") != logs.finite_or_none(recorded):
        raise RunDirError(f"{path} names another V, M or controller than {run / 'stages.json'} records; {RERUN}")
    return cfg, meta, stages


def load_agent(run: Path | str) -> tuple[Config, dict[str, Any]]:
    """The final agent of a finished run: (cfg, {"vae", "transition", "controller"}), each checked
    against what its stage recorded in stages.json."""
    run = Path(run)
    if not (run / "agent.json").exists() or not (run / "controller.npy").exists():
        raise FileNotFoundError(f"{run}: no trained agent (agent.json / controller.npy missing; run `wm-jax run` "
                                f"first, or rerun it to repair a finished run)")
    cfg, meta, stages = read_agent_record(run)
    r, m_dir, built_from = int(meta["round"]), str(meta["transition_dir"]), meta["built_from"]
    try:
        vae_params = vae.load(cfg, run / "vae", built_from["vae"])
    except checkpoint.Damaged as e:
        raise damaged(run, "vae", "vae", e) from None
    # The M the controller was evolved with, under its round's config (fine-tuning rounds train
    # fewer steps).
    try:
        rcfg = round_config(cfg, stages, r)
    except ConfigError as e:
        raise RunDirError(f"{run}: round {r}'s M cannot be found ({e}); {RERUN}") from None
    try:
        m_params = transition.load(rcfg, run / m_dir, built_from[m_dir])
    except checkpoint.Damaged as e:
        raise damaged(run, m_dir, m_dir, e) from None
    ctrl = read_controller(run / "controller.npy", built_from["controller"])
    if ctrl is None:
        raise RunDirError(f"{run / 'controller.npy'} is damaged or differs from the controller the search of round {r} "
                          f"recorded; {RERUN}")
    return cfg, {"vae": vae_params, "transition": m_params, "controller": jnp.asarray(ctrl)}


ADDED_VERIFIER = "verifier_added"  # K trained for a finished run by `wm-jax train-verifier` (train_verifier)


def load_verifier(run: Path | str) -> Any:
    """K trained beside the final agent's M (its round's), or the one `train_verifier` added to a
    run trained without K; None when there is neither."""
    run = Path(run)
    cfg, meta, stages = read_agent_record(run)
    if cfg.verifier.mode == "off":
        added = run / ADDED_VERIFIER
        if not (added / "done.json").exists():
            return None
        remedy = f"rerun `wm-jax train-verifier {run}`"
        record = read_json(added / "done.json", remedy)
        if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
            raise RunDirError(f"{added / 'done.json'} is damaged (no checkpoint identity); {remedy}")
        if record.get("m_identity") != final_m_identity(meta):
            raise RunDirError(f"{added} was trained against another M than this run's final agent has now; {remedy}")
        try:
            return verifier.load(with_k_steps(cfg, record.get("steps")), added, record["identity"])
        except (checkpoint.Damaged, checkpoint.CheckpointError) as e:
            raise RunDirError(f"{added} is damaged ({e}); {remedy}") from None
    r = int(meta["round"])
    name = "verifier" if r == 1 else f"verifier_round{r}"
    try:
        return verifier.load(round_config(cfg, stages, r), run / name, stage_output(run, stages, name, name))
    except checkpoint.Damaged as e:
        raise damaged(run, name, name, e) from None


def final_m_identity(meta: dict[str, Any]) -> Any:
    """The final agent's M (its step and parameter hash), as a checked agent.json names it."""
    return meta["built_from"][str(meta["transition_dir"])]


def with_k_steps(cfg: Config, steps: int | None) -> Config:
    if steps is None:
        return cfg
    train = dataclasses.replace(cfg.verifier.train, steps=int(steps))
    return dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, train=train))


def card(run: Path | str) -> dict[str, Any]:
    """What a finished run measured, for an exported agent's model card (summary.json's figures)."""
    try:
        summary = json.loads((Path(run) / "summary.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    keys = ("real_return_mean", "real_return_std", "real_return_min", "real_episodes", "real_env_steps_training",
            "agent_round", "device", "versions")
    return {k: summary[k] for k in keys if k in summary}


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
    arrays = load_arrays(paths, cfg.env)
    index = data_lib.EpisodeIndex.from_columns(arrays["episode"], arrays["t"])
    lat = read_latents(run / f"latents_round{len(paths)}.npz",
                       stage_output(run, read_stages(run), f"encode_round{len(paths)}", f"latents_round{len(paths)}.npz"))
    if lat is None:
        raise RunDirError(f"{run / f'latents_round{len(paths)}.npz'} is damaged or differs from what its stage recorded; "
                          f"rerun the `wm-jax run` that made this directory (same --out) to rebuild it")
    return Run(cfg, params, transition.training_arrays(lat["mean"], lat["logvar"], arrays, index))


def read_latents(path: Path, recorded: str | None, names: tuple[str, ...] = ("mean", "logvar")
                 ) -> dict[str, np.ndarray] | None:
    """V's posteriors stored in `path` (the arrays `names`: a batch of seeds' also has "rows") if
    readable and (with a record) hashing to it; else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            lat = {k: f[k] for k in names}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if recorded is not None and checkpoint.digest(lat) != recorded:
        return None
    return lat
