"""Running the simulator: in-process for tests and the demo, blocking for the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from proxy.simulator.faults import FaultProfile, profile_from_mapping
from proxy.simulator.server import SIMULATOR, create_app
from proxy.simulator.state import SimState


class SimulatorHandle:
    """A running simulator: its address, and its books and faults without going over HTTP."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"

    @property
    def _state(self) -> SimState:
        return self.app[SIMULATOR]

    def books(self) -> dict[str, Any]:
        """A snapshot of the books (same shape as `GET /_sim/books`)."""
        return self._state.books_dict()

    def set_profile(self, profile: FaultProfile | str, *, seed: int | None = None) -> None:
        """Switch the fault profile; a `seed` restarts the fault sequence."""
        self._state.set_profile(profile, seed=seed)

    def revoke_key(self, key: str) -> None:
        """Make ``key`` fail with 401 from now on (like `POST /_sim/keys/revoke`)."""
        self._state.keys.revoke(key)

    def reset(self) -> None:
        """Clear books, objects and idempotency keys (like `POST /_sim/reset`)."""
        self._state.reset()


@contextlib.asynccontextmanager
async def start_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    profile: FaultProfile | str = "none",
    seed: int = 0,
) -> AsyncIterator[SimulatorHandle]:
    """Serve the simulator on `host:port` (0 picks a free port) for the `async with` block."""
    app = create_app(profile, seed=seed)
    # Short shutdown: a test that leaves a slow request behind should not wait a minute.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield SimulatorHandle(app, host, bound_port)
    finally:
        await runner.cleanup()


def run_simulator(
    host: str, port: int, profile: str, seed: int, limits: Mapping[str, float] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; print one line with the URL once listening.

    ``limits`` sets the profile's rate limits (``account_rate``, ``account_burst``,
    ``endpoint_rate``, ``endpoint_burst``) on top of the named profile.
    """
    # An unknown name or a bad limit fails here (ValueError), before any socket opens.
    resolved = profile_from_mapping({"profile": profile, **(limits or {})})
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, profile, resolved, seed, limits or {}))


async def _serve(host: str, port: int, name: str, profile: FaultProfile, seed: int,
                 limits: Mapping[str, float]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with start_simulator(host, port, profile, seed) as sim:
            extra = "".join(f", {k}={v:g}" for k, v in limits.items())
            print(f"stripe simulator listening on {sim.url} (profile={name}, seed={seed}{extra})",
                  flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
