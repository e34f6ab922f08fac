"""The cost of one session step in Redis: the lock wm_jax uses (wm_jax.serve.redis_sessions: a Lua
script takes the session with a lapsing token and reads its carry, a second stores the new carry
and lets it go) against a compare-and-set on a version (read the carry and its version, then a Lua
script stores the new carry only if the version is unchanged; on a conflict the step is computed
again from the newer carry).

    python benchmarks/session_lock_vs_cas.py                    # 1 and 8 clients, 2,000 steps each level
    python benchmarks/session_lock_vs_cas.py --steps 5000 --json benchmarks/results/session_lock_vs_cas_cpu.json

Each client steps its own session (no contention) and, in a second round, all clients step one
session (contention: the lock queues them, compare-and-set retries the losers). The step's
"compute" is nothing, so the figures are the store's cost alone: wall time per step, steps/s,
and the CPU time per step of redis-server and of the client process. The lock's figure is also
given with the app's third round trip (`Held.alive`, the check that the session was not deleted
while the step ran). Redis: a redis-server on 127.0.0.1 at a free port that this script starts
and stops. The carry is 2 x 256 float32 (2 KiB), the size of a 256-unit LSTM's (c, h).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from serve_latency import cpu_model, cpu_seconds, redis_server

from wm_jax.serve.redis_sessions import PREFIX, RedisSessions, decode, encode

CARRY = (np.zeros(256, np.float32), np.zeros(256, np.float32))
_CAS = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'c', ARGV[2], 'v', tonumber(ARGV[1]) + 1)
redis.call('HINCRBY', KEYS[1], 'n', 1)
return 1
"""


def advance(carry):
    return carry[0] + 1.0, carry[1]


async def lock_step(store: RedisSessions, sid: str, check: bool) -> int:
    held = await store.begin(sid)
    if check:
        await held.alive()
    await held.take(advance(held.carry))
    return 0


async def cas_step(store: RedisSessions, cas, sid: str) -> int:
    """One step by compare-and-set; returns how many conflicts it met (each one a recomputation)."""
    conflicts = 0
    while True:
        raw, version = await store.redis.hmget(PREFIX + sid, "c", "v")
        if await cas(keys=[PREFIX + sid], args=[version, encode(advance(decode(raw)))]):
            return conflicts
        conflicts += 1


async def level(url: str, how: str, clients: int, steps: int, shared: bool, redis_pid: int) -> dict:
    store = RedisSessions(url, ttl=600)
    cas = store.redis.register_script(_CAS)
    sids = [await store.create(CARRY) for _ in range(1 if shared else clients)]
    for sid in sids:
        await store.redis.hset(PREFIX + sid, "v", 0)
    per_client = steps // clients
    conflicts = 0

    async def client(k: int) -> None:
        nonlocal conflicts
        sid = sids[0 if shared else k]
        for _ in range(per_client):
            if how == "cas":
                conflicts += await cas_step(store, cas, sid)
            else:
                await lock_step(store, sid, check=how == "lock+alive")

    r0, c0, t0 = cpu_seconds(redis_pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall, done = time.perf_counter() - t0, per_client * clients
    redis_cpu, client_cpu = cpu_seconds(redis_pid) - r0, time.process_time() - c0
    stored = sum([int((await store.redis.hget(PREFIX + s, "n")) or 0) for s in sids])
    assert stored == done, (how, stored, done)  # every step stored exactly once
    await store.close()
    return {"how": how, "clients": clients, "one_session": shared, "steps": done, "seconds": wall,
            "steps_per_s": done / wall, "wall_ms_per_step": 1e3 * wall / done,
            "redis_cpu_ms_per_step": 1e3 * redis_cpu / done, "client_cpu_ms_per_step": 1e3 * client_cpu / done,
            "conflicts": conflicts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="steps per level, split among the clients")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="wm_jax_bench_lock_") as folder:
        proc, url = redis_server(folder)
        try:
            for shared in (False, True):
                for clients in [int(c) for c in args.clients.split(",")]:
                    if shared and clients == 1:
                        continue
                    for how in ("lock", "lock+alive", "cas"):
                        row = asyncio.run(level(url, how, clients, args.steps, shared, proc.pid))
                        rows.append(row)
                        print(f"{how:10s} clients {clients} {'one session ' if shared else 'own sessions'}  "
                              f"{row['wall_ms_per_step']:.3f} ms/step  {row['steps_per_s']:7.0f} steps/s  "
                              f"redis cpu {row['redis_cpu_ms_per_step']:.3f} ms/step  client cpu "
                              f"{row['client_cpu_ms_per_step']:.3f} ms/step  conflicts {row['conflicts']}",
                              flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    out = {"machine": {"cpu_cores": os.cpu_count(), "cpu": cpu_model()}, "carry_bytes": 2 * 256 * 4,
           "steps_per_level": args.steps, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
