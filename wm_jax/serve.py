"""A trained agent behind HTTP: FastAPI, one jitted program per request batch, a verifier gate.

    wm-jax serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--int8] [--gate observe|enforce|off]

    POST   /v1/sessions                -> {"id"}: a session holds the agent's recurrent carry (LRU-capped)
    DELETE /v1/sessions/{id}
    POST   /v1/sessions/{id}/act       {"observation"} -> {"action", "confidence", "dreamed_return", "verified", ...}
    POST   /v1/dream                   {"observation", "horizon", "actions"?, "frames"?} -> the imagined steps
    GET    /health, GET /metrics       (Prometheus text format)

An observation is one uint8 64x64x4 frame stack: base64 of its 16,384 raw bytes (row-major) or
nested lists. /act encodes it (V), picks C's action on [z, h], advances M, and gates the step:
from the state the action leads to, M dreams `lookahead` steps under the policy (the most likely
latent at each step: the gate is deterministic) and K scores every imagined transition; the step
is `verified` when K's mean confidence is at least `threshold`. In gate mode "enforce" an
unverified step answers `safe_action` (M advances with it) or, without one, 409 and nothing
changes. The session's carry advances only when the step is answered: when its answer was handed
to the client's connection (`Outer` commits it), not when the client had gone by then. Sessions
live in this process's memory: a restart loses them all (their ids answer 404; create new ones).

Requests that arrive within `batch_window_ms` of each other run as one jitted call on a batch
padded to the next of `buckets` (compiled at start-up, so load never recompiles). `run` serves
with uvicorn and, at the first SIGINT or SIGTERM, answers a batch waiting out its window at once.
Settings that cannot be honoured are refused before anything is compiled: out of range, or a
look-ahead, bucket or session cap whose memory exceeds half of this machine's (`memory_need`).
Precision: "float32" (V, M and K in float32, whatever the run trained in) or "int8" (V and M
quantized after training, wm_jax.quant; K stays float32).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import platform
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, StrictInt, field_validator

from wm_jax import controller, pipeline, transition, vae, verifier
from wm_jax.agent import Agent
from wm_jax.config import with_compute_dtype
from wm_jax.data import TooLarge
from wm_jax.env import NUM_ACTIONS

OBS_SHAPE = (64, 64, 4)
OBS_BYTES = int(np.prod(OBS_SHAPE))
GATES = ("off", "observe", "enforce")
DECODE_CHUNK = 10  # /v1/dream decodes its frames this many at a time (one compiled shape)
PRECISIONS = ("float32", "int8")
MAX_LOOKAHEAD = 10_000  # imagined steps per /act: past this a step costs seconds of sequential work
MAX_BATCH_WINDOW_MS = 1000.0  # longer than a second of waiting for company is a stall, not batching
CLIENT_CLOSED = 499  # /metrics status of a request whose client left before its answer went out (nginx's)


@dataclass(frozen=True)
class Settings:
    precision: str = "float32"
    gate: str = "observe"  # off: no look-ahead; observe: report it; enforce: act on it
    lookahead: int = 10
    threshold: float = 0.5
    safe_action: int | None = None  # what "enforce" answers for an unverified step (None: 409)
    max_sessions: int = 1024
    max_body_bytes: int = 1 << 20
    batch_window_ms: float = 0.0  # 0: a call takes whatever queued while the previous one ran
    buckets: tuple[int, ...] = (1, 8, 64)
    max_dream_horizon: int = 100

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        # NaN fails every comparison: `not lo <= x <= hi` refuses it with the out-of-range values
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a confidence (K's mean) in [0, 1], got {self.threshold}")
        if not 0.0 <= self.batch_window_ms <= MAX_BATCH_WINDOW_MS:
            raise ValueError(f"batch_window_ms must be in [0, {MAX_BATCH_WINDOW_MS:g}] ms, got {self.batch_window_ms}")
        if not 1 <= self.lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be in [1, {MAX_LOOKAHEAD}] imagined steps, got {self.lookahead}")
        if self.safe_action is not None and not 0 <= self.safe_action < NUM_ACTIONS:
            raise ValueError(f"safe_action must be in [0, {NUM_ACTIONS}), got {self.safe_action}")
        for name in ("max_sessions", "max_body_bytes", "max_dream_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive sizes, got {self.buckets}")


SESSION_BYTES = 1024  # a session's Python objects (id, lock, array headers) beyond its carry's floats


def memory_need(cfg: Any, settings: Settings, gate: bool) -> dict[str, int]:
    """Bytes the served programs and sessions need at most, from every setting that scales them.
    "act": the /act program at the largest bucket, per example: the frame stack (uint8 and
    float32), V's encoder activations, the carries it takes and returns, and, with the gate on,
    the look-ahead scan, which keeps every imagined step's carry (c, h), K's confidence, the reward
    and the alive flag ((2 hidden + 3) float32) for lookahead + 1 steps. "dream": the /v1/dream
    program's max_dream_horizon steps (two latents and four scalars each). "sessions": every
    session's carry at max_sessions. About: XLA's own buffers and the parameters are not counted."""
    f32, hidden, latent = 4, cfg.transition.hidden, cfg.vae.latent
    side, encoder = OBS_SHAPE[0], 0
    for width in cfg.vae.filters:  # four stride-2 4x4 valid convolutions: 64 -> 31 -> 14 -> 6 -> 2
        side = (side - 4) // 2 + 1
        encoder += side * side * width * f32
    example = OBS_BYTES * (1 + f32) + encoder + 3 * 2 * hidden * f32
    if gate:
        example += (settings.lookahead + 1) * (2 * hidden + 3) * f32
    return {"act": settings.buckets[-1] * example,
            "dream": settings.max_dream_horizon * (2 * latent + 4) * f32 + OBS_BYTES * (1 + f32) + encoder,
            "sessions": settings.max_sessions * (2 * hidden * f32 + SESSION_BYTES)}


def _memory() -> tuple[int | None, int | None]:
    """(the default device's memory when it reports one, this machine's physical memory); None
    where unknown (a platform without sysconf, a device without memory stats)."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = None
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without the query: no device figure
        stats = {}
    return stats.get("bytes_limit"), host


def check_memory(cfg: Any, settings: Settings, gate: bool) -> None:
    """Refuse (TooLarge, one line naming the settings to lower) settings whose programs would not
    fit in half of the device's memory, or whose sessions would not fit in half of this machine's:
    before anything is compiled, where XLA would fail at warm-up with RESOURCE_EXHAUSTED, or the
    sessions would exhaust memory as clients create them. The act and dream programs can run at
    once (one worker thread each); on a device without its own memory figure (the CPU) they share
    the machine's memory with the sessions."""
    need = memory_need(cfg, settings, gate)
    device, host = _memory()
    gib = 2 ** 30
    what = (f"the /act program needs about {need['act'] / gib:,.1f} GiB (largest bucket {settings.buckets[-1]:,}"
            + (f", lookahead {settings.lookahead:,} imagined steps" if gate else "") + f"), /v1/dream "
            f"{need['dream'] / gib:,.1f} GiB (max_dream_horizon {settings.max_dream_horizon:,}), the sessions "
            f"{need['sessions'] / gib:,.1f} GiB (max_sessions {settings.max_sessions:,})")
    programs = need["act"] + need["dream"]
    if device is not None and programs > device / 2:
        raise TooLarge(f"{what}: the programs exceed half of the device's {device / gib:,.1f} GiB; lower "
                       f"{'the lookahead or ' if gate else ''}the largest bucket")
    if host is not None:
        total = need["sessions"] + (programs if device is None else 0)
        if total > host / 2:
            raise TooLarge(f"{what}: more than half of this machine's {host / gib:,.1f} GiB; lower "
                           f"{'the lookahead, ' if gate else ''}the largest bucket or max_sessions")


class Model:
    """The served agent: V, M (packed Cell), C and K, in the settings' precision, and its jitted
    programs. `act` and `dream` take and return host (NumPy) arrays."""

    def __init__(self, agent: Any, settings: Settings, source: str = "") -> None:
        self.settings = settings
        self.source = source
        self.cfg = with_compute_dtype(agent.cfg, "float32")
        k_params = agent.verifier
        self.has_verifier = k_params is not None
        self.gate = settings.gate if self.has_verifier else "off"
        check_memory(self.cfg, settings, self.gate != "off")  # before anything is quantized or compiled
        m = transition.pack(self.cfg.transition, agent.params["transition"])
        v = agent.params["vae"]
        if settings.precision == "int8":
            m = transition.quantize(self.cfg.transition, agent.params["transition"])
            v = vae.quantize(self.cfg.vae, v)
        self.params = {"vae": v, "transition": m, "controller": jnp.asarray(agent.params["controller"]),
                       "verifier": k_params}
        self.hidden = self.cfg.transition.hidden
        self.latent = self.cfg.vae.latent
        self._act = jax.jit(partial(_act_batch, self.cfg, settings.lookahead, settings.safe_action,
                                    self.gate != "off"))
        self._dream = jax.jit(partial(_dream, self.cfg, settings.max_dream_horizon))
        self._decode = jax.jit(partial(vae.decode, self.cfg.vae))

    @classmethod
    def load(cls, path: Path | str, settings: Settings) -> Model:
        """A run directory or an exported agent folder; a missing or damaged one raises the loader's
        error (FileNotFoundError, RunDirError, PretrainedError) naming the problem."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run directory or agent folder")
        return cls(Agent.open(path), settings, str(path))

    def initial_carry(self) -> tuple[np.ndarray, np.ndarray]:
        zeros = np.zeros((self.hidden,), np.float32)
        return zeros, zeros.copy()

    def bucket(self, n: int) -> int:
        for b in self.settings.buckets:
            if n <= b:
                return b
        return self.settings.buckets[-1]

    def act(self, carries: list[tuple[np.ndarray, np.ndarray]], obs: list[np.ndarray]) -> list[dict[str, Any]]:
        """One batched step for len(obs) <= the largest bucket sessions, padded to a bucket."""
        n = len(obs)
        size = self.bucket(n)
        c = np.zeros((size, self.hidden), np.float32)
        h = np.zeros((size, self.hidden), np.float32)
        x = np.zeros((size,) + OBS_SHAPE, np.uint8)
        for i in range(n):
            c[i], h[i] = carries[i]
            x[i] = obs[i]
        out = jax.device_get(self._act(self.params, (c, h), x))
        rows = []
        for i in range(n):  # copies: a row must not keep the whole padded batch alive
            row = {k: (v[0][i].copy(), v[1][i].copy()) if isinstance(v, tuple) else v[i].copy() for k, v in out.items()}
            rows.append(row)
        return rows

    def warm_up(self) -> None:
        """Compile every bucket's program (and the dream's) before the first request."""
        for b in self.settings.buckets:
            self.act([self.initial_carry()] * b, [np.zeros(OBS_SHAPE, np.uint8)] * b)
        self.dream(self.initial_carry(), np.zeros(OBS_SHAPE, np.uint8), 1, None, frames=True)

    def dream(self, carry: tuple[np.ndarray, np.ndarray], obs: np.ndarray, horizon: int, actions: list[int] | None,
              frames: bool = False) -> dict[str, Any]:
        steps = self.settings.max_dream_horizon
        given = np.zeros((steps,), np.int32)
        if actions is not None:
            given[:len(actions)] = actions
        out = jax.device_get(self._dream(self.params, carry, obs, given, actions is None))
        res = {k: np.asarray(v[:horizon]) for k, v in out.items()}
        if frames:  # the horizon's frames only, decoded in chunks of one compiled size
            z = np.zeros((-(-horizon // DECODE_CHUNK) * DECODE_CHUNK, self.latent), np.float32)
            z[:horizon] = res["z_next"]
            pixels = np.concatenate([np.asarray(self._decode(self.params["vae"], z[i:i + DECODE_CHUNK]))
                                     for i in range(0, len(z), DECODE_CHUNK)])[:horizon]
            res["frames"] = [_png(p) for p in pixels]
        return res


def _most_likely(cfg: Any) -> tuple[jax.Array | None, jax.Array]:
    """`transition.latent_noise`-shaped zeros: with them `dream_step` takes M's most likely
    component and its mean, so a dream from the same state is always the same."""
    latent, k = cfg.vae.latent, transition.components(cfg.transition)
    return (jnp.zeros((latent, k)) if k > 1 else None, jnp.zeros((latent,)))


def _lookahead(cfg: Any, params: dict[str, Any], carry: Any, z: jax.Array, a: jax.Array, length: int
               ) -> tuple[jax.Array, jax.Array, Any]:
    """K's mean confidence over the transition (carry, z, a) and `length` imagined steps after it
    under the policy, up to where M's done head ends the dream, the dreamed return (reward head,
    Ha's done rule), and the carry after (carry, z, a), the step the agent takes; deterministic
    (every step takes M's most likely latent). One example; vmapped by the caller."""
    cell, ctrl, k_params = params["transition"], params["controller"], params["verifier"]
    zero_noise = _most_likely(cfg)

    def body(state, _):
        carry, z, a, alive = state
        h = transition.hidden(carry)
        new_carry, z_next, pred = transition.dream_step(cell, carry, z, a, zero_noise, 1.0)
        conf = verifier.confidence(cfg.verifier, k_params, h, z, a, z_next)
        live = alive
        alive = alive * (1.0 - transition.ends(transition.p_done(pred)))  # the step itself still counts
        a_next = controller.act(cfg.controller, ctrl, z_next, transition.hidden(new_carry))
        return (new_carry, z_next, a_next, alive), (conf, pred.reward, live, new_carry)

    _, (conf, reward, live, carries) = jax.lax.scan(body, (carry, z, a, jnp.ones(())), None, length=length + 1)
    # the mean over the steps the dream lived (the first always does): after M's done head fires,
    # the imagined transitions cannot happen and are not scored
    first = jax.tree.map(lambda x: x[0], carries)
    return jnp.sum(conf * live) / jnp.sum(live), jnp.sum(reward * live), first


def _act_batch(cfg: Any, lookahead: int, safe_action: int | None, gate: bool, params: dict[str, Any],
               carry: tuple[jax.Array, jax.Array], obs: jax.Array) -> dict[str, Any]:
    mean, _ = vae.encode(cfg.vae, params["vae"], obs)
    cell = params["transition"]
    action = controller.act(cfg.controller, params["controller"], mean, transition.hidden(carry))
    out = {"action": action}
    if gate:  # the look-ahead's first step is the agent's step: its carry is the new one
        look = jax.vmap(lambda c, z, a: _lookahead(cfg, params, c, z, a, lookahead))
        out["confidence"], out["dreamed_return"], out["carry"] = look(carry, mean, action)
    else:
        out["carry"] = transition.cell_step(cell, carry, mean, action)[0]
    if safe_action is not None:
        safe = jnp.full_like(action, safe_action)
        out["safe_carry"] = transition.cell_step(cell, carry, mean, safe)[0]
    return out


def _dream(cfg: Any, steps: int, params: dict[str, Any], carry: Any, obs: jax.Array, given: jax.Array,
           use_policy: jax.Array) -> dict[str, jax.Array]:
    """`steps` imagined steps from (carry, obs) under the policy or the `given` actions; M's most
    likely latent at each step, so the same request always dreams the same."""
    cell, ctrl, k_params = params["transition"], params["controller"], params["verifier"]
    mean, _ = vae.encode(cfg.vae, params["vae"], obs[None])
    z0 = mean[0]
    zero_noise = _most_likely(cfg)

    def body(state, a_given):
        carry, z = state
        h = transition.hidden(carry)
        a = jnp.where(use_policy, controller.act(cfg.controller, ctrl, z, h), a_given)
        new_carry, z_next, pred = transition.dream_step(cell, carry, z, a, zero_noise, 1.0)
        row = {"z": z, "action": a, "z_next": z_next, "reward": pred.reward,
               "p_done": transition.p_done(pred)}
        if k_params is not None:
            row["confidence"] = verifier.confidence(cfg.verifier, k_params, h, z, a, z_next)
        return (new_carry, z_next), row

    _, traj = jax.lax.scan(body, (carry, z0), given)
    return traj


def _png(pixels: np.ndarray) -> str:
    """A decoded stack [64, 64, 4] in [0, 1]: its newest frame as a base64 grayscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels[..., -1] * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- input


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


# -------------------------------------------------------------------------------------------- batching


@dataclass
class _Pending:
    carry: tuple[np.ndarray, np.ndarray]
    obs: np.ndarray
    future: asyncio.Future


class Unavailable(RuntimeError):
    """The batcher is stopped (shutting down) or its loop has died: the request cannot be served."""


class Batcher:
    """Runs queued /act requests as one `Model.act` call on its own worker thread: every request
    that queued while the previous call ran (up to the largest bucket), and with `window` > 0 also
    those that arrive within `window` seconds of the first. A lone request never waits. `drain`
    (shutdown begins) ends a window being waited out: the batch in hand runs at once, and later
    ones take no window. When it stops, or its loop dies, every waiting request fails with
    Unavailable (never hangs)."""

    def __init__(self, model: Model, window: float) -> None:
        self.model = model
        self.window = window
        self.max = model.settings.buckets[-1]
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0  # calls made
        self.batched = 0  # requests they carried
        self.error: BaseException | None = None  # why the loop ended, once it has
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wm_jax-act")
        self._task: asyncio.Task | None = None
        self._stopped = False
        self._draining = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopped

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
        self._fail_queued()

    def _fail_queued(self) -> None:
        while not self.queue.empty():
            p = self.queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(Unavailable("the server is shutting down" if self._stopped
                                                   else f"the batcher stopped: {self.error!r}"))

    def drain(self) -> None:
        """Shutdown begins: answer what is queued now instead of at the end of a window (the server
        waits for in-flight requests before it stops the batcher). Call it on the batcher's loop."""
        self.window = 0.0
        self._draining.set()

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_queued()
        self._pool.shutdown(wait=False)

    async def submit(self, carry: tuple[np.ndarray, np.ndarray], obs: np.ndarray) -> dict[str, Any]:
        if not self.alive:
            raise Unavailable("the server is shutting down" if self._stopped else f"the batcher stopped: {self.error!r}")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(carry, obs, future))
        return await future

    async def _wait_for_one(self, batch: list[_Pending], left: float) -> bool:
        """Up to `left` seconds for one more request, appended to `batch`; False when the time ran
        out or `drain` was called first (a request that arrived meanwhile stays queued)."""
        get = asyncio.ensure_future(self.queue.get())
        drained = asyncio.ensure_future(self._draining.wait())
        got = False
        try:
            await asyncio.wait((get, drained), timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when stop() cancels the wait: a request taken off the queue joins the batch
            drained.cancel()
            if get.done() and not get.cancelled():
                batch.append(get.result())
                got = True
            else:
                get.cancel()  # a cancelled get leaves the queue as it was
        return got

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            try:
                deadline = loop.time() + self.window
                while len(batch) < self.max:
                    if not self.queue.empty():
                        batch.append(self.queue.get_nowait())
                        continue
                    left = deadline - loop.time()
                    if left <= 0 or self._draining.is_set():
                        break
                    if not await self._wait_for_one(batch, left):
                        break
                self.batches += 1
                self.batched += len(batch)
                try:
                    rows = await loop.run_in_executor(self._pool, self.model.act, [p.carry for p in batch],
                                                      [p.obs for p in batch])
                # any error of the model call goes to the batch's requests; the loop lives on
                except Exception as e:  # noqa: BLE001
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                for p, row in zip(batch, rows):
                    if not p.future.done():
                        p.future.set_result(row)
            except BaseException:  # cancelled (stop) or dying: the batch in hand must not hang
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Unavailable("the server is shutting down"))
                raise


# ---------------------------------------------------------------------------------------------- sessions


@dataclass
class Session:
    carry: tuple[np.ndarray, np.ndarray]
    steps: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    """At most `cap` sessions; creating one more evicts the least recently used."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: OrderedDict[str, Session] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def create(self, carry: tuple[np.ndarray, np.ndarray]) -> str:
        while len(self._items) >= self.cap:
            self._items.popitem(last=False)
            self.evicted += 1
        sid = uuid.uuid4().hex
        self._items[sid] = Session(carry)
        return sid

    def get(self, sid: str) -> Session | None:
        s = self._items.get(sid)
        if s is not None:
            self._items.move_to_end(sid)
        return s

    def holds(self, sid: str, session: Session) -> bool:
        """Whether `session` is still stored under `sid` (not deleted or evicted); the LRU order stays."""
        return self._items.get(sid) is session

    def delete(self, sid: str) -> bool:
        return self._items.pop(sid, None) is not None


STEP = "wm_jax.step"  # the ASGI scope key under which /act leaves its step for `Outer` to take or drop


@dataclass
class _Step:
    """An /act step computed and answered but not yet taken: its session, whose lock the request
    holds until `Outer` knows whether the answer went out, and the carry it advances to."""

    session: Session
    carry: tuple[np.ndarray, np.ndarray]

    def take(self) -> None:
        self.session.carry = self.carry
        self.session.steps += 1


# ---------------------------------------------------------------------------------------------- metrics


HTTP_METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Request counts and latency histograms, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[int]] = {}
        self.latency_sum: dict[tuple[str, str], float] = {}
        self.gate: dict[str, int] = {}

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"  # a client cannot add label values
        with self._lock:
            self.requests[(method, path, status)] = self.requests.get((method, path, status), 0) + 1
            counts = self.latency.setdefault((method, path), [0] * (len(LATENCY_BUCKETS) + 1))
            for i, edge in enumerate(LATENCY_BUCKETS):
                if seconds <= edge:
                    counts[i] += 1
            counts[-1] += 1
            self.latency_sum[(method, path)] = self.latency_sum.get((method, path), 0.0) + seconds

    def count_gate(self, outcome: str) -> None:
        with self._lock:
            self.gate[outcome] = self.gate.get(outcome, 0) + 1

    def render(self, sessions: int, evicted: int, batches: int, batched: int) -> str:
        lines = ["# HELP wm_jax_requests_total HTTP requests by method, route and status (499: the client left "
                 "before its answer was sent).",
                 "# TYPE wm_jax_requests_total counter"]
        with self._lock:
            for (m, p, s), n in sorted(self.requests.items()):
                lines.append(f'wm_jax_requests_total{{method="{m}",path="{p}",status="{s}"}} {n}')
            lines += ["# HELP wm_jax_request_duration_seconds Time from request to response.",
                      "# TYPE wm_jax_request_duration_seconds histogram"]
            for (m, p), counts in sorted(self.latency.items()):
                labels = f'method="{m}",path="{p}"'
                for edge, n in zip(LATENCY_BUCKETS, counts):
                    lines.append(f'wm_jax_request_duration_seconds_bucket{{{labels},le="{edge}"}} {n}')
                lines.append(f'wm_jax_request_duration_seconds_bucket{{{labels},le="+Inf"}} {counts[-1]}')
                lines.append(f"wm_jax_request_duration_seconds_sum{{{labels}}} {self.latency_sum[(m, p)]:.6f}")
                lines.append(f"wm_jax_request_duration_seconds_count{{{labels}}} {counts[-1]}")
            lines += ["# HELP wm_jax_gate_total /act steps by the gate's outcome.", "# TYPE wm_jax_gate_total counter"]
            for outcome, n in sorted(self.gate.items()):
                lines.append(f'wm_jax_gate_total{{outcome="{outcome}"}} {n}')
        lines += ["# HELP wm_jax_sessions Open sessions.", "# TYPE wm_jax_sessions gauge", f"wm_jax_sessions {sessions}",
                  "# HELP wm_jax_sessions_evicted_total Sessions evicted (least recently used).",
                  "# TYPE wm_jax_sessions_evicted_total counter", f"wm_jax_sessions_evicted_total {evicted}",
                  "# HELP wm_jax_act_batches_total Batched /act calls.", "# TYPE wm_jax_act_batches_total counter",
                  f"wm_jax_act_batches_total {batches}",
                  "# HELP wm_jax_act_batched_requests_total Requests those calls carried.",
                  "# TYPE wm_jax_act_batched_requests_total counter",
                  f"wm_jax_act_batched_requests_total {batched}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ app


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
                step.take()

        try:
            await self._limited(scope, receive_watched, send_watched)
        finally:
            step = scope.pop(STEP, None)
            if step is not None:  # taken or not, the session is free for its next step
                step.session.lock.release()
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
            **pipeline.versions(("wm_jax", "jax", "jaxlib", "flax", "fastapi", "uvicorn", "qwix"), missing=None)}


def create_app(model: Model | Path | str, settings: Settings | None = None) -> Any:
    """The ASGI app: `model` loaded (Model) or a run directory / agent folder that the lifespan
    loads with `settings`. Use it as `TestClient(create_app(...))` or `run(create_app(...))` (uvicorn's
    own `uvicorn.run` serves it too, but waits out a batch window at shutdown)."""
    settings = model.settings if isinstance(model, Model) else (settings or Settings())
    state: dict[str, Any] = {}
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Any):
        m = model if isinstance(model, Model) else await asyncio.to_thread(Model.load, model, settings)
        await asyncio.to_thread(m.warm_up)
        state["model"] = m
        state["sessions"] = Sessions(settings.max_sessions)
        state["batcher"] = Batcher(m, settings.batch_window_ms / 1000.0)
        state["batcher"].start()
        state["dreams"] = ThreadPoolExecutor(1, thread_name_prefix="wm_jax-dream")  # /v1/dream, one at a time
        state["started"] = time.time()
        try:
            yield
        finally:
            await state["batcher"].stop()
            state["dreams"].shutdown(wait=False)

    app = FastAPI(title="wm_jax", version=versions()["wm_jax"], lifespan=lifespan)
    app.state.serve = state  # the model, sessions and batcher, for tests and embedding code

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the field and what is wrong, without echoing the input (a frame stack is 16,384 numbers,
        # and a NaN in it cannot be written as JSON)
        return JSONResponse({"detail": [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
                                        for e in exc.errors()]}, status_code=422)

    def _session(sid: str) -> Session:
        s = state["sessions"].get(sid)
        if s is None:  # sessions live in this process: a restarted server knows none of the old ones
            raise HTTPException(404, f"unknown session {sid!r} (never created, deleted, evicted, or lost when "
                                     f"the server restarted: create a new one)")
        return s

    @app.post("/v1/sessions", status_code=201)
    async def create_session() -> dict[str, Any]:
        sid = state["sessions"].create(state["model"].initial_carry())
        return {"id": sid}

    @app.delete("/v1/sessions/{sid}", status_code=204, response_class=Response)
    async def delete_session(sid: str):
        if not state["sessions"].delete(sid):
            raise HTTPException(404, f"unknown session {sid!r}")
        return Response(status_code=204)

    gone = "session {!r} was deleted or evicted while this step waited; nothing was answered"

    @app.post("/v1/sessions/{sid}/act")
    async def act(sid: str, body: Observation, request: Request) -> dict[str, Any]:
        s = _session(sid)
        m: Model = state["model"]
        # the session's lock stays held after this returns: `Outer` takes the step once its answer
        # went out (or drops it) and then releases it, so a retry waits for that and sees its result
        await s.lock.acquire()
        try:
            if not state["sessions"].holds(sid, s):  # deleted while this request waited for the lock
                raise HTTPException(404, gone.format(sid))
            try:
                row = await state["batcher"].submit(s.carry, body.observation)
            except Unavailable as e:
                raise HTTPException(503, str(e)) from None
            if not state["sessions"].holds(sid, s):  # deleted or evicted during the step
                raise HTTPException(404, gone.format(sid))
            policy_action = int(row["action"])
            out: dict[str, Any] = {"action": policy_action, "policy_action": policy_action, "gate": m.gate,
                                   "step": s.steps}
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
            s.lock.release()
            raise
        request.scope[STEP] = _Step(s, (np.asarray(carry[0]), np.asarray(carry[1])))
        return out

    @app.post("/v1/dream")
    async def dream(body: DreamRequest) -> dict[str, Any]:
        m: Model = state["model"]
        if body.horizon > settings.max_dream_horizon:
            raise HTTPException(422, [{"loc": ["body", "horizon"], "type": "less_than_equal",
                                       "msg": f"horizon must be <= {settings.max_dream_horizon}"}])
        if body.actions is not None and len(body.actions) != body.horizon:
            raise HTTPException(422, [{"loc": ["body", "actions"], "type": "value_error",
                                       "msg": f"actions must hold horizon={body.horizon} entries, "
                                              f"got {len(body.actions)}"}])
        carry = m.initial_carry() if body.session is None else _session(body.session).carry
        res = await asyncio.get_running_loop().run_in_executor(
            state["dreams"], m.dream, carry, body.observation, body.horizon, body.actions, body.frames)
        out = {"horizon": body.horizon, "latents": res["z_next"].tolist(), "actions": res["action"].tolist(),
               "rewards": res["reward"].tolist(), "done_prob": res["p_done"].tolist(),
               "confidence": res["confidence"].tolist() if "confidence" in res else None}
        if body.frames:
            out["frames"] = res["frames"]
        return out

    @app.get("/health")
    async def health() -> dict[str, Any]:
        m: Model = state["model"]
        out = {"status": "ok" if state["batcher"].alive else "unavailable", "model_loaded": True, "source": m.source, "precision": settings.precision,
               "gate": m.gate, "verifier": m.has_verifier, "lookahead": settings.lookahead,
               "threshold": settings.threshold, "safe_action": settings.safe_action,
               "sessions": len(state["sessions"]), "max_sessions": settings.max_sessions,
               "buckets": list(settings.buckets), "preset": m.cfg.preset, "seed": m.cfg.seed, "versions": versions()}
        if not m.has_verifier:
            out["note"] = "no verifier: the gate is off (train one with `wm-jax train-verifier RUN_DIR`)"
        return out

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        b = state["batcher"]
        return metrics.render(len(state["sessions"]), state["sessions"].evicted, b.batches, b.batched)

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
