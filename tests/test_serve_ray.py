"""Ray Serve replicas (`wm-jax serve RUN --sessions redis://... --replicas 2:2`), run for real: a
local Ray on 127.0.0.1 started by the command, one redis-server. One replica's process is killed
under load: every session continues on the other replica with the actions the agent gives in
this process, requests in flight get at most a retryable 503, Ray Serve replaces the replica; then
SIGTERM stops the command with exit 0 and none of the processes it started left running."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("redis")
pytest.importorskip("ray.serve", reason="the scale extra (ray[serve]) is not installed: pip install -e '.[scale]'")
import httpx
from redis_fixture import free_port, needs_redis, shared_redis  # noqa: F401

from wm_jax import serve
from wm_jax.agent import Agent
from wm_jax.envs.cartpole import PixelCartPole
from wm_jax.serve.scale import descendants, running

pytestmark = [needs_redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SESSIONS, STEPS = 4, 60
PROXY_500 = "Internal Server Error"  # Ray Serve's proxy, text/plain


def observations(n: int) -> list[np.ndarray]:
    """n real pixel-CartPole frame stacks under a fixed action pattern (resetting at episode ends)."""
    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(3))
    out = []
    for t in range(n):
        out.append(np.asarray(obs, np.uint8))
        obs, state, _, done, *_ = env.step(jax.random.key(50 + t), state, t % 3 % 2)
        if bool(done):
            obs, state = env.reset(jax.random.key(500 + t))
    return out


def replica_pids(base: str, tries: int = 40) -> set[int]:
    """The replica PIDs that answered `tries` /health requests (Ray's proxy spreads them)."""
    seen = set()
    for _ in range(tries):
        try:
            seen.add(httpx.get(f"{base}/health", timeout=5.0).json()["replica"]["pid"])
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.1)
    return seen


def drive(base: str, sid: str, frames: list[np.ndarray], out: dict) -> None:
    """STEPS /act on one session, each retried on 503 (at most 40 times, 0.25 s apart): the
    (status, step, action) of every answer, in order. Bounded: 30 s per request."""
    answers = out.setdefault(sid, [])
    with httpx.Client(base_url=base, timeout=30.0) as c:
        for t in range(STEPS):
            body = {"observation": base64.b64encode(frames[t].tobytes()).decode()}
            for _ in range(40):
                try:
                    r = c.post(f"/v1/sessions/{sid}/act", json=body)
                    got = r.json() if r.headers.get("content-type") == "application/json" else {"detail": r.text}
                    answers.append((r.status_code, got.get("step"), got.get("action"), got.get("detail")))
                except httpx.HTTPError as e:  # a dropped connection: recorded, retried like a 503
                    answers.append((type(e).__name__, None, None, str(e)))
                    r = None
                if r is not None and r.status_code != 503 and r.status_code < 500:
                    break
                time.sleep(0.25)


def start_server(run: Path, url: str, port: int, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wm_jax.cli", "serve", str(run), "--port", str(port),
                             "--sessions", url, "--replicas", "2:2", "--session-ttl", "600"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the Ray server did not answer /health in time"
        try:
            if httpx.get(f"{base}/health", timeout=2.0).json()["status"] == "ok":
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """After a failure: SIGTERM (the command stops Ray), then SIGKILL for whatever it started that is left."""
    if proc.poll() is not None:
        return
    started = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    for p in filter(running, started):
        os.kill(p, signal.SIGKILL)


def test_a_killed_replica_costs_no_session_and_sigterm_stops_everything(run_with_k, shared_redis, tmp_path):
    model = serve.Model(Agent.load(run_with_k), serve.Settings(buckets=(1, 8)))
    frames = observations(STEPS)
    want = []
    carry = model.initial_carry()
    for obs in frames:  # the actions one process gives, step by step, for these observations
        row = model.act([carry], [obs])[0]
        want.append(int(row["action"]))
        carry = row["carry"]
    port, log_path = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    log = log_path.open("w+")
    proc = start_server(run_with_k, shared_redis.url, port, log)
    try:
        wait_ready(proc, base, log_path)
        pids = replica_pids(base)
        assert len(pids) == 2, pids
        assert all(p in descendants(proc.pid) for p in pids)  # the command's own replicas
        sids = [httpx.post(f"{base}/v1/sessions", timeout=10).json()["id"] for _ in range(SESSIONS)]
        out: dict[str, list] = {}
        threads = [threading.Thread(target=drive, args=(base, s, frames, out)) for s in sids]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 60
        while sum(len(a) for a in out.values()) < SESSIONS * STEPS // 4:  # a quarter done: mid-load
            assert time.monotonic() < deadline and all(th.is_alive() for th in threads), out
            time.sleep(0.02)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        killed_at, done_at_kill = time.monotonic(), sum(len(a) for a in out.values())
        for th in threads:
            th.join(240)
        assert not any(th.is_alive() for th in threads)
        failed = [a for s in sids for a in out[s] if a[0] != 200]
        # a retryable 503, or Ray Serve's proxy's own 500 for a request whose replica died under it
        # (ray/serve/_private/http_util.py answers RayActorError so, in ray 2.60): at most one per
        # client, the request it had in flight at the kill
        assert all(a[0] == 503 or a[:4] == (500, None, None, PROXY_500) for a in failed), failed
        assert sum(a[0] == 500 for a in failed) <= SESSIONS, failed
        for s in sids:
            ok = [a for a in out[s] if a[0] == 200]
            assert [a[1] for a in ok] == list(range(STEPS)), out[s]  # every step once, none lost
            assert [a[2] for a in ok] == want, (s, out[s])  # the actions one process gives
        deadline = time.monotonic() + 180
        while not (replica_pids(base, 20) - pids):  # Ray Serve started a replacement
            assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica"
            time.sleep(1.0)
        print(f"killed replica {victim} after {done_at_kill} of {SESSIONS * STEPS} steps; {len(failed)} answers "
              f"were 503 ({[a[3] for a in failed][:3]}); replaced "
              f"{time.monotonic() - killed_at:.1f} s after the kill")
        started_pids = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert "wm-jax serve: stopped" in log_path.read_text()
        time.sleep(1.0)
        assert not [p for p in started_pids if running(p)], "processes left running after SIGTERM"
    finally:
        stop(proc)
        log.close()

