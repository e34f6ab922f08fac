"""Sessions: the agent's recurrent carry per client, LRU-capped, and the /act step `Outer` takes
once its answer went out."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np





@dataclass
class Session:
    carry: tuple[np.ndarray, np.ndarray]
    steps: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    """At most `cap` sessions; creating one more evicts the least recently used."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def create(self, carry: tuple[np.ndarray, np.ndarray]) -> str:
        while len(self._items) >= self.cap:
            self._items.popitem(last=False)
            self.evicted += 1
        sid = uuid.uuid4().hex
        self._items[sid] = Session(carry)
        return sid

    def get(self, sid: str) -> Session | None:
        s = self._items.get(sid)
        if s is not None:
            self._items.move_to_end(sid)
        return s

    def holds(self, sid: str, session: Session) -> bool:
        """Whether `session` is still stored under `sid` (not deleted or evicted); the LRU order stays."""
        return self._items.get(sid) is session

    def delete(self, sid: str) -> bool:
        return self._items.pop(sid, None) is not None


STEP = "wm_jax.step"  # the ASGI scope key under which /act leaves its step for `Outer` to take or drop


@dataclass
class Step:
    """An /act step computed and answered but not yet taken: its session, whose lock the request
    holds until `Outer` knows whether the answer went out, and the carry it advances to."""

    session: Session
    carry: tuple[np.ndarray, np.ndarray]

    def take(self) -> None:
        self.session.carry = self.carry
        self.session.steps += 1
