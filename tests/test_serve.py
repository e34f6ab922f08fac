"""INT8 V + M (wm_jax.models.quant) and the HTTP server (wm_jax.serve), on the session's smoke run with a
verifier added by `train-verifier`. Every app runs inside `TestClient(...)` used as a context
manager, so its lifespan (load, warm-up, the batcher) runs as under uvicorn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("qwix")
from fastapi.testclient import TestClient
from redis_fixture import free_port

from wm_jax import cli, run_dir, serve, stages
from wm_jax.models import quant, transition, vae
from wm_jax.search import rollout
from wm_jax.agent import Agent
from wm_jax.store.collection import TooLarge
from wm_jax.envs.cartpole import PixelCartPole

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = (1, 8)  # fewer programs to compile than the server's default


def _frames(n: int, seed: int = 3) -> list[np.ndarray]:
    env = PixelCartPole()
    obs, state = env.reset(jax.random.key(seed))
    out = []
    for t in range(n):
        out.append(np.asarray(obs))
        obs, state, *_ = env.step(jax.random.key(t), state, t % 2)
    return out


def _b64(obs: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(obs, np.uint8).tobytes()).decode()


def _client(path: Path, **settings) -> TestClient:
    return TestClient(serve.create_app(path, serve.Settings(buckets=BUCKETS, **settings)))


# INT8


def test_a_qwix_that_cannot_import_flax_nnx_is_one_named_error(monkeypatch):
    """Seen with jax 0.11.2 and flax 0.12.8: importing qwix imports flax.nnx, which raises AttributeError
    (jax 0.11 has no jax.experimental.hijax.HiPrimitive). INT8 says so in one line naming both versions."""
    import importlib.abc
    import sys

    import flax

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "qwix":
                raise AttributeError("module 'jax.experimental.hijax' has no attribute 'HiPrimitive'")
            return None

    monkeypatch.delitem(sys.modules, "qwix", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ImportError, match=f"flax {flax.__version__} does not run on jax {jax.__version__}"):
        quant.ptq_model(object(), ("encode",))  # fails at the import, before the model is looked at


def test_per_channel_int8_round_trip_is_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (40, 6)) * jnp.arange(1, 7)
    t = quant.per_channel(w)
    assert t.q.dtype == jnp.int8 and t.scale.shape == (1, 6)
    assert float(jnp.max(jnp.abs(quant.dequantize(t) - w) / t.scale)) <= 0.5 + 1e-5
    x = jax.random.normal(jax.random.key(1), (3, 40))
    exact = x @ w
    approx = quant.matmul(x, t.q, t.scale[0])
    assert float(jnp.max(jnp.abs(approx - exact))) < 0.05 * float(jnp.max(jnp.abs(exact)))


@pytest.mark.slow
def test_int8_v_and_m_stay_close_to_float_and_are_a_quarter_of_the_size(smoke_run, tmp_path):
    cfg, params = run_dir.load_agent(smoke_run[0])
    v8, m8 = vae.quantize(cfg.vae, params["vae"]), transition.quantize(cfg.transition, params["transition"])
    obs = jnp.asarray(np.stack(_frames(4)))
    mean, _ = vae.encode(cfg.vae, params["vae"], obs)
    mean8, _ = vae.encode(cfg.vae, v8, obs)
    assert mean8.shape == mean.shape
    assert float(jnp.max(jnp.abs(mean8 - mean))) < 0.1 * float(jnp.max(jnp.abs(mean))) + 1e-3
    frames, frames8 = vae.decode(cfg.vae, params["vae"], mean), vae.decode(cfg.vae, v8, mean)
    assert float(jnp.max(jnp.abs(frames8 - frames))) < 0.05
    carry = transition.initial_carry(cfg.transition, 4)
    a = jnp.array([0, 1, 0, 1])
    (_, h), pred = transition.step(cfg.transition, params["transition"], carry, mean, a)
    (_, h8), pred8 = transition.step(cfg.transition, m8, carry, mean, a)
    assert m8.w.dtype == jnp.int8 and m8.head_w.dtype == jnp.int8
    assert float(jnp.max(jnp.abs(h8 - h))) < 0.02
    assert float(jnp.max(jnp.abs(pred8.reward - pred.reward))) < 0.05
    floats = {"vae": params["vae"], "transition": params["transition"]}
    ints = {"vae": v8, "transition": m8}
    assert quant.nbytes(ints) < 0.35 * quant.nbytes(floats)
    assert quant.save(tmp_path / "int8.safetensors", ints) < 0.4 * quant.save(tmp_path / "f32.safetensors", floats)
    # the INT8 model acts in the real environment through the same rollout as the float one
    ev = rollout.evaluate(cfg, {**params, "vae": v8, "transition": m8}, jax.random.key(0), 2)
    assert np.isfinite(ev["return_mean"]) and ev["episodes"] == 2


# the verifier added to a finished run


def test_train_verifier_adds_k_that_the_agent_loads(run_with_k, smoke_run, capsys):
    assert Agent.load(smoke_run[0]).verifier is None
    assert Agent.load(run_with_k).verifier is not None
    assert json.loads((run_with_k / run_dir.ADDED_VERIFIER / "done.json").read_text())["steps"] == 60


# the server


@pytest.fixture(scope="module")
def client(run_with_k):
    with _client(run_with_k, max_sessions=4) as c:
        yield c


def test_a_source_checkout_without_installed_metadata_serves_and_reports_its_version(run_with_k, monkeypatch):
    """wm_jax run from a checkout on PYTHONPATH, not pip-installed: no distribution metadata. The
    server must still start (FastAPI refuses an empty version) and report the package's own version."""
    from importlib import metadata

    import wm_jax

    real = metadata.version

    def version(name):
        if name.replace("-", "_") == "wm_jax":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    assert stages.versions()["wm_jax"] == wm_jax.__version__
    with _client(run_with_k) as c:
        assert c.get("/health").json()["versions"]["wm_jax"] == wm_jax.__version__
        assert c.get("/openapi.json").json()["info"]["version"] == wm_jax.__version__


def test_health_metrics_and_session_lifecycle(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] and h["verifier"] and h["gate"] == "observe"
    assert h["precision"] == "float32" and "jax" in h["versions"] and h["buckets"] == list(BUCKETS)
    r = client.post("/v1/sessions")
    assert r.status_code == 201
    sid = r.json()["id"]
    obs = _frames(1)[0]
    out = client.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(obs)}).json()
    assert out["action"] in (0, 1) and 0.0 <= out["confidence"] <= 1.0 and out["step"] == 0
    assert isinstance(out["verified"], bool) and np.isfinite(out["dreamed_return"])
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.delete(f"/v1/sessions/{sid}").status_code == 404
    assert client.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(obs)}).status_code == 404
    text = client.get("/metrics").text
    assert 'wm_jax_requests_total{method="POST",path="/v1/sessions/{sid}/act",status="200"}' in text
    assert re.search(r'wm_jax_requests_total\{method="POST",path="/v1/sessions/\{sid\}/act",status="404"\} [1-9]', text)
    assert 'wm_jax_request_duration_seconds_bucket{method="POST",path="/v1/sessions/{sid}/act",le="+Inf"}' in text
    assert "wm_jax_gate_total" in text and "wm_jax_sessions " in text


def test_base64_and_nested_lists_are_the_same_observation_and_the_carry_advances(client, run_with_k):
    frames = _frames(6)
    a, b = client.post("/v1/sessions").json()["id"], client.post("/v1/sessions").json()["id"]
    agent = Agent.load(run_with_k)
    model = serve.Model(agent, serve.Settings(buckets=BUCKETS))
    carry = model.initial_carry()
    for t, obs in enumerate(frames):
        ra = client.post(f"/v1/sessions/{a}/act", json={"observation": _b64(obs)}).json()
        rb = client.post(f"/v1/sessions/{b}/act", json={"observation": obs.tolist()}).json()
        row = model.act([carry], [obs])[0]
        carry = row["carry"]
        assert ra == rb and ra["step"] == t
        assert ra["action"] == int(row["action"])  # the server acts as the model in process
        np.testing.assert_allclose(ra["confidence"], float(row["confidence"]), rtol=1e-5)


@pytest.mark.parametrize("observation, says", [
    (base64.b64encode(b"\x00" * 100).decode(), "16384 bytes"),
    ("not base64!", "base64"),
    ([[0] * 4] * 64, "shape"),
    (np.zeros((64, 64, 4)).tolist(), None),  # floats that are whole numbers are fine
    (np.full((64, 64, 4), 0.5).tolist(), "whole numbers"),
    (np.full((64, 64, 4), 256).tolist(), "[0, 255]"),
    (np.full((64, 64, 4), -1).tolist(), "[0, 255]"),
    ([[["a"] * 4] * 64] * 64, "numbers"),
    ([[[10 ** 400, 0, 0, 0]] + [[0] * 4] * 63] + [[[0] * 4] * 64] * 63, "[0, 255]"),  # beyond float64: a 422
    ([[[True, 0, 0, 0]] + [[0] * 4] * 63] + [[[0] * 4] * 64] * 63, "numbers"),
    (7, "base64 string or nested lists"),
])
def test_bad_observations_are_422_naming_the_field(client, observation, says):
    sid = client.post("/v1/sessions").json()["id"]
    r = client.post(f"/v1/sessions/{sid}/act", json={"observation": observation})
    if says is None:
        assert r.status_code == 200
        return
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "observation"] and says in detail["msg"]
    assert client.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(_frames(1)[0])}).json()["step"] == 0


def test_nan_missing_field_oversized_body_and_unknown_session(client):
    sid = client.post("/v1/sessions").json()["id"]
    obs = np.zeros((64, 64, 4)).tolist()
    obs[0][0][0] = float("nan")
    body = json.dumps({"observation": obs})  # Python writes NaN, which the server's JSON parser reads
    r = client.post(f"/v1/sessions/{sid}/act", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["detail"][0]["msg"]
    r = client.post(f"/v1/sessions/{sid}/act", json={"obs": _b64(_frames(1)[0])})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "observation"]
    assert r.json()["detail"][0]["type"] == "missing"
    big = b'{"observation": "' + b"A" * (2 << 20) + b'"}'
    assert client.post(f"/v1/sessions/{sid}/act", content=big,
                       headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"observation": "'
        for _ in range(40):
            yield b"A" * 65536
        yield b'"}'

    assert client.post(f"/v1/sessions/{sid}/act", content=chunks(),
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/v1/sessions/nope/act", json={"observation": _b64(_frames(1)[0])}).status_code == 404
    assert client.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(_frames(1)[0])}).json()["step"] == 0


def test_sessions_are_capped_least_recently_used_first(client):
    ids = [client.post("/v1/sessions").json()["id"] for _ in range(4)]  # the cap is 4
    obs = _b64(_frames(1)[0])
    assert client.post(f"/v1/sessions/{ids[0]}/act", json={"observation": obs}).status_code == 200  # ids[0] used
    client.post("/v1/sessions")  # evicts ids[1], the least recently used
    assert client.post(f"/v1/sessions/{ids[1]}/act", json={"observation": obs}).status_code == 404
    assert client.post(f"/v1/sessions/{ids[0]}/act", json={"observation": obs}).status_code == 200
    assert client.get("/health").json()["sessions"] == 4
    assert "wm_jax_sessions_evicted_total" in client.get("/metrics").text


def test_dream_endpoint(client):
    obs = _b64(_frames(1)[0])
    r = client.post("/v1/dream", json={"observation": obs, "horizon": 5, "frames": True}).json()
    assert r["horizon"] == 5 and len(r["rewards"]) == len(r["actions"]) == len(r["confidence"]) == 5
    assert len(r["latents"]) == 5 and len(r["latents"][0]) == 8  # the smoke preset's latent
    png = Image.open(io.BytesIO(base64.b64decode(r["frames"][0])))
    assert png.size == (64, 64)
    given = client.post("/v1/dream", json={"observation": obs, "horizon": 3, "actions": [1, 1, 0]}).json()
    assert given["actions"] == [1, 1, 0]
    again = client.post("/v1/dream", json={"observation": obs, "horizon": 3, "actions": [1, 1, 0]}).json()
    assert again == given  # deterministic
    assert client.post("/v1/dream", json={"observation": obs, "horizon": 3, "actions": [1]}).status_code == 422
    assert client.post("/v1/dream", json={"observation": obs, "horizon": 3, "actions": [0, 2, 1]}).status_code == 422
    assert client.post("/v1/dream", json={"observation": obs, "horizon": 2, "actions": [True, 0]}).status_code == 422
    r = client.post("/v1/dream", json={"observation": obs, "horizon": 101})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "horizon"]


@pytest.mark.slow
def test_gate_enforce_answers_the_safe_action_or_409_and_a_rejection_changes_nothing(run_with_k):
    frames = _frames(4)
    with _client(run_with_k, gate="enforce", threshold=1.0) as c:  # K (a sigmoid) stays below 1: every step unverified
        sid = c.post("/v1/sessions").json()["id"]
        r = c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(frames[0])})
        assert r.status_code == 409 and r.json()["detail"]["verified"] is False
        assert c.get("/metrics").text.count('outcome="unverified"} 1') == 1
    with _client(run_with_k, gate="observe") as c:
        sid = c.post("/v1/sessions").json()["id"]
        observed = [c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(o)}).json() for o in frames]
    with _client(run_with_k, gate="enforce", threshold=1.0, safe_action=1) as c:
        sid = c.post("/v1/sessions").json()["id"]
        safe = [c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(o)}).json() for o in frames]
    assert all(s["action"] == 1 and not s["verified"] for s in safe)
    assert safe[0]["policy_action"] == observed[0]["policy_action"]
    with _client(run_with_k, gate="enforce", threshold=0.0) as c:  # every step verified: enforce = observe
        sid = c.post("/v1/sessions").json()["id"]
        # a 422 between steps changes nothing either
        first = c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(frames[0])}).json()
        assert c.post(f"/v1/sessions/{sid}/act", json={"observation": [1]}).status_code == 422
        rest = [c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(o)}).json() for o in frames[1:]]
    keys = ("action", "step", "confidence", "dreamed_return")
    assert [{k: r[k] for k in keys} for r in (first, *rest)] == [{k: r[k] for k in keys} for r in observed]
    # a 409 leaves the session's carry and step count as they were
    with _client(run_with_k, gate="enforce", threshold=1.0) as c:
        sid = c.post("/v1/sessions").json()["id"]
        session = c.app.app.state.serve["sessions"].get(sid)
        before = (session.carry[0].copy(), session.carry[1].copy())
        for o in frames:
            assert c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(o)}).status_code == 409
        assert session.steps == 0
        np.testing.assert_array_equal(session.carry[0], before[0])
        np.testing.assert_array_equal(session.carry[1], before[1])


@pytest.mark.slow
def test_batched_requests_get_the_same_answers_as_single_ones(run_with_k):
    frames = _frames(5)
    model = serve.Model(Agent.load(run_with_k), serve.Settings(buckets=BUCKETS))
    singles = [model.act([model.initial_carry()], [o])[0] for o in frames]
    batched = model.act([model.initial_carry()] * 5, frames)
    # the gate's look-ahead supplies the new carry: it is the plain step's (a model without the gate)
    plain = serve.Model(Agent.load(run_with_k), serve.Settings(buckets=BUCKETS, gate="off"))
    for s, p in zip(singles, (plain.act([plain.initial_carry()], [o])[0] for o in frames)):
        assert int(s["action"]) == int(p["action"]) and "confidence" not in p
        np.testing.assert_allclose(s["carry"][0], p["carry"][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["carry"][1], p["carry"][1], rtol=1e-5, atol=1e-6)
    for s, b in zip(singles, batched):
        assert int(s["action"]) == int(b["action"])
        np.testing.assert_allclose(s["confidence"], b["confidence"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s["carry"][1], b["carry"][1], rtol=1e-4, atol=1e-6)
    # over HTTP: concurrent requests from threads, with a window long enough for them to share calls
    with _client(run_with_k, batch_window_ms=serve.MAX_BATCH_WINDOW_MS) as c:
        ids = [c.post("/v1/sessions").json()["id"] for _ in frames]
        results: dict[int, dict] = {}
        barrier = threading.Barrier(len(frames))

        def one(i: int) -> None:
            barrier.wait()
            results[i] = c.post(f"/v1/sessions/{ids[i]}/act", json={"observation": _b64(frames[i])}).json()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(frames))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = c.get("/metrics").text
    batches = int(next(l for l in text.splitlines() if l.startswith("wm_jax_act_batches_total")).split()[-1])
    assert batches < len(frames)  # some requests shared a call
    for i, s in enumerate(singles):
        assert results[i]["action"] == int(s["action"])
        np.testing.assert_allclose(results[i]["confidence"], float(s["confidence"]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_served_int8_agent_plays_real_episodes_as_in_process(run_with_k):
    """Real episodes driven through /act equal the same INT8 model stepped in process."""
    env = PixelCartPole()
    with _client(run_with_k, precision="int8") as c:
        assert c.get("/health").json()["precision"] == "int8"
        model = serve.Model(Agent.load(run_with_k), serve.Settings(buckets=BUCKETS, precision="int8"))
        for episode in range(2):
            obs, state = env.reset(jax.random.key(100 + episode))
            sid = c.post("/v1/sessions").json()["id"]
            carry = model.initial_carry()
            steps = 0
            for t in range(60):
                action = c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(np.asarray(obs))}).json()["action"]
                row = model.act([carry], [np.asarray(obs)])[0]
                carry = row["carry"]
                assert action == int(row["action"])
                obs, state, _, done, *_ = env.step(jax.random.key(t), state, action)
                steps += 1
                if bool(done):
                    break
            assert steps >= 5


def test_a_run_without_k_serves_with_the_gate_off(smoke_run):
    with _client(smoke_run[0]) as c:
        h = c.get("/health").json()
        assert h["gate"] == "off" and not h["verifier"] and "train-verifier" in h["note"]
        sid = c.post("/v1/sessions").json()["id"]
        out = c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(_frames(1)[0])}).json()
        assert out["gate"] == "off" and "confidence" not in out
        assert c.post("/v1/dream", json={"observation": _b64(_frames(1)[0]), "horizon": 2}).json()["confidence"] is None


def test_serve_refuses_a_missing_or_damaged_run_in_one_line(tmp_path, smoke_run, capsys):
    assert cli.main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such run directory" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(smoke_run[0], damaged)
    (damaged / "agent.json").write_text("{not json")
    assert cli.main(["serve", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "agent.json" in err
    with pytest.raises(SystemExit) as e:  # argparse: one line, exit 2
        cli.main(["serve", str(smoke_run[0]), "--lookahead", "0"])
    assert e.value.code == 2 and "--lookahead" in capsys.readouterr().err
    assert cli.main(["train-verifier", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_latency_benchmark_runs_the_real_server(run_with_k, tmp_path):
    """benchmarks/serve_latency.py --quick: uvicorn in a subprocess, httpx clients, a JSON report
    (figures printed, not asserted)."""
    out = tmp_path / "latency.json"
    proc = subprocess.run([sys.executable, "benchmarks/serve_latency.py", str(run_with_k), "--quick",
                           "--precisions", "float32", "--episodes", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    levels = report["results"][0]["levels"]
    assert [r["concurrency"] for r in levels] == [1, 4] and all(r["errors"] == 0 for r in levels)
    assert all(r["requests"] == 20 and r["p99_ms"] >= r["p50_ms"] > 0 for r in levels)
    assert report["results"][0]["health"]["gate"] == "observe" and "p99" in proc.stdout
    assert report["results"][0]["episodes"]["episodes"] == 1 and report["results"][0]["episodes"]["steps"] >= 1


class _SlowModel:
    """Stands in for Model in the batcher: act takes `delay` seconds."""

    def __init__(self, delay: float) -> None:
        self.settings = serve.Settings(buckets=(1, 8))
        self.delay = delay
        self.calls = 0

    def act(self, carries, obs):
        self.calls += 1
        time.sleep(self.delay)
        return [{"action": np.int32(0), "carry": c} for c in carries]


def test_a_stopped_batcher_fails_waiting_requests_instead_of_hanging():
    async def scenario():
        batcher = serve.Batcher(_SlowModel(0.3), 0.0)
        batcher.start()
        carry = (np.zeros(2, np.float32), np.zeros(2, np.float32))
        obs = np.zeros(serve.OBS_SHAPE, np.uint8)
        first = asyncio.ensure_future(batcher.submit(carry, obs))  # runs
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(carry, obs))  # waits behind it
        await asyncio.sleep(0.05)
        await batcher.stop()
        outcomes = await asyncio.gather(first, queued, return_exceptions=True)
        with pytest.raises(serve.Unavailable):
            await batcher.submit(carry, obs)
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert all(isinstance(o, serve.Unavailable) for o in outcomes)


@pytest.mark.slow
def test_a_session_deleted_during_its_step_gets_404_not_a_stale_answer(run_with_k):
    settings = serve.Settings(buckets=BUCKETS)
    model = serve.Model(Agent.load(run_with_k), settings)
    with TestClient(serve.create_app(model)) as c:
        sid = c.post("/v1/sessions").json()["id"]
        act, started = model.act, threading.Event()
        model.act = lambda carries, obs: (started.set(), time.sleep(0.5), act(carries, obs))[2]  # a slow step
        body = {"observation": _b64(_frames(1)[0])}
        result = {}
        t = threading.Thread(target=lambda: result.update(r=c.post(f"/v1/sessions/{sid}/act", json=body)))
        t.start()
        assert started.wait(30)
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        t.join()
        assert result["r"].status_code == 404 and "deleted or evicted" in result["r"].json()["detail"]


def test_an_added_verifier_is_refused_once_the_run_has_another_m(run_with_k, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_with_k, run)
    done = run / run_dir.ADDED_VERIFIER / "done.json"
    record = json.loads(done.read_text())
    record["m_identity"] = {"step": 1, "sha256": "0" * 64}
    done.write_text(json.dumps(record))
    with pytest.raises(run_dir.RunDirError, match="another M"):
        run_dir.load_verifier(run)


# settings the server cannot honour


@pytest.mark.parametrize("flag, value, says", [
    ("--batch-window-ms", "1e9", "[0, 1000] ms"),  # every /act waited for a batch that never filled
    ("--batch-window-ms", "nan", "[0, 1000] ms"),  # every /act answered 503
    ("--batch-window-ms", "-1", "[0, 1000] ms"),
    ("--port", "80000", "[1, 65535] (a TCP port)"),  # announced 80000, listened on 14464
    ("--port", "0", "[1, 65535] (a TCP port)"),
    ("--lookahead", "1000000000", "[1, 10000] imagined steps"),  # RESOURCE_EXHAUSTED at warm-up (140 GB)
    ("--lookahead", "1e3", "expected an integer"),
    ("--threshold", "5", "[0, 1]"),
    ("--threshold", "nan", "[0, 1]"),
])
def test_case3_settings_it_cannot_honour_are_refused_by_the_parser_in_one_line(tmp_path, capsys, flag, value, says):
    with pytest.raises(SystemExit) as e:  # at parsing: before anything loads (the run does not even exist)
        cli.main(["serve", str(tmp_path / "nope"), flag, value])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and flag in err and says in err, err


def test_case3_the_parser_and_the_library_agree_on_the_bounds():
    top = ["--lookahead", str(serve.MAX_LOOKAHEAD), "--batch-window-ms", f"{serve.MAX_BATCH_WINDOW_MS:g}",
           "--threshold", "1", "--port", "65535"]
    args = cli.build_parser().parse_args(["serve", "run", *top])
    serve.Settings(lookahead=args.lookahead, batch_window_ms=args.batch_window_ms, threshold=args.threshold)
    serve.check_port(args.port)
    for flag, over in (("--lookahead", str(serve.MAX_LOOKAHEAD + 1)),
                       ("--batch-window-ms", str(serve.MAX_BATCH_WINDOW_MS + 0.5))):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "run", flag, over])


@pytest.mark.parametrize("field, value", [
    ("threshold", 5.0), ("threshold", -0.1), ("threshold", float("nan")),
    ("batch_window_ms", 1e9), ("batch_window_ms", float("nan")), ("batch_window_ms", float("inf")),
    ("batch_window_ms", -1.0), ("lookahead", 10 ** 9), ("lookahead", 0),
])
def test_case3_settings_it_cannot_honour_are_refused_by_the_library(field, value):
    with pytest.raises(ValueError, match=field):
        serve.Settings(**{field: value})


def test_case3_a_port_out_of_range_is_refused_before_binding(run_with_k):
    app = serve.create_app(run_with_k, serve.Settings(buckets=BUCKETS))  # not started: nothing loads
    for port in (80000, 0, -1, 8000.5):
        with pytest.raises(ValueError, match=r"port must be a TCP port in \[1, 65535\]"):
            serve.run(app, port=port)


def test_case3_settings_beyond_the_machines_memory_are_refused_before_anything_compiles(run_with_k, monkeypatch, capsys):
    """A look-ahead keeps every imagined step's carry for every example of the largest bucket: its
    memory is counted from the settings and refused (collection.TooLarge, one line) before XLA would
    fail at warm-up; so are sessions that could not all be held."""
    agent = Agent.load(run_with_k)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the settings were checked")

    with monkeypatch.context() as m:
        m.setattr(jax, "jit", no_compiling)
        for settings, names in ((serve.Settings(lookahead=10_000, buckets=(1, 2 ** 30)), "lookahead"),
                                (serve.Settings(max_sessions=10 ** 13), "max_sessions")):
            with pytest.raises(TooLarge, match="GiB") as e:
                serve.Model(agent, settings)
            assert "\n" not in str(e.value) and names in str(e.value)
    # on a device with memory of its own (a GPU) the programs are weighed against it, and the
    # look-ahead counts only where the gate runs
    monkeypatch.setattr(serve.model, "memory", lambda: (2 ** 30, 2 ** 40))
    big = serve.Settings(lookahead=10_000, buckets=(1, 8, 1024))
    need = serve.memory_need(agent.cfg, big, gate=True)
    assert need["act"] > 2 ** 29 > serve.memory_need(agent.cfg, big, gate=False)["act"]
    with pytest.raises(TooLarge, match="device"):
        serve.check_memory(agent.cfg, big, gate=True)
    serve.check_memory(agent.cfg, big, gate=False)
    monkeypatch.undo()
    # the command: exit 2, one line, before the server starts
    assert cli.main(["serve", str(run_with_k), "--max-sessions", str(10 ** 13)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_sessions" in err and "GiB" in err


class _IdleModel:
    """Stands in for Model in the batcher: act answers at once."""

    settings = serve.Settings(buckets=(1, 8))

    def act(self, carries, obs):
        return [{"action": np.int32(0), "carry": c} for c in carries]


def test_case3_a_draining_batcher_answers_the_batch_waiting_out_its_window_at_once():
    async def scenario():
        batcher = serve.Batcher(_IdleModel(), 600.0)  # ten minutes
        batcher.start()
        carry = (np.zeros(2, np.float32), np.zeros(2, np.float32))
        waiting = asyncio.ensure_future(batcher.submit(carry, np.zeros(serve.OBS_SHAPE, np.uint8)))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        batcher.drain()
        row = await asyncio.wait_for(waiting, 10)
        later = await asyncio.wait_for(batcher.submit(carry, np.zeros(serve.OBS_SHAPE, np.uint8)), 10)
        await batcher.stop()
        return row, later, batcher.batches

    row, later, batches = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert int(row["action"]) == 0 and int(later["action"]) == 0 and batches == 2


def _start_server(cmd: list[str], port: int, tmp_path: Path) -> tuple[subprocess.Popen, object]:
    """A server process on 127.0.0.1:port, once its /health answers (its output in a log file)."""
    import httpx

    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            time.sleep(0.3)


@pytest.mark.slow
def test_case5_sigterm_ends_wm_jax_serve_normally(run_with_k, tmp_path):
    """`wm-jax serve` stopped by SIGTERM (as systemd stops it) shuts down and exits 0 with one
    line: a server's normal end, not an interrupted job to resume."""
    port = free_port()
    proc, log = _start_server([sys.executable, "-m", "wm_jax.cli", "serve", str(run_with_k), "--port", str(port)],
                              port, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "server.log").read_text()
    assert proc.returncode == 0, out[-2000:]
    assert "wm-jax serve: stopped" in out and "Traceback" not in out and "resume" not in out


@pytest.mark.slow
def test_case3_sigterm_stops_the_server_at_once_while_a_batch_window_waits(run_with_k, tmp_path):
    """`serve.run` in its own process, with a ten-minute window (the cap lifted for the test): an
    /act waits in it, and the first SIGTERM answers it and stops the server within seconds."""
    import httpx

    port = free_port()
    code = ("import sys; from wm_jax import serve; serve.model.MAX_BATCH_WINDOW_MS = 600_000.0; "
            "settings = serve.Settings(buckets=(1, 8), batch_window_ms=600_000.0); "
            "serve.run(serve.create_app(sys.argv[1], settings), port=int(sys.argv[2]))")
    proc, log = _start_server([sys.executable, "-c", code, str(run_with_k), str(port)], port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        sid = httpx.post(f"{base}/v1/sessions").json()["id"]
        result = {}
        body = {"observation": _b64(_frames(1)[0])}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(f"{base}/v1/sessions/{sid}/act", json=body,
                                                                          timeout=120)))
        t.start()
        time.sleep(1.0)  # the request waits in the window
        assert "r" not in result
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        t.join(60)
        assert time.monotonic() - t0 < 60
        assert result["r"].status_code == 200 and result["r"].json()["step"] == 0
        assert proc.returncode == -signal.SIGTERM  # uvicorn ends by raising the signal it caught
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# clients that leave


def _asgi(client, path: str, body: bytes, length: int | None = None, send_fails: bool = False) -> list[dict]:
    """POST `body` to the app at the ASGI level, on the client's event loop, as a client that is
    gone once it sent it (every later receive() answers http.disconnect, as uvicorn's does after a
    lost connection); `length` declares a longer body (the client left in the middle of it). With
    `send_fails` the connection looks open (receive() waits) but sending the answer raises, as on a
    reset connection. The messages sent."""
    length = len(body) if length is None else length
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"content-length", str(length).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    pending = [{"type": "http.request", "body": body, "more_body": length > len(body)}]
    sent: list[dict] = []

    async def receive():
        if not pending and send_fails:
            await asyncio.sleep(3600)
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        if send_fails and message["type"] == "http.response.body":
            raise ConnectionResetError("the client reset the connection")
        sent.append(message)

    client.portal.call(client.app, scope, receive, send)
    return sent


def _count(text: str, path: str, status: int) -> int:
    m = re.search(r'wm_jax_requests_total\{method="POST",path="%s",status="%d"\} (\d+)' % (re.escape(path), status), text)
    return int(m.group(1)) if m else 0


def test_case4_an_act_whose_client_left_before_the_answer_does_not_advance_the_session(client):
    sid = client.post("/v1/sessions").json()["id"]
    session = client.app.app.state.serve["sessions"].get(sid)
    path, route = f"/v1/sessions/{sid}/act", "/v1/sessions/{sid}/act"
    before = _count(client.get("/metrics").text, route, 499)
    body = json.dumps({"observation": _b64(_frames(1)[0])}).encode()
    sent = _asgi(client, path, body)  # computed, but the client is gone: nothing is answered
    assert not any(m["type"] == "http.response.body" for m in sent) and session.steps == 0
    with pytest.raises(ConnectionResetError):  # the answer's send fails: the step is not taken either
        _asgi(client, path, body, send_fails=True)
    assert session.steps == 0
    r = client.post(path, json={"observation": _b64(_frames(1)[0])})  # the retry: the first step
    assert r.status_code == 200 and r.json()["step"] == 0 and session.steps == 1
    assert client.post(path, json={"observation": _b64(_frames(1)[0])}).json()["step"] == 1  # the lock is free
    assert _count(client.get("/metrics").text, route, 499) == before + 2


def test_case4_a_client_leaving_mid_body_is_counted_as_499_not_as_a_server_error(client):
    sid = client.post("/v1/sessions").json()["id"]
    before = client.get("/metrics").text
    _asgi(client, f"/v1/sessions/{sid}/act", b'{"observation": "AAAA', length=30_000)
    text = client.get("/metrics").text
    assert _count(text, "unmatched", 499) == _count(before, "unmatched", 499) + 1
    assert 'status="500"' not in text


@contextlib.contextmanager
def _served(app):
    """`app` on uvicorn at 127.0.0.1, on a port the OS picks, in a thread; stopped on exit. Plain
    uvicorn.Server: what holds for clients that leave holds under any ASGI server."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive()


@pytest.mark.slow
def test_case4_a_client_that_closes_before_its_answer_and_retries_moves_the_agent_one_step(run_with_k):
    """Over a real socket to uvicorn: the client sends a whole /act and closes while the step is
    computed, then retries; and another sends half a body and closes. The session advanced once,
    the retry's answer is the first step, and /metrics counts both as 499, none as 500."""
    import httpx

    model = serve.Model(Agent.load(run_with_k), serve.Settings(buckets=BUCKETS))
    app = serve.create_app(model)
    act, started, finished = model.act, threading.Event(), threading.Event()

    def slow(carries, obs):
        started.set()
        time.sleep(0.5)
        try:
            return act(carries, obs)
        finally:
            finished.set()

    obs = _b64(_frames(1)[0])
    with _served(app) as port:
        base = f"http://127.0.0.1:{port}"
        sid = httpx.post(f"{base}/v1/sessions").json()["id"]
        session = app.app.state.serve["sessions"].get(sid)
        body = json.dumps({"observation": obs}).encode()
        head = (f"POST /v1/sessions/{sid}/act HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        model.act = slow
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body)
            assert started.wait(30)
        assert finished.wait(30)  # closed while the step was computed
        model.act = act
        r = httpx.post(f"{base}/v1/sessions/{sid}/act", json={"observation": obs}, timeout=60)
        assert r.status_code == 200 and r.json()["step"] == 0 and session.steps == 1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # half a body, then gone
            sock.sendall(head + body[:100])
        deadline = time.monotonic() + 30
        while _count(text := httpx.get(f"{base}/metrics").text, "unmatched", 499) < 1:
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
    assert _count(text, "/v1/sessions/{sid}/act", 499) == 1 and 'status="500"' not in text


@pytest.mark.slow
def test_case8_a_restart_loses_every_session_and_the_404_and_the_docs_say_so(run_with_k):
    obs = {"observation": _b64(_frames(1)[0])}
    with _client(run_with_k) as c:
        sid = c.post("/v1/sessions").json()["id"]
        assert c.post(f"/v1/sessions/{sid}/act", json=obs).status_code == 200
    with _client(run_with_k) as c:  # the same run served again
        r = c.post(f"/v1/sessions/{sid}/act", json=obs)
        assert r.status_code == 404 and "restarted" in r.json()["detail"]
    readme = " ".join((ROOT / "docs" / "SERVING.md").read_text().split())
    assert "a restart loses every one" in readme

