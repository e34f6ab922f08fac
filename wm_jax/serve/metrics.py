"""Request counts and latencies, gate outcomes and batching, in Prometheus' text format."""

from __future__ import annotations

import threading




CLIENT_CLOSED = 499  # /metrics status of a request whose client left before its answer went out (nginx's)



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
