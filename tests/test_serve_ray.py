"""Ray Serve replicas (`wm-jax serve RUN --sessions redis://... --replicas 2:2`), run for real: a
local Ray on 127.0.0.1 started by the command, one redis-server. One replica's process is killed
under load: every session continues on the other replica with the actions the agent gives in
this process, requests in flight get at most a retryable 503, Ray Serve replaces the replica; then
SIGTERM stops the command with exit 0 and none of the processes it started left running. And
1:2 replicas scale up under load and back down after it, the sessions kept."""

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
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:  # ended meanwhile
            pass


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
              f"were not 200 ({[(a[0], a[3]) for a in failed][:3]}); replaced "
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


SCALER = """
import os, signal, sys, threading
from wm_jax.serve import scale
from wm_jax.serve.model import Settings
run, url, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = threading.Event()
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: done.set())
try:
    scale.start(run, Settings(buckets=(1, 8)), url, 600.0, (1, 2), port=port, cache=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                target=2.0, upscale_s=1.0, downscale_s=5.0)
    print("ready", flush=True)
    while not done.wait(0.5):
        pass
finally:
    scale.stop()
"""


def hammer(base: str, sid: str, frame: np.ndarray, stop_at: threading.Event, codes: list, seconds: float) -> None:
    """/act on one session until `stop_at` is set or `seconds` pass: every answer's status in `codes`."""
    body = {"observation": base64.b64encode(frame.tobytes()).decode()}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30.0) as c:
        while not stop_at.is_set() and time.monotonic() < deadline:
            try:
                codes.append(c.post(f"/v1/sessions/{sid}/act", json=body).status_code)
            except httpx.HTTPError as e:
                codes.append(type(e).__name__)


def test_replicas_scale_from_one_to_two_under_load_and_back_keeping_the_sessions(run_with_k, shared_redis, tmp_path):
    """--replicas 1:2 (through scale.start, with short autoscaling delays): 8 clients keep more
    requests in flight than the target of 2 per replica, so Ray Serve adds the second replica; when
    they stop it goes back to one after the downscale delay, and a session continues where it was."""
    port, log_path = free_port(), tmp_path / "scale.log"
    base = f"http://127.0.0.1:{port}"
    log = log_path.open("w+")
    proc = subprocess.Popen([sys.executable, "-c", SCALER, str(run_with_k), shared_redis.url, str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, base, log_path)
        first = replica_pids(base)
        assert len(first) == 1, first
        sids = [httpx.post(f"{base}/v1/sessions", timeout=10).json()["id"] for _ in range(8)]
        frame = observations(1)[0]
        stop_load, codes = threading.Event(), []
        threads = [threading.Thread(target=hammer, args=(base, s, frame, stop_load, codes, 240.0)) for s in sids]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        try:
            while len(replica_pids(base, 20)) < 2:
                assert time.monotonic() - t0 < 200, "Ray Serve did not add a replica under load"
                time.sleep(1.0)
            up_s = time.monotonic() - t0
        finally:
            stop_load.set()
            for th in threads:
                th.join(60)
        assert codes and all(c == 200 for c in codes), sorted(set(map(str, codes)))
        body = {"observation": base64.b64encode(frame.tobytes()).decode()}
        before = httpx.post(f"{base}/v1/sessions/{sids[0]}/act", json=body, timeout=30).json()
        t1 = time.monotonic()
        agree = 0  # three rounds of 40 probes in a row see one replica: the proxy has no second to spread to
        while agree < 3:
            agree = agree + 1 if len(replica_pids(base, 40)) == 1 else 0
            assert time.monotonic() - t1 < 180, "Ray Serve did not go back to one replica"
            time.sleep(1.0)
        down_s = time.monotonic() - t1
        after = httpx.post(f"{base}/v1/sessions/{sids[0]}/act", json=body, timeout=30).json()
        assert after["step"] == before["step"] + 1, (before, after)  # the session's next step, on the replica left
        print(f"1 -> 2 replicas {up_s:.1f} s after the load began; back to 1 {down_s:.1f} s after it ended; "
              f"{len(codes)} requests, all 200")
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()[-3000:]
        time.sleep(1.0)
        assert not [p for p in started if running(p)], "processes left running after SIGTERM"
    finally:
        stop(proc)
        log.close()
