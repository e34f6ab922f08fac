"""Metric records: the JSON-lines files of every stage, and optional writers fed the same records.

    logs.append(path, rows, step="step")   # train.fit (metrics.jsonl), driver.search (generations/evolve.jsonl)
    logs.use("tensorboard")                 # also write TensorBoard event files (`--log tensorboard`)

The JSON lines are the record (resumes, plots and experiments read them). A writer turned on with
`use` receives each batch of rows as it is appended: the TensorBoard writer keeps one event-file
folder per stage folder (STAGE/tensorboard/, so `tensorboard --logdir RUN_DIR` shows every stage as
a run) and one scalar per numeric field, tagged FILE/FIELD (e.g. metrics/loss, evolve/real_return),
with the cell's index appended for a batched search. A resumed stage starts its event files from
the step it resumes at: the events a crashed process logged past that step are purged.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

WRITERS = ("tensorboard",)


def finite_or_none(obj: Any) -> Any:
    """Strict JSON: a metric that is undefined (NaN, e.g. a correlation of a constant) becomes null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj



class Writer(Protocol):
    def write(self, path: Path, rows: list[dict[str, Any]], step: str) -> None: ...

    def close(self) -> None: ...


_active: list[Writer] = []


def append(path: Path | str, rows: list[dict[str, Any]], step: str = "step") -> None:
    """Append `rows` to the JSON-lines file `path` and hand them to the active writers; `step`
    names the field that orders them (the training step, a search's generation)."""
    path = Path(path)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for w in _active:
        w.write(path, rows, step)


def use(*kinds: str) -> None:
    """Turn on writers for the rest of the process (names from WRITERS; none turns all off)."""
    for kind in kinds:
        if kind not in WRITERS:
            raise ValueError(f"unknown log writer {kind!r}; choose from {', '.join(WRITERS)}")
    close()
    _active.extend(TensorBoard() for kind in kinds if kind == "tensorboard")


def close() -> None:
    """Flush and close the active writers."""
    while _active:
        _active.pop().close()


atexit.register(close)


class TensorBoard:
    """TensorBoard event files through tensorboardX (the `tensorboard` extra)."""

    def __init__(self) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("--log tensorboard needs tensorboardX: pip install -e '.[tensorboard]'") from None
        self._new = SummaryWriter
        self._open: dict[Path, Any] = {}

    def write(self, path: Path, rows: list[dict[str, Any]], step: str) -> None:
        if not rows:
            return
        logdir = path.parent / "tensorboard"
        writer = self._open.get(logdir)
        if writer is None:  # the first rows of this process: a resumed stage purges what came after
            writer = self._open[logdir] = self._new(str(logdir), purge_step=int(rows[0][step]), flush_secs=30)
        for row in rows:
            suffix = f"/cell{row['cell']}" if "cell" in row else ""
            for name, value in row.items():
                if name in (step, "cell") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                writer.add_scalar(f"{path.stem}/{name}{suffix}", value, int(row[step]))
        writer.flush()

    def close(self) -> None:
        for writer in self._open.values():
            writer.close()
        self._open.clear()
