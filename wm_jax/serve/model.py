"""The served agent's programs: Settings (validated, with the memory they need), Model (V, M, C and
K in float32 or INT8, and the jitted, bucket-padded /act and /v1/dream programs)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models import controller, imagination, transition, vae, verifier
from wm_jax.search import rollout
from wm_jax.agent import Agent
from wm_jax.presets import with_compute_dtype
from wm_jax.store.collection import TooLarge, memory_bytes
from wm_jax.envs.cartpole import NUM_ACTIONS


OBS_SHAPE = (64, 64, 4)
OBS_BYTES = int(np.prod(OBS_SHAPE))
GATES = ("off", "observe", "enforce")
DECODE_CHUNK = 10  # /v1/dream decodes its frames this many at a time (one compiled shape)
PRECISIONS = ("float32", "int8")
MAX_LOOKAHEAD = 10_000  # imagined steps per /act: past this a step costs seconds of sequential work
MAX_BATCH_WINDOW_MS = 1000.0  # longer than a second of waiting for company is a stall, not batching


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
    the look-ahead's trajectory for lookahead + 1 steps, held twice (its two parts, then joined).
    "dream": the /v1/dream program's max_dream_horizon steps. A step of a trajectory keeps h, z, z',
    M's prediction (3 latent x K mixture floats, reward, done), the action, K's confidence and the
    alive flag. "sessions": every session's carry at max_sessions. About: XLA's own buffers and the
    parameters are not counted."""
    f32, hidden, latent = 4, cfg.transition.hidden, cfg.vae.latent
    per_step = (hidden + latent * (2 + 3 * transition.components(cfg.transition)) + 5) * f32
    side, encoder = OBS_SHAPE[0], 0
    for width in cfg.vae.filters:  # four stride-2 4x4 valid convolutions: 64 -> 31 -> 14 -> 6 -> 2
        side = (side - 4) // 2 + 1
        encoder += side * side * width * f32
    example = OBS_BYTES * (1 + f32) + encoder + 3 * 2 * hidden * f32
    if gate:
        example += 2 * (settings.lookahead + 1) * per_step
    return {"act": settings.buckets[-1] * example,
            "dream": settings.max_dream_horizon * per_step + OBS_BYTES * (1 + f32) + encoder,
            "sessions": settings.max_sessions * (2 * hidden * f32 + SESSION_BYTES)}


def memory() -> tuple[int | None, int | None]:
    """(the default device's memory when it reports one, this machine's physical memory); None
    where unknown (a platform without sysconf, a device without memory stats)."""
    host = memory_bytes()
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
    device, host = memory()
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
        # /v1/dream under the policy or under given actions: one program each
        self._dreams = {use: jax.jit(partial(_dream, self.cfg, settings.max_dream_horizon, use)) for use in (True, False)}
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
        """Compile every bucket's program (and both dreams') before the first request."""
        for b in self.settings.buckets:
            self.act([self.initial_carry()] * b, [np.zeros(OBS_SHAPE, np.uint8)] * b)
        self.dream(self.initial_carry(), np.zeros(OBS_SHAPE, np.uint8), 1, None, frames=True)
        self.dream(self.initial_carry(), np.zeros(OBS_SHAPE, np.uint8), 1, [0])

    def dream(self, carry: tuple[np.ndarray, np.ndarray], obs: np.ndarray, horizon: int, actions: list[int] | None,
              frames: bool = False) -> dict[str, Any]:
        steps = self.settings.max_dream_horizon
        given = np.zeros((steps,), np.int32)
        if actions is not None:
            given[:len(actions)] = actions
        out = jax.device_get(self._dreams[actions is None](self.params, carry, obs, given))
        res = {k: np.asarray(v[:horizon]) for k, v in out.items()}
        if frames:  # the horizon's frames only, decoded in chunks of one compiled size
            z = np.zeros((-(-horizon // DECODE_CHUNK) * DECODE_CHUNK, self.latent), np.float32)
            z[:horizon] = res["z_next"]
            pixels = np.concatenate([np.asarray(self._decode(self.params["vae"], z[i:i + DECODE_CHUNK]))
                                     for i in range(0, len(z), DECODE_CHUNK)])[:horizon]
            res["frames"] = [png(p) for p in pixels]
        return res


def _policy(cfg: Any, ctrl: jax.Array):
    """C's choice on M's state (carry, z): the policy the look-ahead and /v1/dream dream under."""
    return lambda carry, z: controller.act(cfg.controller, ctrl, z, transition.hidden(carry))


def _lookahead(cfg: Any, params: dict[str, Any], carry: Any, z: jax.Array, a: jax.Array, length: int
               ) -> tuple[jax.Array, jax.Array, Any]:
    """K's mean confidence over the agent's step (carry, z, a) and `length` imagined steps after it
    under the policy, up to where M's done head ends the dream; the dreamed return (reward head,
    Ha's done rule); and the carry after the agent's step. Deterministic (M's most likely latent at
    every step). One example; vmapped by the caller."""
    tcfg, cell = cfg.transition, params["transition"]
    carry, first = imagination.imagine(tcfg, cell, None, carry, z, 1, actions=a[None], deterministic=True)
    _, rest = imagination.imagine(tcfg, cell, None, carry, first["z_next"][0], length,
                                  policy=_policy(cfg, params["controller"]), deterministic=True)
    traj = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), first, rest)
    conf = verifier.confidence(cfg.verifier, params["verifier"], traj["h"], traj["z"], traj["action"], traj["z_next"])
    # the steps the dream lived (the first always does): after M's done head fires, the imagined
    # transitions cannot happen and are not scored
    live = transition.alive(transition.ends(transition.p_done(traj["pred"])))
    return jnp.sum(conf * live) / jnp.sum(live), jnp.sum(traj["pred"].reward * live), carry


def _act_batch(cfg: Any, lookahead: int, safe_action: int | None, gate: bool, params: dict[str, Any],
               carry: tuple[jax.Array, jax.Array], obs: jax.Array) -> dict[str, Any]:
    # the agent's own step (rollout.agent_act), over the batch
    action, mean, _ = jax.vmap(lambda c, o: rollout.agent_act(cfg, params, c, o))(carry, obs)
    cell = params["transition"]
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


def _dream(cfg: Any, steps: int, use_policy: bool, params: dict[str, Any], carry: Any, obs: jax.Array,
           given: jax.Array) -> dict[str, jax.Array]:
    """`steps` imagined steps from (carry, obs) under the policy (use_policy) or the `given` actions;
    deterministic (M's most likely latent at each step), so the same request always dreams the same."""
    mean, _ = vae.encode(cfg.vae, params["vae"], obs[None])
    how = {"policy": _policy(cfg, params["controller"])} if use_policy else {"actions": given}
    _, traj = imagination.imagine(cfg.transition, params["transition"], None, carry, mean[0], steps,
                                  deterministic=True, **how)
    out = {"z": traj["z"], "action": traj["action"], "z_next": traj["z_next"], "reward": traj["pred"].reward,
           "p_done": transition.p_done(traj["pred"])}
    if params["verifier"] is not None:
        out["confidence"] = verifier.confidence(cfg.verifier, params["verifier"], traj["h"], traj["z"],
                                                traj["action"], traj["z_next"])
    return out


def png(pixels: np.ndarray) -> str:
    """A decoded stack [64, 64, 4] in [0, 1]: its newest frame as a base64 grayscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels[..., -1] * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
