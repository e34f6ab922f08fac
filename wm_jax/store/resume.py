"""The one resumable loop: a state checkpointed after its chunks, and JSON-lines logs that never run
ahead of the checkpoint. V, M and K's training (models.train.fit) and every controller search
(search.driver.search) run through it.

    loop = Resumable(out_dir, state, stored, logs=("metrics.jsonl",), step_field="step", total=steps,
                     desc="vae", unit="step", progress=True)
    state = loop.state                       # the newest readable checkpoint's, or the one given
    with loop:
        for done in loop.chunks():           # Ctrl-C and SIGTERM stop here, between chunks
            state, rows = ...                # one jitted chunk of n steps
            loop.record(n, state, {"metrics.jsonl": rows}, save=True)

A resumed loop starts from its newest complete checkpoint (a damaged newest one is set aside,
checkpoint.restore_latest) and cuts every log back to the entries at or before it (a torn last
line from a crash too), so a killed loop ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wm_jax import interrupt, logs
from wm_jax.store import checkpoint


def cut_log(path: Path, step_field: str, upto: int) -> list[dict[str, Any]]:
    """The entries of the JSON-lines log `path` whose `step_field` is <= upto, rewritten atomically
    (entries after the checkpoint a loop resumes from, and a torn last line, are dropped)."""
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get(step_field, upto + 1) <= upto:
                keep.append(entry)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
    os.replace(tmp, path)
    return keep


class Resumable:
    """A loop of `total` steps (training steps, generations) over a checkpointed state."""

    def __init__(self, out_dir: Path | str, state: Any, stored: dict[str, Any], logs: tuple[str, ...],
                 step_field: str, total: int, desc: str, unit: str, progress: bool = True,
                 max_to_keep: int = 2) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.stored, self.step_field, self.total = stored, step_field, total
        self.max_to_keep = max_to_keep
        restored = checkpoint.restore_latest(self.ckpt_dir, state, stored, max_to_keep, set_aside=True)
        self.start = self.done = 0 if restored is None else int(restored[0])
        self.state = state if restored is None else restored[1]
        self.logged = {name: cut_log(self.out_dir / name, step_field, self.done) for name in logs}
        self._bar_args = {"total": total, "initial": self.done, "desc": desc, "unit": unit, "disable": not progress,
                          "leave": False}

    def __enter__(self) -> Resumable:
        self.manager = checkpoint.manager(self.ckpt_dir, self.max_to_keep)
        self.bar = tqdm(**self._bar_args)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.manager is not None:  # None: not process 0 under jax.distributed (checkpoint.manager)
            self.manager.close()

    def chunks(self) -> Iterator[int]:
        """The steps done before each chunk, until `total`; Ctrl-C or SIGTERM stops between chunks,
        where the last checkpoint is whole."""
        while self.done < self.total:
            interrupt.check()
            yield self.done

    def record(self, n: int, state: Any, rows: dict[str, list[dict[str, Any]]], save: bool) -> None:
        """A chunk of n steps ended in `state`: its log rows are appended, then (with `save`) the
        state is checkpointed at the new step count."""
        for name, entries in rows.items():
            logs.append(self.out_dir / name, entries, step=self.step_field)
            self.logged[name] += entries
        self.done += n
        self.state = state
        if save:
            checkpoint.save(self.manager, self.done, state, self.stored)
        self.bar.update(n)
