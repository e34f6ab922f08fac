"""PNG figures for run directories (matplotlib, Agg backend; nothing is shown on screen)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wm_jax import data as data_lib  # noqa: E402
from wm_jax import dream, transition, vae  # noqa: E402
from wm_jax.config import Config  # noqa: E402
from wm_jax.env import PixelCartPole  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def reconstruction_grid(cfg: Config, params: Any, arrays: dict, index: data_lib.EpisodeIndex, path: Path, n: int = 6) -> None:
    """Real (top) vs reconstructed (bottom) newest frames for rows spread over a few episodes."""
    rows = np.linspace(0, len(arrays["t"]) - 1, n).astype(np.int32)
    x = data_lib.stacks(jnp.asarray(arrays["frame"]), jnp.asarray(index.stack_rows), jnp.asarray(rows))
    mean, _ = vae.encode(cfg.vae, params, x)
    recon = np.asarray(vae.decode(cfg.vae, params, mean))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        axes[0, i].imshow(np.asarray(x[i, ..., -1]), cmap="gray", vmin=0, vmax=255)
        axes[1, i].imshow(recon[i, ..., -1], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"row {rows[i]}", fontsize=7)
        for a in axes[:, i]:
            a.axis("off")
    axes[0, 0].text(-8, 32, "real", rotation=90, va="center")
    axes[1, 0].text(-8, 32, "recon", rotation=90, va="center")
    _save(fig, path)


def loss_curves(run_dir: Path, path: Path) -> None:
    from wm_jax.train import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith("loss")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6))
    axes = np.atleast_1d(axes)
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes, keys):
        ax.plot(steps, [r[k] for r in rows])
        ax.set_title(k, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
    _save(fig, path)


def dream_vs_real(checks: list[dict[str, Any]], path: Path) -> None:
    if not checks:
        return
    g = np.arange(len(checks))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(g, [c["real_return"] for c in checks], "s-", color="tab:orange", label="real return")
    ax.set_xlabel("check of the CMA-ES mean (in order, over rounds)")
    ax.set_ylabel("real return", color="tab:orange")
    # Dream returns are capped by the horizon: their own axis keeps the shape visible.
    ax2 = ax.twinx()
    ax2.plot(g, [c["dream_return"] for c in checks], "o-", color="tab:blue", label="dream return")
    ax2.set_ylabel("dream return (horizon-limited)", color="tab:blue")
    _save(fig, path)


def episode_strip(cfg: Config, params: dict[str, Any], key: jax.Array, path: Path, npz_path: Path, steps: int = 10) -> None:
    """One real episode's frames, their reconstructions, and M's open-loop dream along the same actions.

    Also saves a batch of imagined rollouts of the final controller (npz) for debugging.
    """
    from wm_jax import rollout

    env = PixelCartPole()
    k_reset, k_run, k_dream = jax.random.split(key, 3)
    obs, state = env.reset(k_reset)
    carry = transition.initial_carry(cfg.transition)
    real, zs, actions = [], [], []
    for t in range(steps):
        action, carry, extra = rollout.agent_step(cfg, params, carry, obs)
        real.append(np.asarray(obs[..., -1]))
        zs.append(extra["mean"])
        actions.append(int(action))
        obs, state, *_ = env.step(jax.random.fold_in(k_run, t), state, action)
    recon = np.asarray(vae.decode(cfg.vae, params["vae"], jnp.stack(zs)))[..., -1]
    # open loop: M from the first real latent, fed its own samples and the real actions
    c = transition.initial_carry(cfg.transition)
    z = zs[0]
    dreamed = []
    for t in range(steps):
        dreamed.append(np.asarray(vae.decode(cfg.vae, params["vae"], z[None]))[0, ..., -1])
        c, pred = transition.step(cfg.transition, params["transition"], c, z, jnp.asarray(actions[t]))
        z = transition.sample_latent(jax.random.fold_in(k_dream, t), pred, cfg.evolve.tau)
    fig, axes = plt.subplots(3, steps, figsize=(1.2 * steps, 3.9))
    for t in range(steps):
        axes[0, t].imshow(real[t], cmap="gray", vmin=0, vmax=255)
        axes[1, t].imshow(recon[t], cmap="gray", vmin=0, vmax=1)
        axes[2, t].imshow(dreamed[t], cmap="gray", vmin=0, vmax=1)
        axes[0, t].set_title(f"t={t}", fontsize=7)
        for a in axes[:, t]:
            a.axis("off")
    for i, name in enumerate(("real", "recon", "dream")):
        axes[i, 0].text(-10, 32, name, rotation=90, va="center", fontsize=8)
    _save(fig, path)

    starts = jnp.stack(zs)
    keys = jax.random.split(k_dream, starts.shape[0])
    k_params = params.get("verifier")  # with K, the rollouts also record its confidence
    if k_params is None:
        cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, mode="off"))
    trajs = [dream.dream(cfg, k, params["transition"], params["controller"], s, cfg.evolve.horizon, k_params)[0]
             for k, s in zip(keys, starts)]
    stacked = {k: np.stack([np.asarray(tr[k]) for tr in trajs]) for k in trajs[0]}
    tmp = npz_path.with_name(f".{npz_path.name}.tmp.npz")
    np.savez_compressed(tmp, **stacked)
    import os

    os.replace(tmp, npz_path)
