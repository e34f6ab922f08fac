"""Portable agents: V, M, C (and K when trained) as one folder that loads without a run directory.

    pretrained.save(dir, cfg, params, card)     # Agent.save_pretrained / `wm-jax export RUN --out DIR`
    cfg, params, card = pretrained.load(dir)    # Agent.from_pretrained

The folder holds
  model.safetensors  every parameter as a named tensor: "vae/params/...", "transition/params/...",
                     "controller", "verifier/params/..." (names are the parameter tree's paths)
  config.json        the format and its version, the full Config (every field the networks are
                     rebuilt from), each tensor's shape and dtype, the weights' SHA-256, the card, and
                     a SHA-256 of all of that (config_sha256): an edit is refused, not loaded
  README.md          a model card: preset, seed, measured return, real steps, versions
Loading checks all of it: a missing or damaged file, a config.json edited after export, weights
that differ from their recorded hash or were exported with another config (the weights' own
metadata holds the config they were exported with), or tensors that differ from the layout this
version builds is a PretrainedError naming the problem.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

from wm_jax.models import controller, transition, vae, verifier
from wm_jax.store import checkpoint, data
from wm_jax.config import Config
from wm_jax.schema import ConfigError, diff, json_digest

FORMAT = "wm_jax.agent"
FORMAT_VERSION = 2  # 2: config.json hashes its own content; the weights' metadata holds the config
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
COMPONENTS = ("vae", "transition", "controller", "verifier")


class PretrainedError(ValueError):
    """An exported agent folder that is missing, damaged or of another layout."""


def _named(tree: dict[str, Any]) -> dict[str, Any]:
    """{tensor name: leaf} of a {component: parameter tree} dict, in a fixed order: the component,
    then the leaf's path in its tree ("vae/params/Encoder_0/Conv_0/kernel"; the controller's flat
    vector is just "controller")."""
    out = {}
    for comp in COMPONENTS:
        if tree.get(comp) is None:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree[comp])[0]:
            out["/".join((comp, *map(checkpoint.key_name, path)))] = leaf
    return out


def flatten(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """{tensor name: host array} for the components present in `params`."""
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in _named(jax.device_get(params)).items()}


def layout(cfg: Config, with_verifier: bool) -> dict[str, Any]:
    """The parameter trees this version builds for `cfg`, as shape/dtype structs (nothing is computed)."""
    latent, hidden = cfg.vae.latent, cfg.transition.hidden
    key = jax.random.key(0)
    like = {
        "vae": jax.eval_shape(lambda k: vae.init(k, cfg.vae), key),
        "transition": jax.eval_shape(lambda k: transition.init(k, cfg.transition, latent), key),
        "controller": jax.ShapeDtypeStruct((controller.num_params(cfg.controller, latent, hidden),), np.float32),
    }
    if with_verifier:
        like["verifier"] = jax.eval_shape(lambda k: verifier.init(k, cfg.verifier, latent, hidden), key)
    return like


def config_digest(meta: dict[str, Any]) -> str:
    """The SHA-256 config.json carries of its own content (every key but config_sha256)."""
    return json_digest({k: v for k, v in meta.items() if k != "config_sha256"})


def card_text(cfg: Config, card: dict[str, Any]) -> str:
    """The folder's README.md: what the agent is and what it measured."""
    lines = [
        f"# wm_jax agent: World Models on pixel CartPole-v1 ({cfg.preset} preset, seed {cfg.seed})",
        "",
        "V (convolutional VAE, latent {}), M (LSTM {}, {} head), C ({} controller){}.".format(
            cfg.vae.latent, cfg.transition.hidden, cfg.transition.head, cfg.controller.kind,
            ", K (verifier)" if card.get("has_verifier") else ""),
        "",
        "| measured | value |",
        "|---|---|",
    ]
    for key, label in (("real_return_mean", "real return, mean"), ("real_return_std", "real return, std"),
                       ("real_episodes", "real episodes evaluated"),
                       ("real_env_steps_training", "real env steps used in training"),
                       ("agent_round", "round of the final agent"), ("device", "trained on")):
        if card.get(key) is not None:
            lines.append(f"| {label} | {card[key]} |")
    versions = card.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    lines += [
        "",
        "Load it with",
        "",
        "```python",
        "from wm_jax import Agent",
        "agent = Agent.from_pretrained(\"<this folder>\")",
        "carry = agent.initial_carry()",
        "action, carry = agent.act(carry, obs)   # obs: uint8[64, 64, 4]",
        "```",
        "",
        f"Files: {WEIGHTS} (safetensors), {CONFIG} (format {FORMAT} v{FORMAT_VERSION}, the full config).",
        "",
    ]
    return "\n".join(lines)


def is_export(directory: Path | str) -> bool:
    """Whether `directory` looks like an exported agent (its config.json names this format, or it
    holds the weights file): what `save` may replace and `Agent.open` loads as one."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return (directory / WEIGHTS).is_file()
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _refuse_to_replace(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise PretrainedError(f"{directory} is a file, not a folder; choose another folder for the export")
    if any(directory.iterdir()) and (not is_export(directory) or (directory / "stages.json").exists()
                                     or (directory / "agent.json").exists()):
        raise PretrainedError(f"{directory} exists and is not an exported wm_jax agent (a run directory or other "
                              f"files); nothing was written: choose another folder")


def _write_error(path: Path, error: Exception) -> Exception:
    """An OSError with the errno the text names (the CLI's exit 3 for a full disk or a read-only
    folder), else a PretrainedError saying the file could not be written."""
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        if os.strerror(code) in str(error):
            return OSError(code, os.strerror(code), str(path))
    return PretrainedError(f"cannot write {path} ({error})")


def save(directory: Path | str, cfg: Config, params: dict[str, Any], card: dict[str, Any] | None = None) -> Path:
    """Write the folder atomically: the files are built beside it and swapped in whole, so a crash
    leaves the old folder or the new one (a failed swap puts the old one back). A folder that is
    not an earlier export (a run directory, anything else) is never replaced."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    directory = Path(directory).resolve()
    if directory.parent == directory:
        raise PretrainedError(f"{directory}: cannot export into the file system's root; choose a folder")
    _refuse_to_replace(directory)
    tensors = flatten(params)
    card = {**(card or {}), "has_verifier": params.get("verifier") is not None}
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                                             "config": cfg.to_json()})
        except SafetensorError as e:  # a plain Exception: its text carries the OS reason, if any
            raise _write_error(tmp / WEIGHTS, e) from None
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
            "sha256": {WEIGHTS: data.sha256_file(tmp / WEIGHTS)},
            "card": card,
        }
        meta = json.loads(json.dumps(meta, allow_nan=False))  # hashed as it will be read back
        meta["config_sha256"] = config_digest(meta)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False))
        (tmp / CARD).write_text(card_text(cfg, card))
        mask = os.umask(0)
        os.umask(mask)
        for f in tmp.iterdir():  # safetensors writes its file owner-only; an export is for sharing
            f.chmod(0o644 & ~mask)
            with open(f, "rb") as fh:  # on disk before the swap that makes it the export
                os.fsync(fh.fileno())
        data.swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _meta(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not directory.is_dir():
        raise PretrainedError(f"{directory}: no such folder (an exported agent is a folder with {CONFIG} and {WEIGHTS})")
    if not path.exists():
        raise PretrainedError(f"{path} is missing: {directory} is not an exported wm_jax agent (make one with "
                              f"`wm-jax export RUN_DIR --out DIR`)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path} is damaged ({type(e).__name__}: {e}); export the agent again") from None
    except OSError as e:
        raise PretrainedError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PretrainedError(f"{path} is not a wm_jax agent's config (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PretrainedError(f"{directory} has layout version {meta.get('format_version')!r}; this wm_jax reads "
                              f"version {FORMAT_VERSION}: export it again with this version")
    if meta.get("config_sha256") != config_digest(meta):
        raise PretrainedError(f"{path} was changed after export (its content's SHA-256 differs from the one it "
                              f"records); export the agent again from its run")
    return meta


def load(directory: Path | str) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    """(cfg, params {"vae", "transition", "controller"[, "verifier"]}, card) of an exported folder."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    directory = Path(directory)
    meta = _meta(directory)
    try:
        cfg = Config.from_dict(meta["config"])
        recorded = meta["sha256"][WEIGHTS]
        card = dict(meta.get("card") or {})
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{directory / CONFIG} is damaged ({type(e).__name__}: {e}); export the agent again") from None
    weights = directory / WEIGHTS
    if not weights.exists():
        raise PretrainedError(f"{weights} is missing; export the agent again")
    try:
        digest = data.sha256_file(weights)
    except OSError as e:
        raise PretrainedError(f"cannot read {weights} ({e.strerror or e})") from None
    if digest != recorded:
        raise PretrainedError(f"{weights} is damaged (its SHA-256 differs from the one {CONFIG} records); "
                              f"export the agent again")
    try:
        tensors = load_file(str(weights))
        with safe_open(str(weights), "np") as f:
            exported = json.loads((f.metadata() or {}).get("config", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{weights} is damaged ({type(e).__name__}: {e}); export the agent again") from None
    changed = diff(meta["config"], exported) if isinstance(exported, dict) else [("config", "a config", None)]
    if changed:
        k, a, b = changed[0]
        raise PretrainedError(f"{directory / CONFIG} does not fit {weights}: {k} is {a!r} in {CONFIG} but the weights "
                              f"were exported with {b!r}; one was changed after export: export the agent again from "
                              f"its run")
    like = layout(cfg, with_verifier=any(k.startswith("verifier/") for k in tensors))
    wanted = {name: (tuple(leaf.shape), np.dtype(leaf.dtype)) for name, leaf in _named(like).items()}
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise PretrainedError(f"{weights} holds another layout than this wm_jax builds from its config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}); export it again with this version")
    for name, (shape, dtype) in wanted.items():
        if tensors[name].shape != shape or tensors[name].dtype != dtype:
            raise PretrainedError(f"{weights}: tensor {name} is {tensors[name].dtype}{list(tensors[name].shape)}, this "
                                  f"wm_jax builds {dtype}{list(shape)} from the config; export it again with this version")
    params = {}
    for comp, tree in like.items():  # each tree's leaves in its own flattening order, as _named names them
        leaves = [jax.numpy.asarray(tensors[name]) for name in _named({comp: tree})]
        params[comp] = jax.tree.unflatten(jax.tree.structure(tree), leaves)
    return cfg, params, card

