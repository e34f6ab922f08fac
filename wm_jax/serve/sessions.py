"""Sessions: the agent's recurrent carry per client, and the /act step `Outer` takes once its
answer went out.

Two stores share one interface, so the app calls the same methods whichever serves it:
`Sessions` (this process's memory, LRU-capped; the default) and `redis_sessions.RedisSessions`
(one Redis that every replica shares). Every method is a coroutine, because Redis answers over
the network:

    await store.create(carry) -> id         await store.delete(id) -> bool
    await store.begin(id) -> Held | None     the session held for one step (None: unknown)
    await store.peek(id) -> (carry, steps) | None   read without holding (/v1/dream)
    await store.count() -> int               await store.state() -> dict (/health)
    await store.close()

A step holds its session from `begin` until `Outer` takes it (`Held.take`) or drops it
(`Held.release`), so two concurrent /act on one session never both advance from the same carry:
the second waits for the first and then steps from its result. A store that cannot be reached
raises `StoreDown`; a session held longer than the store waits raises `Busy` (both 503: retry).
Idle sessions expire after `ttl` seconds (None: never).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Carry = tuple[np.ndarray, np.ndarray]


class StoreDown(RuntimeError):
    """The session store cannot be reached: the request is answered 503 with this one line."""


class Busy(RuntimeError):
    """The session stayed held by another request longer than the store waits: 503, retry."""


@dataclass
class Session:
    carry: Carry
    steps: int = 0
    used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Held:
    """A session held for one /act step: its carry and step count when the step began. `take`
    stores the new carry (one step more) and lets the session go; `release` lets it go unchanged
    (a no-op once taken). `alive` says whether the session still exists (not deleted, evicted or
    expired while the step ran)."""

    sid: str
    carry: Carry
    steps: int

    async def alive(self) -> bool:
        raise NotImplementedError

    async def take(self, carry: Carry) -> bool:
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError


class MemoryHeld(Held):
    def __init__(self, store: Sessions, sid: str, session: Session) -> None:
        self.store, self.sid, self.session = store, sid, session
        self.carry, self.steps = session.carry, session.steps
        self._done = False

    async def alive(self) -> bool:
        return self.store.holds(self.sid, self.session)

    async def take(self, carry: Carry) -> bool:
        self.session.carry = carry
        self.session.steps += 1
        self.session.used = time.monotonic()
        await self.release()
        return True

    async def release(self) -> None:
        if not self._done:
            self._done = True
            self.session.lock.release()


class Sessions:
    """This process's sessions: at most `cap` (creating one more evicts the least recently used),
    each dropped once idle for `ttl` seconds (checked when it is next looked up). A restart loses
    them all."""

    kind = "memory"

    def __init__(self, cap: int, ttl: float | None = None) -> None:
        self.cap = cap
        self.ttl = ttl
        self._items: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sid: str) -> Session | None:
        """The live session `sid` (now the most recently used), or None."""
        s = self._items.get(sid)
        if s is None:
            return None
        if self.ttl is not None and time.monotonic() - s.used > self.ttl and not s.lock.locked():
            del self._items[sid]
            self.expired += 1
            return None
        self._items.move_to_end(sid)
        return s

    def holds(self, sid: str, session: Session) -> bool:
        """Whether `session` is still stored under `sid` (not deleted or evicted); the LRU order stays."""
        return self._items.get(sid) is session

    async def create(self, carry: Carry) -> str:
        while len(self._items) >= self.cap:
            self._items.popitem(last=False)
            self.evicted += 1
        sid = uuid.uuid4().hex
        self._items[sid] = Session(carry)
        return sid

    async def delete(self, sid: str) -> bool:
        return self._items.pop(sid, None) is not None

    async def begin(self, sid: str) -> Held | None:
        s = self.get(sid)
        if s is None:
            return None
        await s.lock.acquire()  # the holder always ends in this process: its step is bounded
        s.used = time.monotonic()
        return MemoryHeld(self, sid, s)

    async def peek(self, sid: str) -> tuple[Carry, int] | None:
        s = self.get(sid)
        return None if s is None else (s.carry, s.steps)

    async def count(self) -> int:
        return len(self._items)

    async def state(self) -> dict[str, Any]:
        return {"store": "memory", "reachable": True, "ttl_s": self.ttl, "max_sessions": self.cap,
                "evicted": self.evicted, "expired": self.expired}

    async def close(self) -> None:
        pass


STEP = "wm_jax.step"  # the ASGI scope key under which /act leaves its step for `Outer` to take or drop


@dataclass
class Step:
    """An /act step computed and answered but not yet taken: its held session (which no other
    request can step until `Outer` knows whether the answer went out) and the carry it advances to."""

    held: Held
    carry: Carry

    async def take(self) -> bool:
        return await self.held.take(self.carry)

    async def release(self) -> None:
        await self.held.release()
