"""Writing what an experiment measured: atomic files, and the table between two markers of a
results document (docs/RESULTS.md), which the scripts in experiments/ replace on every run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np


def write(path: Path, text: str) -> None:
    """`text` to `path` atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def update_block(path: Path, text: str, begin: str, end: str) -> bool:
    """Replace what lies between the markers `begin` and `end` in `path`; False if it has none."""
    doc = path.read_text()
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    write(path, head + begin + "\n" + text + rest[rest.index(end):])
    return True


def fmt(x: float | None, nd: int = 1) -> str:
    """A table cell: the number to `nd` decimals, "n/a" for None."""
    return "n/a" if x is None else f"{x:.{nd}f}"


def mean_std(values: list[float | None], nd: int = 1) -> str:
    """A table cell: mean +- std (over seeds) of the values that exist, naming how many when some
    are missing; one value alone, "n/a" for none."""
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    out = f"{np.mean(v):.{nd}f} +- {np.std(v):.{nd}f}" if len(v) > 1 else f"{v[0]:.{nd}f}"
    return out if len(v) == len(values) else f"{out} ({len(v)} of {len(values)} seeds)"


def runs_parser(doc: str, required: bool = True) -> argparse.ArgumentParser:
    """An experiment's argument parser: described by its docstring's first line, reading run
    directories (at least one when `required`)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("runs", nargs="+" if required else "*", type=Path)
    return p


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """A matplotlib figure to `path`, laid out tight, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
