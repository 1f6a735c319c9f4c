"""A real ``redis-server`` for tests: one process per test, on a free loopback port, in a temp dir.

Each test (and so each xdist worker) starts its own server: nothing is shared between tests,
and no daemon or system service is used. The server has no persistence unless a test asks for
it (``RedisServer(tmp_path, appendonly=True)``). ``make test`` installs Debian's
``redis-server`` when it is missing.

Fixtures: ``redis_server`` (a started :class:`RedisServer`), ``redis_url`` (its URL).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port

__all__ = ["RedisServer", "redis_server", "redis_url"]

_BINARY = "redis-server"


def _ping(port: int) -> bool:
    """True if a Redis server answers PING on ``port`` (a raw RESP exchange, no client)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; :meth:`start`, then :meth:`stop` (or use as a context)."""

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None):
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait (polling, with a deadline) until it answers PING."""
        binary = shutil.which(_BINARY)
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (apt-get)")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--daemonize", "no", "--save", "", "--logfile", str(self.directory / "redis.log"),
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.proc.poll() is not None:
                log = self.directory / "redis.log"
                text = log.read_text() if log.exists() else ""
                pytest.fail(f"redis-server exited with {self.proc.returncode}: {text[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer PING within {timeout} s")
            time.sleep(0.01)  # polling a child process we just started, with a deadline
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; :meth:`start` brings it back."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started ``redis-server`` of this test's own (no persistence); stopped afterwards."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of this test's own ``redis-server``."""
    return redis_server.url
