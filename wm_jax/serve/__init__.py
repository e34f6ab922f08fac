"""A trained agent behind HTTP: FastAPI, one jitted program per request batch, a verifier gate.

    wm-jax serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--int8] [--gate observe|enforce|off]
                 [--sessions memory|redis://HOST:PORT/DB] [--session-ttl S] [--replicas MIN:MAX]

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
live in this process's memory (a restart loses them all: their ids answer 404) or in Redis, which
every replica shares (redis_sessions); with --replicas the app runs as Ray Serve replicas (scale).

Requests that arrive within `batch_window_ms` of each other run as one jitted call on a batch
padded to the next of `buckets` (compiled at start-up, so load never recompiles). `run` serves
with uvicorn and, at the first SIGINT or SIGTERM, answers a batch waiting out its window at once.
Settings that cannot be honoured are refused before anything is compiled: out of range, or a
look-ahead, bucket or session cap whose memory exceeds half of this machine's (`memory_need`).
Precision: "float32" (V, M and K in float32, whatever the run trained in) or "int8" (V and M
quantized after training, wm_jax.models.quant; K stays float32).

The package: model (Settings and their memory, Model and its jitted programs), batching (Batcher),
sessions (the store interface, Sessions in memory, the step an /act leaves for Outer),
redis_sessions (RedisSessions), metrics (Prometheus text), app (request parsing, Outer,
create_app, run), scale (Ray Serve replicas). Its public names are re-exported here.
"""

from wm_jax.serve.app import (
    DreamRequest, Observation, Outer, Server, check_port, create_app, open_sessions, parse_observation, run, versions,
)
from wm_jax.serve.batching import Batcher, Unavailable
from wm_jax.serve.metrics import CLIENT_CLOSED, Metrics
from wm_jax.serve.model import (
    GATES,
    MAX_BATCH_WINDOW_MS,
    MAX_LOOKAHEAD,
    OBS_SHAPE,
    PRECISIONS,
    Model,
    Settings,
    check_memory,
    memory,
    memory_need,
)
from wm_jax.serve import redis_sessions, scale
from wm_jax.serve.redis_sessions import RedisSessions, check_url
from wm_jax.serve.sessions import STEP, Busy, Held, Session, Sessions, Step, StoreDown

__all__ = [
    "CLIENT_CLOSED", "GATES", "MAX_BATCH_WINDOW_MS", "MAX_LOOKAHEAD", "OBS_SHAPE", "PRECISIONS", "STEP", "Batcher",
    "Busy", "DreamRequest", "Held", "Metrics", "Model", "Observation", "Outer", "RedisSessions", "Server", "Session",
    "Sessions", "Settings", "Step", "StoreDown", "Unavailable", "check_memory", "check_port", "check_url", "create_app",
    "memory", "memory_need", "open_sessions", "parse_observation", "run", "versions",
]
