"""A sidecar as a real process (``python -m proxy serve``) with a config of the test's own.

For tests that need what only processes give: several replicas sharing a store, SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from ports import accepts, free_port

__all__ = ["SidecarProcess"]


class SidecarProcess:
    """``python -m proxy serve --config <tmp>/sidecar.yaml`` on a free port; log in a file."""

    def __init__(self, directory: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = {"drain_period": 0, "shutdown_grace": 2.0, **config.get("server", {})}
        server["listen"] = f"127.0.0.1:{self.port}"
        self.config = {**config, "server": server}
        self.config_path = directory / "sidecar.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = directory / "sidecar.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProcess:
        """Start the process (see :meth:`started` to wait until it listens)."""
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )  # fmt: skip
        log.close()
        return self

    async def started(self, timeout: float = 20.0) -> None:
        """Poll until the port accepts; the process must not exit meanwhile."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(accepts, self.port):
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < deadline, "the sidecar never listened"
            await asyncio.sleep(0.05)

    def log(self) -> str:
        """Everything the process wrote."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        """Parsed log lines of one event."""
        return [
            json.loads(line) for line in self.log().splitlines() if f'"event":"{name}"' in line
        ]

    def kill(self) -> None:
        """SIGKILL, as a node failure or the OOM killer would; waits for the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode
