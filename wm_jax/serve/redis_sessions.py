"""Sessions in Redis (`wm-jax serve --sessions redis://HOST:PORT/DB`): every replica that shares the
Redis answers every session, and a replica holds no session state of its own.

A session is one hash, `wm_jax:session:<id>`: the carry (c and h, little-endian float32, end to
end), the step count, the last use, and the holder of its step lock (a random token and the time it
lapses). It expires after `ttl` idle seconds (Redis' EXPIRE, renewed by every step). Each
operation on it is one Lua script, so it is atomic on the Redis server:

    begin    the session exists and nobody holds it (or the holder's lock lapsed): hold it with a
             new token for `lock_s` seconds and return its carry and step count
    commit   the token still holds it: store the new carry, one step more, let it go
    release  the token still holds it: let it go unchanged

Why a lock with a lapse rather than a compare-and-set on a version: the step is committed only
after its answer went out (`Outer`), so a second request must not compute from the same carry
meanwhile; with compare-and-set it would, and one of two answered steps could not be stored. The
lapse bounds what a replica that dies holding a lock costs: its sessions wait at most `lock_s`.
Both cost the same round trips (one script to read, one to write). Requests of this process for one
session also queue on an asyncio lock, so only one of them polls Redis.

Redis unreachable: every call raises `StoreDown` within about `timeout` seconds (short socket
timeouts, one reconnection try), never hangs.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from wm_jax.serve.sessions import Busy, Carry, Held, StoreDown

try:  # the serve extra; only `--sessions redis://` needs it
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - exercised where the extra is missing
    aioredis = None
    RedisError = OSError

PREFIX = "wm_jax:session:"
SCHEMES = ("redis", "rediss")

_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('HMGET', KEYS[1], 'lk', 'lu')
if held[1] and held[1] ~= '' and tonumber(held[2]) > now then return {1, tonumber(held[2]) - now} end
redis.call('HSET', KEYS[1], 'lk', ARGV[1], 'lu', now + tonumber(ARGV[2]), 'u', now)
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
local v = redis.call('HMGET', KEYS[1], 'c', 'n')
return {2, v[1], v[2]}
"""
_COMMIT = """
if redis.call('HGET', KEYS[1], 'lk') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'c', ARGV[2], 'lk', '', 'lu', 0, 'u', tonumber(t[1]) * 1000)
redis.call('HINCRBY', KEYS[1], 'n', 1)
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 'lk') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lk', '', 'lu', 0)
return 1
"""


def check_url(url: str) -> str:
    """A Redis URL, redis://HOST:PORT/DB (rediss:// for TLS); a ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"sessions must be 'memory' or redis://HOST:PORT/DB, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown(url)}: the port must be a TCP port in [1, 65535]") from None
    if not parts.hostname or (port is not None and port < 1):
        raise ValueError(f"{shown(url)}: needs a host, as in redis://127.0.0.1:6379/0")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"{shown(url)}: the database must be a number, as in redis://127.0.0.1:6379/0")
    return url


def shown(url: str) -> str:
    """The URL without its password, to name the store in errors and /health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]).geturl()


def encode(carry: Carry) -> bytes:
    return np.concatenate([np.asarray(carry[0], "<f4"), np.asarray(carry[1], "<f4")]).tobytes()


def decode(raw: bytes) -> Carry:
    flat = np.frombuffer(raw, "<f4").astype(np.float32)
    half = flat.size // 2
    return flat[:half].copy(), flat[half:].copy()


class RedisHeld(Held):
    def __init__(self, store: RedisSessions, sid: str, token: str, carry: Carry, steps: int) -> None:
        self.store, self.sid, self.token, self.carry, self.steps = store, sid, token, carry, steps
        self._done = False

    async def alive(self) -> bool:
        raw = await self.store.call(self.store.redis.hget(PREFIX + self.sid, "lk"))
        return raw is not None and raw.decode() == self.token

    async def take(self, carry: Carry) -> bool:
        """Store the step; False when it could not be: the lock had lapsed (another request holds the
        session now) or Redis could not be reached."""
        try:
            ok = await self.store.call(self.store.commit(keys=[PREFIX + self.sid],
                                                         args=[self.token, encode(carry), self.store.ttl_arg]))
        except StoreDown:  # the answer went out but Redis went away: the step is lost, the lock lapses
            ok = 0
        finally:
            self._let_go()
        if not ok:
            self.store.lost += 1
        return bool(ok)

    async def release(self) -> None:
        if self._done:
            return
        try:
            await self.store.call(self.store.release_script(keys=[PREFIX + self.sid], args=[self.token]))
        except StoreDown:
            pass  # the lock lapses by itself
        finally:
            self._let_go()

    def _let_go(self) -> None:
        if not self._done:
            self._done = True
            self.store.local_release(self.sid)


class RedisSessions:
    """Sessions in the Redis at `url` (see the module's docstring). `lock_s`: how long a step may
    hold its session before another request may take it; `wait_s`: how long a request waits for a
    held session before it is answered 503 (longer than `lock_s`, so it outwaits a dead holder);
    `timeout`: seconds a Redis call may take."""

    kind = "redis"

    def __init__(self, url: str, ttl: float | None = None, lock_s: float = 5.0, wait_s: float = 6.0,
                 timeout: float = 0.5) -> None:
        if aioredis is None:
            raise StoreDown("--sessions redis:// needs the redis package: pip install -e '.[serve]'")
        self.url = check_url(url)
        self.name = shown(url)
        self.ttl, self.lock_s, self.wait_s, self.timeout = ttl, lock_s, wait_s, timeout
        self.ttl_arg = int(np.ceil(ttl)) if ttl is not None else 0
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                             retry=Retry(NoBackoff(), 1), health_check_interval=0)
        self.begin_script = self.redis.register_script(_BEGIN)
        self.commit = self.redis.register_script(_COMMIT)
        self.release_script = self.redis.register_script(_RELEASE)
        self.evicted = 0  # Redis evicts by TTL (and its own maxmemory policy), never this process
        self.lost = 0  # answered steps whose lock had lapsed before they were stored
        self._local: dict[str, tuple[asyncio.Lock, int]] = {}

    async def call(self, awaitable: Any) -> Any:
        """One Redis call; StoreDown (one line naming the store) when it cannot be reached in time."""
        try:
            return await asyncio.wait_for(awaitable, 4 * self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise StoreDown(f"session store {self.name} unreachable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no answer'})") from None

    async def create(self, carry: Carry) -> str:
        sid = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(PREFIX + sid, mapping={"c": encode(carry), "n": 0, "u": int(time.time() * 1000), "lk": "", "lu": 0})
        if self.ttl_arg:
            pipe.expire(PREFIX + sid, self.ttl_arg)
        await self.call(pipe.execute())
        return sid

    async def delete(self, sid: str) -> bool:
        return bool(await self.call(self.redis.delete(PREFIX + sid)))

    async def begin(self, sid: str) -> Held | None:
        lock = self._local_lock(sid)
        await lock.acquire()  # this process's requests for one session queue here, not on Redis
        try:
            return await self._hold(sid)
        except BaseException:
            self.local_release(sid)
            raise

    async def _hold(self, sid: str) -> Held | None:
        token, deadline, pause = secrets.token_hex(8), time.monotonic() + self.wait_s, 0.001
        while True:
            res = await self.call(self.begin_script(keys=[PREFIX + sid],
                                                    args=[token, int(self.lock_s * 1000), self.ttl_arg]))
            if res[0] == 0:
                self.local_release(sid)
                return None
            if res[0] == 2:
                return RedisHeld(self, sid, token, decode(res[1]), int(res[2]))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Busy(f"session {sid!r} is held by another request (another replica's step, or one that "
                           f"died holding it: its lock lapses within {self.lock_s:g} s); retry")
            await asyncio.sleep(min(pause, left, res[1] / 1000.0))
            pause = min(pause * 2, 0.05)

    def _local_lock(self, sid: str) -> asyncio.Lock:
        lock, users = self._local.get(sid, (None, 0))
        lock = lock or asyncio.Lock()
        self._local[sid] = (lock, users + 1)
        return lock

    def local_release(self, sid: str) -> None:
        lock, users = self._local[sid]
        lock.release()
        if users <= 1:
            del self._local[sid]
        else:
            self._local[sid] = (lock, users - 1)

    async def peek(self, sid: str) -> tuple[Carry, int] | None:
        c, n = await self.call(self.redis.hmget(PREFIX + sid, "c", "n"))
        return None if c is None else (decode(c), int(n))

    async def count(self) -> int:
        """Keys in the Redis database: the sessions, where the database is wm_jax's own."""
        return int(await self.call(self.redis.dbsize()))

    async def state(self) -> dict[str, Any]:
        out = {"store": self.name, "ttl_s": self.ttl, "lock_s": self.lock_s, "lost_commits": self.lost}
        try:
            await self.call(self.redis.ping())
            out["reachable"] = True
        except StoreDown as e:
            out.update(reachable=False, error=str(e))
        return out

    async def close(self) -> None:
        await self.redis.aclose()
