"""Sessions in Redis (wm_jax.serve.redis_sessions) against a real redis-server on 127.0.0.1: the
store's atomic step, its lapse and TTL, the app served from it as from memory, two replicas (app
instances, and two `wm-jax serve` processes) continuing each other's sessions, and a Redis that
dies and comes back."""

from __future__ import annotations

import asyncio
import base64
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
from fastapi.testclient import TestClient
from redis_fixture import RedisProcess, free_port, needs_redis, redis_process, shared_redis  # noqa: F401

from wm_jax import cli, serve
from wm_jax.agent import Agent
from wm_jax.envs.cartpole import PixelCartPole

pytestmark = needs_redis
ROOT = Path(__file__).resolve().parents[1]
BUCKETS = (1, 8)


def b64(obs: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(obs, np.uint8).tobytes()).decode()


def carry(value: float, hidden: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return np.full(hidden, value, np.float32), np.full(hidden, -value, np.float32)


# the store alone


def test_a_carry_round_trips_and_each_take_is_one_step(shared_redis):
    async def main():
        store = serve.RedisSessions(shared_redis.url, ttl=60)
        sid = await store.create(carry(0.5))
        held = await store.begin(sid)
        assert held.steps == 0 and np.array_equal(held.carry[0], carry(0.5)[0]) and await held.alive()
        assert await held.take(carry(1.5))
        (c, h), steps = await store.peek(sid)
        assert steps == 1 and np.array_equal(c, carry(1.5)[0]) and np.array_equal(h, carry(1.5)[1])
        assert await store.begin("nope") is None and await store.peek("nope") is None
        assert await store.delete(sid) and not await store.delete(sid)
        state = await store.state()
        assert state["reachable"] and state["ttl_s"] == 60 and state["store"] == shared_redis.url
        await store.close()

    asyncio.run(main())


def test_concurrent_steps_on_one_session_never_start_from_the_same_carry(shared_redis):
    """Twenty steps raced from two stores (two replicas) and from within each: every step adds one
    to the carry it was given, so the carry ends at 20 only if no two steps began from the same."""
    async def main():
        a, b = serve.RedisSessions(shared_redis.url, ttl=60), serve.RedisSessions(shared_redis.url, ttl=60)
        sid = await a.create(carry(0.0))
        seen = []

        async def step(store):
            held = await store.begin(sid)
            seen.append(held.steps)
            await asyncio.sleep(0.002)  # the step's compute, while the other requests wait
            assert await held.take(carry(float(held.carry[0][0]) + 1.0))

        await asyncio.gather(*(step(a if i % 2 else b) for i in range(20)))
        (c, _), steps = await a.peek(sid)
        assert steps == 20 and c[0] == 20.0 and sorted(seen) == list(range(20))
        await a.close()
        await b.close()

    asyncio.run(main())


def test_a_holder_that_died_loses_the_session_after_lock_s_and_its_late_step_is_refused(shared_redis):
    async def main():
        dead = serve.RedisSessions(shared_redis.url, ttl=60, lock_s=0.3)
        live = serve.RedisSessions(shared_redis.url, ttl=60, lock_s=0.3, wait_s=2.0)
        sid = await dead.create(carry(0.0))
        stuck = await dead.begin(sid)  # never taken in time: a replica that died mid-step
        t0 = time.monotonic()
        held = await live.begin(sid)
        assert 0.2 < time.monotonic() - t0 < 1.5 and held.steps == 0
        assert await held.take(carry(1.0))
        assert not await stuck.take(carry(9.0)) and dead.lost == 1  # its lock lapsed: not stored
        assert (await live.peek(sid))[1] == 1
        holder, impatient = serve.RedisSessions(shared_redis.url, lock_s=5.0), serve.RedisSessions(shared_redis.url,
                                                                                                    wait_s=0.2)
        held = await holder.begin(sid)
        with pytest.raises(serve.Busy, match="retry"):  # 503 in the app: the client retries
            await impatient.begin(sid)
        await held.release()
        assert (await impatient.begin(sid)) is not None
        for s in (dead, live, holder, impatient):
            await s.close()

    asyncio.run(main())


@pytest.mark.slow
def test_idle_sessions_expire_after_the_ttl_in_redis_and_in_memory(shared_redis):
    async def main():
        store, memory = serve.RedisSessions(shared_redis.url, ttl=1), serve.Sessions(8, ttl=1)
        old, fresh = await store.create(carry(0.0)), await store.create(carry(0.0))
        old_m = await memory.create(carry(0.0))
        await asyncio.sleep(0.6)
        await (await store.begin(fresh)).take(carry(1.0))  # a step renews the TTL
        await asyncio.sleep(0.9)
        assert await store.peek(old) is None and await store.peek(fresh) is not None
        assert await memory.peek(old_m) is None and (await memory.state())["expired"] == 1
        await store.close()

    asyncio.run(main())


def test_an_unreachable_redis_is_store_down_in_one_line_within_a_second():
    async def main():
        store = serve.RedisSessions(f"redis://127.0.0.1:{free_port()}/0", ttl=60)
        t0 = time.monotonic()
        for call in (store.create(carry(0.0)), store.begin("x"), store.peek("x"), store.count()):
            with pytest.raises(serve.StoreDown, match=r"session store redis://127\.0\.0\.1:\d+/0 unreachable"):
                await call
        assert time.monotonic() - t0 < 4.0
        state = await store.state()
        assert state["reachable"] is False and "\n" not in state["error"]
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:6379/0", "must be 'memory' or redis://"), ("redis://:6379/0", "needs a host"),
    ("redis://127.0.0.1:99999/0", "port"), ("redis://127.0.0.1:6379/zero", "database must be a number"),
])
def test_bad_store_urls_are_refused_by_the_library_and_the_parser_in_one_line(url, says, capsys):
    with pytest.raises(ValueError, match=says):
        serve.check_url(url)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "RUN", "--sessions", url])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--sessions" in err and err.count("\n") == 1


def test_replicas_need_redis_and_flags_are_checked_with_their_units(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path), "--replicas", "1:2"]) == 2
    assert "--replicas needs --sessions redis://" in capsys.readouterr().err
    for flag, value, says in (("--replicas", "3:2", "1 <= MIN <= MAX"), ("--session-ttl", "0", "s, got 0"),
                              ("--session-ttl", "nan", "in [1")):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "RUN", flag, value])
        assert says in capsys.readouterr().err


# the app on Redis


def client(app) -> TestClient:
    return TestClient(app)


@pytest.fixture(scope="module")
def model(run_with_k):
    return serve.Model(Agent.load(run_with_k), serve.Settings(buckets=BUCKETS))


def episode_frames():
    """A real pixel-CartPole episode driven by the served actions: yields each observation and
    takes the action the caller sends back."""
    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(11))
    for t in range(200):
        action = yield np.asarray(obs)
        obs, state, _, done, *_ = env.step(jax.random.key(100 + t), state, action)
        if bool(done):
            return


@pytest.mark.slow
def test_redis_sessions_act_as_memory_ones_and_continue_on_another_replica(model, shared_redis):
    """One real episode, every step sent to a memory-backed server and to one of two Redis-backed
    servers in turn (two replicas of one store): the same actions, the same step numbers, and at
    the end the same carry."""
    url = shared_redis.url
    with client(serve.create_app(model)) as mem, client(serve.create_app(model, sessions=url)) as a, \
            client(serve.create_app(model, sessions=url)) as b:
        sm, sr = mem.post("/v1/sessions").json()["id"], a.post("/v1/sessions").json()["id"]
        frames, t = episode_frames(), 0
        obs = next(frames)
        try:
            while True:
                body = {"observation": b64(obs)}
                rm = mem.post(f"/v1/sessions/{sm}/act", json=body).json()
                rr = (a if t % 2 else b).post(f"/v1/sessions/{sr}/act", json=body).json()
                assert rr == rm, t
                t += 1
                obs = frames.send(rm["action"])
        except StopIteration:
            pass
        assert t > 5
        (c, h), steps = asyncio.run(serve.RedisSessions(url).peek(sr))
        session = mem.app.app.state.serve["sessions"].get(sm)
        assert steps == t == session.steps
        np.testing.assert_array_equal(c, session.carry[0])
        np.testing.assert_array_equal(h, session.carry[1])
        assert a.get("/health").json()["session_store"]["reachable"]


@pytest.mark.slow
def test_two_concurrent_acts_on_one_session_from_two_replicas_advance_it_exactly_twice(model, shared_redis):
    url = shared_redis.url
    frames = [next(episode_frames())] * 2
    with client(serve.create_app(model, sessions=url)) as a, client(serve.create_app(model, sessions=url)) as b:
        for _ in range(3):
            sid = a.post("/v1/sessions").json()["id"]
            out: dict[str, object] = {}
            threads = [threading.Thread(target=lambda c=c, k=k: out.update({k: c.post(
                f"/v1/sessions/{sid}/act", json={"observation": b64(frames[0])})})) for k, c in (("a", a), ("b", b))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            assert {r.status_code for r in out.values()} == {200}
            assert sorted(r.json()["step"] for r in out.values()) == [0, 1]
            c1 = model.act([model.initial_carry()], [frames[0]])[0]["carry"]
            c2 = model.act([c1], [frames[0]])[0]["carry"]
            (c, h), steps = asyncio.run(serve.RedisSessions(url).peek(sid))
            assert steps == 2
            np.testing.assert_allclose(c, c2[0], atol=1e-6)
            np.testing.assert_allclose(h, c2[1], atol=1e-6)


@pytest.mark.slow
def test_bad_input_is_still_422_413_404_with_sessions_in_redis(model, shared_redis):
    with client(serve.create_app(model, sessions=shared_redis.url, session_ttl=3600)) as c:
        sid = c.post("/v1/sessions").json()["id"]
        assert c.post(f"/v1/sessions/{sid}/act", json={"observation": "!!"}).status_code == 422
        assert c.post(f"/v1/sessions/{sid}/act", json={}).status_code == 422
        assert c.post(f"/v1/sessions/{sid}/act", content=b"x" * (2 << 20),
                      headers={"content-type": "application/json"}).status_code == 413
        r = c.post("/v1/sessions/nope/act", json={"observation": b64(np.zeros((64, 64, 4), np.uint8))})
        assert r.status_code == 404 and "expired after 3600 s idle" in r.json()["detail"]
        assert c.post("/v1/dream", json={"observation": b64(np.zeros((64, 64, 4), np.uint8)),
                                         "session": "nope"}).status_code == 404
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204 and c.delete(f"/v1/sessions/{sid}").status_code == 404


def load(c: TestClient, sids: list[str], obs: str, seconds: float, statuses: list[int]) -> None:
    """Bounded load: /act on each session in turn for `seconds`, statuses recorded."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t0 = time.monotonic()
        r = c.post(f"/v1/sessions/{sids[i % len(sids)]}/act", json={"observation": obs})
        # bounded: a store that is down answers at once; a step held when Redis died stays held
        # (its lock is in the append-only file) until it lapses, lock_s = 5 s
        assert time.monotonic() - t0 < 8.0, "a request hung on a dead store"
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert "unreachable" in r.json()["detail"] and "\n" not in r.json()["detail"]
        i += 1


@pytest.mark.slow
def test_a_redis_that_dies_under_load_gives_503_and_a_restart_keeps_every_session(model, redis_process):
    obs = b64(next(episode_frames()))
    with client(serve.create_app(model, sessions=redis_process.url)) as c:
        sids = [c.post("/v1/sessions").json()["id"] for _ in range(3)]
        for s in sids:
            assert c.post(f"/v1/sessions/{s}/act", json={"observation": obs}).json()["step"] == 0
        before = [asyncio.run(serve.RedisSessions(redis_process.url).peek(s)) for s in sids]
        statuses: list[int] = []
        loader = threading.Thread(target=load, args=(c, sids, obs, 3.0, statuses))
        loader.start()
        time.sleep(0.5)
        redis_process.kill()
        time.sleep(1.0)
        down = c.get("/health").json()
        assert down["status"] == "unavailable" and down["session_store"]["reachable"] is False
        r = c.post("/v1/sessions")
        assert r.status_code == 503 and redis_process.url in r.json()["detail"]
        redis_process.start()  # the same port and folder: the append-only file is read back
        loader.join(30)
        assert set(statuses) <= {200, 503} and 503 in statuses and statuses[-1] == 200, statuses
        assert c.get("/health").json()["status"] == "ok"
        # every answered step is stored, but for one whose answer went out just as Redis died
        lost = c.app.app.state.serve["sessions"].lost
        after = [asyncio.run(serve.RedisSessions(redis_process.url).peek(s)) for s in sids]
        assert all(a is not None for a in after) and lost <= 1
        assert sum(a[1] for a in after) == sum(b[1] for b in before) + statuses.count(200) - lost


@pytest.mark.slow
def test_two_wm_jax_serve_processes_sharing_redis_continue_each_others_sessions(run_with_k, model, shared_redis,
                                                                                tmp_path):
    import httpx

    ports = [free_port(), free_port()]
    procs, logs = [], []
    try:
        for i, port in enumerate(ports):
            logs.append((tmp_path / f"server{i}.log").open("w+"))
            procs.append(subprocess.Popen([sys.executable, "-m", "wm_jax.cli", "serve", str(run_with_k), "--port",
                                           str(port), "--sessions", shared_redis.url, "--session-ttl", "60"],
                                          cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
        for proc, port, i in zip(procs, ports, range(2)):
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, (tmp_path / f"server{i}.log").read_text()[-2000:]
                assert time.monotonic() < deadline
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).json()
                    break
                except httpx.HTTPError:
                    time.sleep(0.3)
            assert health["session_ttl_s"] == 60 and health["session_store"]["store"] == shared_redis.url
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        sid = httpx.post(f"{bases[0]}/v1/sessions").json()["id"]
        c = model.initial_carry()
        frames, t = episode_frames(), 0
        obs = next(frames)
        try:
            while t < 40:
                r = httpx.post(f"{bases[t % 2]}/v1/sessions/{sid}/act", json={"observation": b64(obs)}, timeout=30)
                row = model.act([c], [obs])[0]
                assert r.status_code == 200 and r.json()["step"] == t and r.json()["action"] == int(row["action"])
                c, t = row["carry"], t + 1
                obs = frames.send(r.json()["action"])
        except StopIteration:
            pass
        assert t > 5
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
