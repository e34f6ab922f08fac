"""A real Redis for the tests: Debian's redis-server on 127.0.0.1 at a free port, in a temporary
folder, started and stopped by its PID. scripts/test.sh installs redis-server where it is missing,
so the tests that use it skip only where it cannot be installed (not root, no apt), and say so."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (scripts/test.sh "
                                                               "installs it as root: apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """redis-server on 127.0.0.1:`port` keeping its files in `folder`; with `appendonly` every write
    is in the append-only file before it is acknowledged (fsync always), so a restart keeps it."""

    def __init__(self, folder: Path, appendonly: bool = False) -> None:
        self.folder, self.appendonly = folder, appendonly
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
               "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
               "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.ping():
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "redis-server did not answer PING within 20 s"
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown save (the append-only file has every acknowledged write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def redis_process(tmp_path):
    """A fresh redis-server with an append-only file, stopped at the end of the test."""
    r = RedisProcess(tmp_path / "redis", appendonly=True).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    """One redis-server for a test file (the tests use distinct sessions)."""
    r = RedisProcess(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    try:
        yield r
    finally:
        r.stop()
