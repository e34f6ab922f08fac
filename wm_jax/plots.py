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


def seed_curves(curves: list[list[tuple[int, float]]], grid: np.ndarray, center: np.ndarray, band: np.ndarray,
                finals: list[tuple[int, float]], threshold: float | None, path: Path) -> None:
    """Real return against real steps: each seed's collections, checks and final evaluation (thin steps), their
    IQM over seeds with its 95% band (`center`, `band` [2, len(grid)] on `grid`), each seed's
    final evaluation (dots) and the task's threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for points in curves:
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="0.75", lw=0.7)
    ax.fill_between(grid, band[0], band[1], color="C0", alpha=0.25, lw=0, label="95% interval")
    ax.plot(grid, center, color="C0", lw=2, label="IQM over seeds (a finished seed holds its evaluation)")
    ax.scatter([f[0] for f in finals], [f[1] for f in finals], s=14, color="C3", zorder=3,
               label="final evaluation (100 episodes)")
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label=f"solved ({threshold:g})")
    ax.set_xlabel("real environment steps spent on training")
    ax.set_ylabel("real return")
    ax.set_title(f"{len(curves)} seeds: each collection's and real check's return, then the kept agent's evaluation",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _fractions(x: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray]], mark: tuple[float, str] | None,
               labels: tuple[str, str, str], steps: bool, first_color: int, legend: str, path: Path) -> None:
    """Fractions of seeds against x, one line with its 95% band per name ({name: (fraction, band
    [2, len(x)])}), a dashed mark (x, label) and labels (x axis, y axis, title)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for i, (name, (fraction, band)) in enumerate(curves.items()):
        color = f"C{i + first_color}"
        ax.fill_between(x, band[0], band[1], step="post" if steps else None, color=color, alpha=0.2, lw=0)
        (ax.step(x, fraction, where="post", color=color, lw=2, label=name) if steps
         else ax.plot(x, fraction, color=color, lw=2, label=name))
    if mark is not None:
        ax.axvline(mark[0], color="k", ls="--", lw=0.8, label=mark[1])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2], fontsize=8)
    ax.legend(fontsize=7, loc=legend)
    _save(fig, path)


def performance_profiles(taus: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float | None,
                         path: Path) -> None:
    """For each named method, the fraction of its seeds whose final return exceeds tau, against tau,
    with its 95% band ({name: (fraction, band [2, len(taus)])}): a performance profile."""
    _fractions(taus, curves, None if threshold is None else (threshold, f"solved ({threshold:g})"),
               ("final real return tau", "fraction of seeds above tau",
                "performance profile; shaded: 95% bootstrap interval over seeds"), False, 0, "lower left", path)


def fraction_curves(steps: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray]], goal: int | None,
                    path: Path) -> None:
    """For each named method, the fraction of its seeds that reached the threshold with at most
    `steps` real training steps, with its 95% band ({name: (fraction, band [2, len(steps)])}), and
    the step goal."""
    _fractions(steps, curves, None if goal is None else (goal, f"step goal ({goal:,})"),
               ("real environment steps spent on training", "fraction of seeds solved",
                "shaded: 95% bootstrap interval over seeds; a line ends where its runs ended"), True, 2, "lower right",
               path)
