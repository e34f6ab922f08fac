"""Ctrl-C at a chunk boundary: a long job stops where it can resume, never mid-way through a save.

Python raises KeyboardInterrupt wherever the main thread happens to be, including inside a garbage
collector callback of JAX's, where it is printed as "Exception ignored" and lost: the job goes on.
Inside `deferred()` the first SIGINT only sets a flag, and the loops that drive chunks (training
chunks, controller-search periods, collection chunks) call `check()` between chunks, which raises
KeyboardInterrupt there. A second SIGINT raises at once, for a job stuck inside one long chunk.
Outside `deferred()` (library use, other threads) nothing changes and `check()` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_pending = False


def _on_sigint(signum: int, frame: Any) -> None:
    global _pending
    if _pending:
        raise KeyboardInterrupt
    _pending = True


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived since the last chunk boundary (in the main thread
    only, the one `deferred` serves: a job in another thread never takes its Ctrl-C)."""
    global _pending
    if _pending and threading.current_thread() is threading.main_thread():
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT is honoured at the next `check()` (a second one at once) while this is open."""
    global _pending
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous is signal.SIG_IGN:
        # another thread (signals go to the main one), a handler installed outside Python (not
        # restorable), or SIGINT ignored (a job started in the background): leave it as it is
        yield
        return
    signal.signal(signal.SIGINT, _on_sigint)
    _pending = False
    try:
        yield
    finally:  # a SIGINT after the last boundary finds the job done: nothing left to stop
        signal.signal(signal.SIGINT, previous)
        _pending = False
