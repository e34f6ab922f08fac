"""Replicas on Ray Serve (`wm-jax serve RUN --replicas MIN:MAX --sessions redis://...`): the same app
(`create_app`) as a Ray Serve deployment behind `serve.ingress`, MIN to MAX replicas autoscaled on
ongoing requests, every session in the one Redis they share.

Each replica is a Ray actor that loads the agent, compiles its programs and serves them with its
own batcher (concurrent /act that reach one replica still run as one call); it keeps no session
of its own, so any replica answers any session, and one that dies costs only the requests it was
computing. Its programs come from JAX's persistent compilation cache (the directory the command
uses, handed to every replica), so a replica started by the autoscaler loads what the first one
compiled instead of compiling again.

Ray joins the cluster `ray start` made on this machine (or RAY_ADDRESS names), else starts one here:
`ray start --head` on one machine and `ray start --address HEAD:6379` on another make the replicas
span both. The `scale` extra (ray[serve]) is imported only here, when replicas are asked for.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from wm_jax.serve.app import create_app
from wm_jax.serve.model import Settings

APP = "wm_jax"  # the Ray Serve application's and deployment's name
PASSED_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "WM_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")


class ScaleError(RuntimeError):
    """Ray Serve cannot run as asked (the scale extra missing, no cluster to join): one line."""


def ray_serve() -> Any:
    """The `ray.serve` module, or ScaleError saying how to install it."""
    try:
        from ray import serve as ray_serve_module
    except ImportError as e:
        raise ScaleError(f"--replicas needs Ray Serve ({e.name} is missing): pip install -e '.[scale]'") from None
    return ray_serve_module


def autoscaling(replicas: tuple[int, int], target: float = 8.0, upscale_s: float = 3.0,
                downscale_s: float = 60.0) -> dict[str, Any]:
    """Ray Serve's autoscaling: MIN to MAX replicas, aiming at `target` requests in flight per
    replica (the batcher's sweet spot on two cores is a few; a replica admits up to 64, the
    largest bucket), scaling up after `upscale_s` seconds above it and down after `downscale_s`."""
    low, high = replicas
    return {"min_replicas": low, "max_replicas": high, "initial_replicas": low, "target_ongoing_requests": target,
            "upscale_delay_s": upscale_s, "downscale_delay_s": downscale_s, "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0}


def deployment(run: str, settings: Settings, sessions: str, ttl: float | None, replicas: tuple[int, int],
               cache: str | None = None, **scaling: float) -> Any:
    """The bound Ray Serve application: the app of `create_app(run, settings, sessions, ttl)` on
    MIN..MAX autoscaled replicas (`autoscaling` with `scaling`), each using the compilation `cache`."""
    serve = ray_serve()
    fields = dataclasses.asdict(settings)

    @serve.ingress()
    class Replica:
        """One replica: the app is built in the replica's process (`__serve_build_asgi_app__`),
        and Ray Serve runs its lifespan (load, warm up, start the batcher) before it takes traffic."""

        def __init__(self) -> None:
            self.started = time.time()

        def __serve_build_asgi_app__(self) -> Any:
            if cache:
                import jax

                jax.config.update("jax_compilation_cache_dir", cache)
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
            return create_app(run, Settings(**fields), sessions=sessions, session_ttl=ttl)

    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    options = {"num_cpus": 1, "runtime_env": {"env_vars": env}} if env else {"num_cpus": 1}
    return serve.deployment(Replica, name=APP, autoscaling_config=autoscaling(replicas, **scaling),
                            max_ongoing_requests=settings.buckets[-1], ray_actor_options=options,
                            health_check_period_s=2.0, health_check_timeout_s=10.0,
                            graceful_shutdown_timeout_s=5.0).bind()


def join() -> None:
    """ray.init: join the cluster `ray start` made on this machine (or RAY_ADDRESS names), else start
    one here, with this process's SIGINT and SIGTERM handlers left in place.

    Ray's driver would take SIGTERM twice: ray.init sets a handler that raises SystemExit wherever
    it lands (a signal halfway through ray.init left Ray's agents behind and, in two of eight
    tries, crashed the process at exit), and its core worker installs absl's failure-signal handler, which
    aborts the process (SIGABRT, every Ray process left running). This process's handler defers a
    signal until ray.init returns instead (`run`). Only this driver is concerned: Ray's own
    processes and the replicas keep their handlers."""
    import ray
    from ray._private import ray_constants
    from ray._private import utils as ray_utils

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    kept = getattr(ray_utils, "set_sigterm_handler", None)
    ray_utils.set_sigterm_handler = lambda handler: None  # ray.init calls it through the module
    try:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False, ignore_reinit_error=True)
    except ConnectionError as e:
        raise ScaleError(f"cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
    finally:
        if kept is None:
            del ray_utils.set_sigterm_handler
        else:
            ray_utils.set_sigterm_handler = kept


def start(run: str, settings: Settings, sessions: str, ttl: float | None, replicas: tuple[int, int],
          host: str = "127.0.0.1", port: int = 8000, cache: str | None = None, on_join: Any = None,
          **scaling: float) -> float:
    """Join (or start) a Ray cluster (`join`, then call `on_join`), start Ray Serve's HTTP proxy on
    host:port and deploy the app; returns once MIN replicas answer, with the seconds that took."""
    serve = ray_serve()
    t0 = time.perf_counter()
    join()
    if on_join is not None:
        on_join()
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(run, settings, sessions, ttl, replicas, cache, **scaling), name=APP, route_prefix="/",
              blocking=False)
    return time.perf_counter() - t0


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (ended, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def outlive(pids: list[int], seconds: float) -> None:
    """Wait up to `seconds` for `pids` to end, then SIGKILL those left. Ray's agents outlive the
    raylet that started them by a few seconds when Ray was stopped while it started."""
    deadline = time.monotonic() + seconds
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in filter(running, pids):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def stop() -> None:
    """Ray Serve's application and proxy shut down, and this process leaves the cluster (a cluster
    that `ray start` made lives on; one started here ends, and every process it started with it).
    Not connected to Ray (a signal during ray.init), nothing is asked of Serve: serve.shutdown
    would start a cluster to ask."""
    serve = ray_serve()
    import ray

    started = descendants(os.getpid())
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        outlive(started, 10.0)


def run(run_dir: str, settings: Settings, sessions: str, ttl: float | None, replicas: tuple[int, int],
        host: str = "127.0.0.1", port: int = 8000) -> None:
    """`start`, then serve until SIGINT or SIGTERM, then `stop`. A signal while Ray starts takes
    effect once it is up (`join`); one while the replicas deploy interrupts that (KeyboardInterrupt,
    after `stop`); one while serving ends the wait; one while stopping is noted only: the stop
    completes."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    done = threading.Event()
    phase = "joining"

    def on_signal(signum: int, frame: Any) -> None:
        done.set()
        if phase == "deploying":
            raise KeyboardInterrupt

    def handle() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def joined() -> None:
        nonlocal phase
        phase = "deploying"
        handle()  # again: a cluster joined may have installed handlers of its own
        if done.is_set():  # a signal came while Ray started
            raise KeyboardInterrupt

    handle()
    try:
        try:
            ready = start(run_dir, settings, sessions, ttl, replicas, host, port, cache, on_join=joined)
        finally:
            phase = "up"
        print(f"ready in {ready:.1f} s: {replicas[0]} replica(s), autoscaled up to {replicas[1]}", flush=True)
        while not done.wait(1.0):
            pass
    finally:
        stop()
