"""Writing what an experiment measured: atomic files, and the table between two markers of a
results document (docs/RESULTS.md), which the scripts in experiments/ replace on every run."""

from __future__ import annotations

import os
from pathlib import Path


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
