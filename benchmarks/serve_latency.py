"""/act latency of the real server: `wm-jax serve` in a subprocess on 127.0.0.1, driven by httpx.

    python benchmarks/serve_latency.py RUN_DIR                       # float32 and INT8, concurrency 1, 8, 64
    python benchmarks/serve_latency.py RUN_DIR --requests 200 --concurrency 1,8 --precisions int8
    python benchmarks/serve_latency.py RUN_DIR --quick               # a few requests (CI, the tests)
    python benchmarks/serve_latency.py RUN_DIR --precisions float32 --sessions memory,redis --replicas 1:2

--sessions lists the session stores to measure, one server each: memory (the default), redis (a
redis-server this script starts on 127.0.0.1 at a free port, in a temporary folder, and stops) or a
redis:// URL. --replicas MIN:MAX adds one more server, Ray Serve replicas on Redis (`wm-jax serve
--replicas`); its rows report how many replicas answered /health during the level, when the
second one first did, and each replica's resident memory; the result, the scale-up: from Ray Serve's
decision to add a replica (its controller's log under /tmp/ray) to that replica's first answer. Server CPU is the whole process tree's
(Ray's workers included) plus redis-server's.

For each precision it starts the server (`--gate observe` by default: every /act dreams the
verifier's look-ahead; a run without K serves with the gate off, and the table says so), waits for
/health, then for each concurrency C runs C clients, each with its own session, each sending /act
with real pixel-CartPole frame stacks (base64) back to back. A level stops after --requests
requests or --seconds, whichever comes first; warm-up requests are not timed. It prints p50 / p95
/ p99 latency (client side, the whole HTTP round trip), requests/s, the mean batch the server ran
(from /metrics), the CPU time the server and the clients spent per request, and the server's
resident memory (VmRSS, and its peak VmHWM), then stops the
server. The clients run on the same machine as the server and share its cores.
With --episodes N it also plays N real pixel-CartPole episodes through /act (one client, one
session per episode, up to 500 steps each) and reports their return: the agent served over HTTP,
scored in the real environment.
Results: benchmarks/results/serve_latency_<platform>.json (--json to write elsewhere; --quick
writes only where --json says).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frames(n: int) -> list[str]:
    """n real observations (uint8 [64, 64, 4], base64) of pixel CartPole under a random policy."""
    import jax

    from wm_jax.envs.cartpole import PixelCartPole

    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(7))
    out = []
    for t in range(n):
        out.append(base64.b64encode(np.asarray(obs, np.uint8).tobytes()).decode())
        obs, state, _, done, *_ = env.step(jax.random.key(t), state, t % 3 % 2)
        if bool(done):
            obs, state = env.reset(jax.random.key(1000 + t))
    return out


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key.lower()] = float(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes `pids` and all their live descendants (a Ray
    cluster started by the server: its raylet, workers and replicas)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    seen, todo, total = set(), list(pids), 0.0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu_seconds(pid) if not np.isnan(cpu_seconds(pid)) else 0.0
        todo += children.get(pid, [])
    return total


def batch_counts(text: str) -> tuple[float, float]:
    vals = {}
    for line in text.splitlines():
        if line.startswith(("wm_jax_act_batches_total", "wm_jax_act_batched_requests_total")):
            name, value = line.split()
            vals[name] = float(value)
    return vals.get("wm_jax_act_batches_total", 0.0), vals.get("wm_jax_act_batched_requests_total", 0.0)


async def replicas_seen(client, seen: dict[int, float], t0: float, stop: asyncio.Event) -> None:
    """Poll /health every 0.2 s: which replica (pid) answered, first seen when (s after t0)."""
    while not stop.is_set():
        try:
            pid = (await client.get("/health")).json()["replica"]["pid"]
            seen.setdefault(pid, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - a replica going away: the next poll tells
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass


async def level(base: str, concurrency: int, requests: int, seconds: float, obs: list[str], warmup: int,
                pids: list[int]) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60.0) as client:
        sessions = [(await client.post("/v1/sessions")).json()["id"] for _ in range(concurrency)]
        for i in range(warmup):
            await client.post(f"/v1/sessions/{sessions[i % concurrency]}/act", json={"observation": obs[i % len(obs)]})
        b0, r0 = batch_counts((await client.get("/metrics")).text)
        latencies: list[float] = []
        errors = 0
        counter = iter(range(requests))
        deadline = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal errors
            for step, _ in enumerate(counter):
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                r = await client.post(f"/v1/sessions/{sessions[k]}/act", json={"observation": obs[(k + step) % len(obs)]})
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        started_at = time.time()
        t0, server0, client0 = time.perf_counter(), tree_cpu_seconds(pids), time.process_time()
        seen: dict[int, float] = {}
        stop = asyncio.Event()
        watch = asyncio.ensure_future(replicas_seen(client, seen, t0, stop))
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        await watch
        server_cpu, client_cpu = tree_cpu_seconds(pids) - server0, time.process_time() - client0
        replica_memory = {str(pid): memory_mb(pid) for pid in seen}  # the replicas' own (VmRSS, VmHWM)
        b1, r1 = batch_counts((await client.get("/metrics")).text)
        for s in sessions:
            await client.delete(f"/v1/sessions/{s}")
    lat = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "requests": int(lat.size), "errors": int(errors), "seconds": wall,
            "requests_per_s": lat.size / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            # /metrics is one replica's: with two answering, the two reads may come from different ones
            "mean_batch": (r1 - r0) / max(b1 - b0, 1.0) if len(seen) <= 1 else None,
            "server_cpu_ms_per_request": 1e3 * server_cpu / max(lat.size, 1),
            "client_cpu_ms_per_request": 1e3 * client_cpu / max(lat.size, 1),
            "replicas_answering": len(seen), "second_replica_at_s": sorted(seen.values())[1] if len(seen) > 1 else None,
            "started_at": started_at, "replica_memory_mb": replica_memory,
            "replicas_first_answered_at": {str(pid): started_at + at for pid, at in seen.items()}}


def upscales(since: float, ray_tmp: str = "/tmp/ray") -> list[float]:
    """When Ray Serve's controller decided to add a replica (its log's "Upscaling ... from N to M"
    lines, as Unix times) in the Ray sessions started after `since`."""
    out = []
    for log in Path(ray_tmp).glob("session_*/logs/serve/controller_*.log"):
        if log.stat().st_mtime < since:
            continue
        for line in log.read_text(errors="replace").splitlines():
            if "Upscaling" in line:
                stamp = " ".join(line.split()[1:3])  # INFO 2026-12-07 06:12:02,820 controller ...
                day, ms = stamp.split(",")
                out.append(time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000.0)
    return sorted(t for t in out if t >= since)


def play(base: str, episodes: int, seed: int = 0) -> dict:
    """`episodes` real episodes of the served agent: every action comes from POST /act."""
    import httpx
    import jax

    from wm_jax.envs.cartpole import PixelCartPole

    env = PixelCartPole()
    params = env.default_params
    reset = jax.jit(lambda k: env.reset(k, params))
    step = jax.jit(lambda k, s, a: env.step(k, s, a, params))
    returns = []
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60.0) as client:
        for e in range(episodes):
            key = jax.random.fold_in(jax.random.key(seed), e)
            obs, state = reset(key)
            sid = client.post("/v1/sessions").json()["id"]
            total = 0.0
            for t in range(500):
                body = {"observation": base64.b64encode(np.asarray(obs, np.uint8).tobytes()).decode()}
                action = client.post(f"/v1/sessions/{sid}/act", json=body).json()["action"]
                obs, state, reward, done, *_ = step(jax.random.fold_in(key, t + 1), state, action)
                total += float(reward)
                if bool(done):
                    break
            client.delete(f"/v1/sessions/{sid}")
            returns.append(total)
    r = np.asarray(returns)
    return {"episodes": episodes, "return_mean": float(r.mean()), "return_std": float(r.std()),
            "return_min": float(r.min()), "steps": int(r.sum()), "seconds": time.perf_counter() - t0}


def redis_server(folder: str) -> tuple[subprocess.Popen, str]:
    """A redis-server on 127.0.0.1 at a free port keeping nothing on disk, and its URL, once it answers."""
    import shutil

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("--sessions redis needs redis-server (apt-get install redis-server), or give a redis:// URL")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def serve_and_measure(run: str, precision: str, args: argparse.Namespace, obs: list[str], sessions: str = "memory",
                      replicas: str | None = None, store_pid: int | None = None) -> dict:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "wm_jax.cli", "serve", run, "--port", str(port), "--gate", args.gate,
           "--sessions", sessions]
    if replicas:
        cmd += ["--replicas", replicas]
    if precision == "int8":
        cmd.append("--int8")
    log = tempfile.TemporaryFile("w+")  # the server's output: a file, so a full pipe can never block it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    started_at = time.time()
    try:
        t0 = time.perf_counter()
        health = None
        while time.perf_counter() - t0 < args.start_timeout:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited ({proc.returncode}): {log.read().strip()[-2000:]}")
            try:
                health = httpx.get(f"{base}/health", timeout=1.0).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        if health is None:
            raise RuntimeError(f"the server did not answer /health within {args.start_timeout} s")
        start_s = time.perf_counter() - t0
        name = ("ray " + replicas) if replicas else ("memory" if sessions == "memory" else "redis")
        rows = []
        for c in args.concurrency:
            pids = [proc.pid] + ([store_pid] if store_pid else [])
            row = asyncio.run(level(base, c, args.requests, args.seconds, obs, args.warmup, pids))
            row.update(precision=precision, gate=health["gate"], **memory_mb(proc.pid))
            rows.append(row)
            print(f"{precision:8s} {name:14s} c={c:3d}  n={row['requests']:5d}  p50 {row['p50_ms']:7.2f} ms  "
                  f"p95 {row['p95_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  {row['requests_per_s']:7.1f} req/s  "
                  f"batch {row['mean_batch'] or float('nan'):5.2f}  cpu/req server {row['server_cpu_ms_per_request']:.2f} ms, "
                  f"client {row['client_cpu_ms_per_request']:.2f} ms  rss {row.get('vmrss', float('nan')):6.0f} MB  "
                  f"errors {row['errors']}  replicas {row['replicas_answering']}"
                  + (f" (2nd at {row['second_replica_at_s']:.1f} s)" if row["second_replica_at_s"] else ""), flush=True)
        health.pop("source", None)  # a local path
        out = {"precision": precision, "sessions": "memory" if sessions == "memory" else "redis",
               "replicas": replicas, "start_s": start_s, "health": health, "levels": rows,
               "started_at": started_at}
        if args.episodes:
            out["episodes"] = play(base, args.episodes)
            e = out["episodes"]
            print(f"{precision:8s} {e['episodes']} real episodes through /act: return {e['return_mean']:.1f} +- "
                  f"{e['return_std']:.1f} (min {e['return_min']:.0f}), {e['steps']:,} steps in {e['seconds']:.0f} s",
                  flush=True)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def scale_up(result: dict) -> dict:
    """The Ray rows' scale-up: from the controller's decision to add a replica (its log) to the first
    /health answered by a replica that had not answered before, over all the levels."""
    decided = upscales(result["started_at"])
    first: dict[str, float] = {}
    for row in result["levels"]:
        for pid, at in row["replicas_first_answered_at"].items():
            first[pid] = min(first.get(pid, at), at)
    result["upscales_at"] = decided
    times = sorted(first.values())
    if len(times) > 1 and [t for t in decided if t <= times[1]]:
        when = [t for t in decided if t <= times[1]][-1]
        result["scale_up"] = {"decided_at": when, "first_answer_at": times[1], "seconds": times[1] - when}
        print(f"Ray Serve decided to add a replica at {time.strftime('%H:%M:%S', time.localtime(when))}; it first "
              f"answered {times[1] - when:.1f} s later", flush=True)
    return result


def cpu_model() -> dict:
    """The CPU's model name and whether it has AVX-512 (/proc/cpuinfo; empty where it is not Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"model": name, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a `wm-jax run` directory or exported agent folder")
    p.add_argument("--precisions", default="float32,int8")
    p.add_argument("--concurrency", default="1,8,64", help="client counts ('' for none: --episodes only)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per level, at most")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per level, at most")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--gate", choices=("off", "observe", "enforce"), default="observe")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--episodes", type=int, default=0, help="also play this many real episodes through /act")
    p.add_argument("--quick", action="store_true", help="20 requests per level at concurrency 1 and 4")
    p.add_argument("--sessions", default="memory", help="session stores, one server each: memory, redis (started "
                                                        "here) or a redis:// URL, comma-separated")
    p.add_argument("--replicas", default=None, metavar="MIN:MAX", help="also Ray Serve replicas on Redis")
    p.add_argument("--json", default=None, help="where to write the results")
    args = p.parse_args()
    if args.quick:
        args.requests, args.warmup, args.concurrency = 20, 4, "1,4"
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    obs = frames(64)
    results = []
    with tempfile.TemporaryDirectory(prefix="wm_jax_bench_redis_") as folder:
        redis, url = None, None
        try:
            stores = [s for s in args.sessions.split(",") if s]
            if "redis" in stores or args.replicas:
                redis, url = redis_server(folder)
            for prec in args.precisions.split(","):
                for store in stores:
                    where = url if store == "redis" else store
                    results.append(serve_and_measure(args.run, prec, args, obs, where,
                                                     store_pid=redis.pid if store == "redis" else None))
                if args.replicas:
                    results.append(scale_up(serve_and_measure(args.run, prec, args, obs, url, args.replicas,
                                                              redis.pid)))
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait(10)
    import jax

    out = {"machine": {"platform": jax.devices()[0].platform, "cpu_cores": os.cpu_count(),
                       "machine": platform.machine(), "processor": platform.processor(), "cpu": cpu_model(),
                       "jax": jax.__version__, "python": platform.python_version()},
           "run": f"{results[0]['health']['preset']} preset, seed {results[0]['health']['seed']}", "gate": args.gate, "requests_per_level": args.requests, "results": results}
    path = Path(args.json or Path(__file__).parent / "results" / f"serve_latency_{jax.devices()[0].platform}.json")
    if not args.quick or args.json:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
