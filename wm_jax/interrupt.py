"""Ctrl-C and SIGTERM at a chunk boundary: a long job stops where it can resume, never mid-way through a save.

Python raises KeyboardInterrupt wherever the main thread happens to be, including inside a garbage
collector callback of JAX's, where it is printed as "Exception ignored" and lost: the job goes on.
Inside `deferred()` the first SIGINT or SIGTERM only sets a flag, and the loops that drive chunks
(training chunks, controller-search periods, collection chunks) call `check()` between chunks,
which raises `Interrupted` there. A second signal raises at once, for a job stuck inside one long
chunk. Outside `deferred()` (library use, other threads) nothing changes and `check()` does nothing.

`Interrupted` is a KeyboardInterrupt that remembers its signal, so the command line exits 128 + the
signal's number (130 for Ctrl-C, 143 for SIGTERM) with one line, as a shell reports a killed job.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: int | None = None  # the signal that arrived since the last chunk boundary


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; `signum` names it (SIGINT for Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _on_signal(signum: int, frame: Any) -> None:
    global _pending
    if _pending is not None:
        raise Interrupted(signum)
    _pending = signum


def raise_at_once(signum: int, frame: Any) -> None:
    """A handler that stops the job where it is (Python's own for SIGINT, for SIGTERM too)."""
    raise Interrupted(signum)


def check() -> None:
    """Raise Interrupted if a signal arrived since the last chunk boundary (in the main thread
    only, the one `deferred` serves: a job in another thread never takes the signal)."""
    global _pending
    if _pending is not None and threading.current_thread() is threading.main_thread():
        signum, _pending = _pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT and SIGTERM are honoured at the next `check()` (a second one at once) while this is open."""
    global _pending
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    # A handler installed outside Python (None: not restorable) or an ignored signal (a job started
    # in the background ignores Ctrl-C) is left as it is.
    taken = [s for s, h in previous.items() if h is not None and h is not signal.SIG_IGN]
    for s in taken:
        signal.signal(s, _on_signal)
    _pending = None
    try:
        yield
    finally:  # a signal after the last boundary finds the job done: nothing left to stop
        for s in taken:
            signal.signal(s, previous[s])
        _pending = None
