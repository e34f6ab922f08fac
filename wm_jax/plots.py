"""PNG figures for run directories (matplotlib, Agg backend; nothing is shown on screen).

Figures draw from arrays only: the numbers come from the modules that compute them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported when the first figure is drawn (importing
    wm_jax.plots, and so the pipeline, costs nothing until then)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)


def _frame_grid(rows: dict[str, tuple[np.ndarray, float]], titles: list[str], cell: tuple[float, float],
                path: Path) -> None:
    """Frames [n, 64, 64] in a grid without axes: one named row per {name: (frames, vmax)}, one
    column per title."""
    fig, axes = _pyplot().subplots(len(rows), len(titles), figsize=(cell[0] * len(titles), cell[1] * len(rows)),
                                   squeeze=False)
    for r, (name, (frames, vmax)) in enumerate(rows.items()):
        for i in range(len(titles)):
            axes[r, i].imshow(frames[i], cmap="gray", vmin=0, vmax=vmax)
            axes[r, i].axis("off")
        axes[r, 0].text(-10, 32, name, rotation=90, va="center", fontsize=8)
    for i, title in enumerate(titles):
        axes[0, i].set_title(title, fontsize=7)
    _save(fig, path)


def reconstruction_grid(real: np.ndarray, recon: np.ndarray, rows: np.ndarray, path: Path) -> None:
    """Real (top, uint8) vs reconstructed (bottom, [0, 1]) newest frames [n, 64, 64] of dataset `rows`."""
    _frame_grid({"real": (real, 255), "recon": (recon, 1)}, [f"row {r}" for r in rows], (1.6, 1.7), path)


def loss_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per loss term of a training run's metrics (train.read_metrics)."""
    plt = _pyplot()
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
    fig, ax = _pyplot().subplots(figsize=(5, 3))
    ax.plot(g, [c["real_return"] for c in checks], "s-", color="tab:orange", label="real return")
    ax.set_xlabel("check of the CMA-ES mean (in order, over rounds)")
    ax.set_ylabel("real return", color="tab:orange")
    # Dream returns are capped by the horizon: their own axis keeps the shape visible.
    ax2 = ax.twinx()
    ax2.plot(g, [c["dream_return"] for c in checks], "o-", color="tab:blue", label="dream return")
    ax2.set_ylabel("dream return (horizon-limited)", color="tab:blue")
    _save(fig, path)


def episode_strip(real: np.ndarray, recon: np.ndarray, dreamed: np.ndarray, path: Path) -> None:
    """Rows: a real episode's newest frames (uint8), V's reconstructions and M's open-loop dream
    along the same actions ([0, 1]); each [steps, 64, 64] (the first steps of rollout.open_loop)."""
    _frame_grid({"real": (real, 255), "recon": (recon, 1), "dream": (dreamed, 1)},
                [f"t={t}" for t in range(len(real))], (1.2, 1.3), path)
