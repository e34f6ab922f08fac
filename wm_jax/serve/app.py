"""The HTTP app: request parsing, the ASGI wrapper (body limit, timing, the step taken only when
its answer went out), create_app, and `run` under uvicorn."""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, StrictInt, field_validator

from wm_jax import stages
from wm_jax.envs.cartpole import NUM_ACTIONS
from wm_jax.serve.batching import Batcher, Unavailable
from wm_jax.serve.metrics import CLIENT_CLOSED, Metrics
from wm_jax.serve.model import OBS_BYTES, OBS_SHAPE, Model, Settings
from wm_jax.serve.redis_sessions import RedisSessions, check_url
from wm_jax.serve.sessions import STEP, Busy, Carry, Sessions, Step, StoreDown




def parse_observation(value: Any) -> np.ndarray:
    """A request's observation as uint8[64, 64, 4]; a ValueError saying what is wrong otherwise."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ValueError("not valid base64") from None
        if len(raw) != OBS_BYTES:
            raise ValueError(f"base64 must hold {OBS_BYTES} bytes (uint8 {list(OBS_SHAPE)}, row-major), "
                             f"got {len(raw)}")
        return np.frombuffer(raw, np.uint8).reshape(OBS_SHAPE)
    if isinstance(value, list):
        try:
            arr = np.asarray(value, dtype=object)
        except ValueError:
            raise ValueError(f"nested lists must have shape {list(OBS_SHAPE)}") from None
        if arr.shape != OBS_SHAPE:
            raise ValueError(f"nested lists must have shape {list(OBS_SHAPE)}, got {list(arr.shape)}")
        flat = arr.reshape(-1)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ValueError("values must be numbers")
        try:
            num = np.asarray(flat.tolist(), np.float64)
        except (OverflowError, ValueError, TypeError):  # an integer beyond float64, for one
            raise ValueError("values must be in [0, 255]") from None
        if not np.isfinite(num).all():
            raise ValueError("values must be finite (NaN or infinity found)")
        if (num != np.round(num)).any():
            raise ValueError("values must be whole numbers (uint8 pixels)")
        if num.min() < 0 or num.max() > 255:
            raise ValueError(f"values must be in [0, 255], got [{num.min():g}, {num.max():g}]")
        return num.astype(np.uint8).reshape(OBS_SHAPE)
    raise ValueError("must be a base64 string or nested lists of uint8 [64, 64, 4]")


class Observation(BaseModel):
    # Any: parse_observation judges every form, so a wrong one is one message at ["body", "observation"]
    observation: Any = Field(description="uint8 [64, 64, 4]: base64 of the raw bytes (str), or nested lists")

    @field_validator("observation", mode="after")
    @classmethod
    def _obs(cls, value: Any) -> Any:
        return parse_observation(value)


class DreamRequest(Observation):
    horizon: int = Field(10, ge=1, description="imagined steps (at most the server's max_dream_horizon)")
    actions: list[StrictInt] | None = Field(None, description="one action (0 or 1) per step; omitted: the agent acts")
    frames: bool = Field(False, description="also return each imagined step's decoded newest frame as PNG (base64)")
    session: str | None = Field(None, description="dream from this session's carry (it is not changed)")

    @field_validator("actions")
    @classmethod
    def _actions(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 0 <= a < NUM_ACTIONS for a in value):
            raise ValueError(f"actions must be in [0, {NUM_ACTIONS})")
        return value




async def _client_gone(receive: Any) -> bool:
    """Whether the server already knows this request's client is gone: after the whole body,
    receive() answers http.disconnect at once when the connection was lost (uvicorn, Starlette)
    and otherwise waits for it, so the wait is cancelled at the first pause."""
    message = asyncio.ensure_future(receive())
    await asyncio.sleep(0)
    if not message.done():
        message.cancel()
        return False
    return not message.cancelled() and message.exception() is None and message.result()["type"] == "http.disconnect"


class Outer:
    """ASGI wrapper around the FastAPI app: a request body over `limit` bytes is answered 413
    before the app reads it (by Content-Length, and by counting for bodies sent without one), and
    every request's status and time go to `metrics` under its route's template; a request whose
    client left before its answer went out (in the middle of its body, or while it was computed)
    is counted as 499, not as a server error. It takes or drops the step an /act leaves in its
    scope (`STEP`), and releases its session's lock, once the answer's last message was handed to
    the server. Plain ASGI: Starlette's `@app.middleware("http")` costs far more per request."""

    def __init__(self, app: Any, limit: int, metrics: Metrics, state: dict[str, Any] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.state = state if state is not None else {}

    def drain(self) -> None:
        """Shutdown begins: a batch waiting out its window runs now (`Batcher.drain`)."""
        batcher = self.state.get("batcher")
        if batcher is not None:
            batcher.drain()

    async def _too_large(self, send: Any) -> None:
        body = b'{"detail":"request body over %d bytes"}' % self.limit
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status: int | None = None
        answered = gone = received = False

        async def receive_watched() -> Any:
            nonlocal gone, received
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            received = received or (message["type"] == "http.request" and not message.get("more_body", False))
            return message

        async def send_watched(message: Any) -> None:
            nonlocal status, answered, gone
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] != "http.response.body" or message.get("more_body", False):
                return await send(message)
            # the answer's last message. An /act step is taken only if its answer can still reach
            # the client: uvicorn drops what is sent on a lost connection without a word, so the
            # connection is asked first; it is taken after the send returns, in the same turn of
            # the event loop (uvicorn's send writes to the socket without pausing unless the
            # client stopped reading). No server can know more: bytes in flight when the client
            # vanishes are lost with it, and TCP acknowledges to the kernel, not to the program.
            step = scope.get(STEP) if status == 200 else None
            # asked only once the whole body arrived: before that, receive() would take the next
            # part of the body (or make uvicorn answer `Expect: 100-continue`, inviting it)
            if received and await _client_gone(receive):
                gone = True
                return  # nobody to answer (an /act step is not taken)
            try:
                await send(message)
            except OSError:  # a server that raises for a lost connection (uvicorn's ClientDisconnected is one)
                gone = True
                raise
            answered = True
            if step is not None:
                await step.take()

        try:
            await self._limited(scope, receive_watched, send_watched)
        finally:
            step = scope.pop(STEP, None)
            if step is not None:  # taken or not, the session is free for its next step
                await step.release()
            if gone and not answered:
                status = CLIENT_CLOSED
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope.get("method", ""), path, 500 if status is None else status,
                                 time.perf_counter() - t0)

    async def _limited(self, scope: Any, receive: Any, send: Any) -> None:
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and int(length) > self.limit:
                return await self._too_large(send)
        except ValueError:
            pass
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **stages.versions(("wm_jax", "jax", "jaxlib", "flax", "fastapi", "uvicorn", "qwix"), missing=None)}


GONE = "session {!r} was deleted or evicted while this step waited; nothing was answered"


def unknown(state: dict[str, Any], sid: str) -> HTTPException:
    """404 for a session the store does not hold, saying why that can be."""
    store = state["sessions"]
    ttl = f", expired after {store.ttl:g} s idle" if store.ttl is not None else ""
    lost = ", or lost when the server restarted" if store.kind == "memory" else ""
    return HTTPException(404, f"unknown session {sid!r} (never created, deleted{ttl}"
                              f"{', evicted' if store.kind == 'memory' else ''}{lost}: create a new one)")


async def act(state: dict[str, Any], settings: Settings, metrics: Metrics, sid: str, obs: np.ndarray,
              request: Request) -> dict[str, Any]:
    """/act: one step of session `sid` through the batcher and the gate. The session is held
    (`Sessions.begin`) and the new carry left in the request's scope (`STEP`): `Outer` takes the
    step once its answer went out (or drops it) and then lets the session go, so a retry, or a
    concurrent request on the same session, waits for that and steps from its result."""
    m: Model = state["model"]
    held = await state["sessions"].begin(sid)
    if held is None:
        raise unknown(state, sid)
    try:
        try:
            row = await state["batcher"].submit(held.carry, obs)
        except Unavailable as e:
            raise HTTPException(503, str(e)) from None
        if not await held.alive():  # deleted or evicted during the step
            raise HTTPException(404, GONE.format(sid))
        policy_action = int(row["action"])
        out: dict[str, Any] = {"action": policy_action, "policy_action": policy_action, "gate": m.gate,
                               "step": held.steps}
        carry = row["carry"]
        if m.gate != "off":
            verified = bool(row["confidence"] >= settings.threshold)
            out.update(confidence=float(row["confidence"]), dreamed_return=float(row["dreamed_return"]),
                       verified=verified, lookahead=settings.lookahead)
            metrics.count_gate("verified" if verified else "unverified")
            if m.gate == "enforce" and not verified:
                if settings.safe_action is None:
                    raise HTTPException(409, {"message": "the verifier did not confirm this step; nothing "
                                                         "changed", **out})
                out["action"] = settings.safe_action
                carry = row["safe_carry"]
    except BaseException:
        await held.release()
        raise
    request.scope[STEP] = Step(held, (np.asarray(carry[0]), np.asarray(carry[1])))
    return out


async def dream(state: dict[str, Any], settings: Settings, body: DreamRequest) -> dict[str, Any]:
    """/v1/dream: M's imagined steps from an observation (and a session's carry), on the dream thread."""
    m: Model = state["model"]
    if body.horizon > settings.max_dream_horizon:
        raise HTTPException(422, [{"loc": ["body", "horizon"], "type": "less_than_equal",
                                   "msg": f"horizon must be <= {settings.max_dream_horizon}"}])
    if body.actions is not None and len(body.actions) != body.horizon:
        raise HTTPException(422, [{"loc": ["body", "actions"], "type": "value_error",
                                   "msg": f"actions must hold horizon={body.horizon} entries, got {len(body.actions)}"}])
    carry: Carry = m.initial_carry()
    if body.session is not None:
        found = await state["sessions"].peek(body.session)
        if found is None:
            raise unknown(state, body.session)
        carry = found[0]
    res = await asyncio.get_running_loop().run_in_executor(
        state["dreams"], m.dream, carry, body.observation, body.horizon, body.actions, body.frames)
    out = {"horizon": body.horizon, "latents": res["z_next"].tolist(), "actions": res["action"].tolist(),
           "rewards": res["reward"].tolist(), "done_prob": res["p_done"].tolist(),
           "confidence": res["confidence"].tolist() if "confidence" in res else None}
    if body.frames:
        out["frames"] = res["frames"]
    return out


async def health(state: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """/health: whether the batcher runs and the session store answers, and what is served with
    which settings. "unavailable" (still HTTP 200: the process lives) when either does not."""
    m: Model = state["model"]
    store = await state["sessions"].state()
    try:
        count: int | None = await state["sessions"].count()
    except StoreDown:
        count = None
    ok = state["batcher"].alive and store["reachable"]
    out = {"status": "ok" if ok else "unavailable", "model_loaded": True, "source": m.source,
           "precision": settings.precision, "gate": m.gate, "verifier": m.has_verifier,
           "lookahead": settings.lookahead, "threshold": settings.threshold, "safe_action": settings.safe_action,
           "sessions": count, "max_sessions": settings.max_sessions, "session_store": store,
           "session_ttl_s": store["ttl_s"], "buckets": list(settings.buckets), "preset": m.cfg.preset,
           "seed": m.cfg.seed, "versions": versions(),
           "replica": {"host": platform.node(), "pid": os.getpid(), "up_s": round(time.time() - state["started"], 1)}}
    if not m.has_verifier:
        out["note"] = "no verifier: the gate is off (train one with `wm-jax train-verifier RUN_DIR`)"
    return out


async def store_down(request: Request, exc: Exception) -> JSONResponse:
    """503 in one line naming the store (StoreDown) or the held session (Busy): the client retries."""
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"retry-after": "1"})


def open_sessions(url: str, max_sessions: int, ttl: float | None) -> Any:
    """The session store `url` names: "memory" (this process) or redis://HOST:PORT/DB."""
    return Sessions(max_sessions, ttl) if url == "memory" else RedisSessions(url, ttl)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field and what is wrong, without echoing the input (a frame stack is 16,384
    numbers, and a NaN in it cannot be written as JSON)."""
    return JSONResponse({"detail": [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
                                    for e in exc.errors()]}, status_code=422)


def lifespan(state: dict[str, Any], model: Model | Path | str, settings: Settings, sessions: str,
             session_ttl: float | None) -> Any:
    """The app's start and end: load `model` (unless given loaded) and compile its programs, open the
    session store, start the batcher and the dream worker; at the end stop them in turn."""

    @asynccontextmanager
    async def span(app: Any):
        m = model if isinstance(model, Model) else await asyncio.to_thread(Model.load, model, settings)
        await asyncio.to_thread(m.warm_up)
        state["model"] = m
        state["sessions"] = open_sessions(sessions, settings.max_sessions, session_ttl)
        state["batcher"] = Batcher(m, settings.batch_window_ms / 1000.0)
        state["batcher"].start()
        state["dreams"] = ThreadPoolExecutor(1, thread_name_prefix="wm_jax-dream")  # /v1/dream, one at a time
        state["started"] = time.time()
        try:
            yield
        finally:
            await state["batcher"].stop()
            state["dreams"].shutdown(wait=False)
            await state["sessions"].close()

    return span


async def prometheus_text(state: dict[str, Any], metrics: Metrics) -> str:
    """/metrics: the counters in Prometheus' text format."""
    b, store = state["batcher"], state["sessions"]
    try:
        count = await store.count()
    except StoreDown:
        count = -1  # the gauge's "unknown": Redis does not answer (/health says why)
    return metrics.render(count, store.evicted, b.batches, b.batched)


def create_app(model: Model | Path | str, settings: Settings | None = None, sessions: str = "memory",
               session_ttl: float | None = None) -> Any:
    """The ASGI app: `model` loaded (Model) or a run directory / agent folder that the lifespan
    loads with `settings`; `sessions` in this process's memory or in Redis (redis://HOST:PORT/DB),
    idle ones dropped after `session_ttl` seconds (None: never). Use it as
    `TestClient(create_app(...))` or `run(create_app(...))` (uvicorn's own `uvicorn.run` serves it
    too, but waits out a batch window at shutdown)."""
    settings = model.settings if isinstance(model, Model) else (settings or Settings())
    if sessions != "memory":
        check_url(sessions)
    state: dict[str, Any] = {}
    metrics = Metrics()

    app = FastAPI(title="wm_jax", version=versions()["wm_jax"],
                  lifespan=lifespan(state, model, settings, sessions, session_ttl))
    app.state.serve = state  # the model, sessions and batcher, for tests and embedding code
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StoreDown, store_down)
    app.add_exception_handler(Busy, store_down)

    @app.post("/v1/sessions", status_code=201)
    async def create_session() -> dict[str, Any]:
        return {"id": await state["sessions"].create(state["model"].initial_carry())}

    @app.delete("/v1/sessions/{sid}", status_code=204, response_class=Response)
    async def delete_session(sid: str):
        if not await state["sessions"].delete(sid):
            raise HTTPException(404, f"unknown session {sid!r}")
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/act")
    async def act_route(sid: str, body: Observation, request: Request) -> dict[str, Any]:
        return await act(state, settings, metrics, sid, body.observation, request)

    @app.post("/v1/dream")
    async def dream_route(body: DreamRequest) -> dict[str, Any]:
        return await dream(state, settings, body)

    @app.get("/health")
    async def health_route() -> dict[str, Any]:
        return await health(state, settings)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return await prometheus_text(state, metrics)

    return Outer(app, settings.max_body_bytes, metrics, state)


class Server(uvicorn.Server):
    """uvicorn's server, which at shutdown (the first SIGINT or SIGTERM) stops accepting and waits
    for the requests in flight before it ends the app; first it drains the app (`Outer.drain`), so
    a request waiting out a batch window is answered now and the server stops at once."""

    async def shutdown(self, sockets: Any = None) -> None:
        drain = getattr(self.config.app, "drain", None)
        if drain is not None:
            drain()
        await super().shutdown(sockets)


def check_port(port: int) -> None:
    """A TCP port to listen on, 1 to 65535 (0, "any free port", is refused: the address announced
    must be the one served)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be a TCP port in [1, 65535], got {port!r}")


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve `app` (`create_app`) on host:port with `Server` until SIGINT or SIGTERM."""
    check_port(port)
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
