"""INT8 V + M (wm_jax.quant) and the HTTP server (wm_jax.serve), on the session's smoke run with a
verifier added by `train-verifier`. Every app runs inside `TestClient(...)` used as a context
manager, so its lifespan (load, warm-up, the batcher) runs as under uvicorn."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
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

from wm_jax import cli, quant, rollout, run_dir, serve, transition, vae
from wm_jax.agent import Agent
from wm_jax.env import PixelCartPole

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = (1, 8)  # fewer programs to compile than the server's default


@pytest.fixture(scope="module")
def run_with_k(smoke_run, tmp_path_factory) -> Path:
    """A copy of the smoke run (trained without K) with K added by `wm-jax train-verifier`."""
    out = tmp_path_factory.mktemp("serve") / "smoke"
    shutil.copytree(smoke_run[0], out)
    assert cli.main(["train-verifier", str(out), "--steps", "60", "--quiet"]) == 0
    return out


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
    from wm_jax import pipeline

    real = metadata.version

    def version(name):
        if name.replace("-", "_") == "wm_jax":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    assert pipeline.versions()["wm_jax"] == wm_jax.__version__
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


def test_gate_enforce_answers_the_safe_action_or_409_and_a_rejection_changes_nothing(run_with_k):
    frames = _frames(4)
    with _client(run_with_k, gate="enforce", threshold=1.01) as c:  # K never reaches 1.01: every step unverified
        sid = c.post("/v1/sessions").json()["id"]
        r = c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(frames[0])})
        assert r.status_code == 409 and r.json()["detail"]["verified"] is False
        assert c.get("/metrics").text.count('outcome="unverified"} 1') == 1
    with _client(run_with_k, gate="observe") as c:
        sid = c.post("/v1/sessions").json()["id"]
        observed = [c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(o)}).json() for o in frames]
    with _client(run_with_k, gate="enforce", threshold=1.01, safe_action=1) as c:
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
    with _client(run_with_k, gate="enforce", threshold=1.01) as c:
        sid = c.post("/v1/sessions").json()["id"]
        session = c.app.app.state.serve["sessions"].get(sid)
        before = (session.carry[0].copy(), session.carry[1].copy())
        for o in frames:
            assert c.post(f"/v1/sessions/{sid}/act", json={"observation": _b64(o)}).status_code == 409
        assert session.steps == 0
        np.testing.assert_array_equal(session.carry[0], before[0])
        np.testing.assert_array_equal(session.carry[1], before[1])


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
    with _client(run_with_k, batch_window_ms=2000.0) as c:
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
