"""Shared fixtures: a sidecar on a loopback port, pointed at whatever upstream a test starts."""

from __future__ import annotations

import copy
import faulthandler
import io
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop
from rawupstream import Answer, RawUpstream, Received
from redisserver import redis_server, redis_url  # noqa: F401  (fixtures for every test module)

from proxy.app import Sidecar
from proxy.config import config_from_dict

# pytest-timeout stops a test's timer as soon as the test fails (to let a debugger in), so a
# teardown that then hangs (a fixture stopping a sidecar whose store is gone) would hang the
# whole run, and with it every landing behind it. Teardowns get their own bound.
TEARDOWN_LIMIT = 60.0


def _teardown_hung(nodeid: str) -> None:
    sys.stderr.write(f"\n+++ teardown of {nodeid} still running after {TEARDOWN_LIMIT:g} s +++\n")
    faulthandler.dump_traceback(all_threads=True)
    os._exit(1)  # xdist reports the worker crashed with this test, and goes on


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    """Bound every teardown, also after a failure (when pytest-timeout no longer watches)."""
    timer = threading.Timer(TEARDOWN_LIMIT, _teardown_hung, (item.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Run every async test on uvloop, the loop the sidecar runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
async def make_sidecar() -> AsyncIterator[Callable[..., Any]]:
    """Start sidecars (``await make_sidecar(upstream_url, **sections)``); stopped at the end."""
    started: list[Sidecar] = []

    async def make(
        upstream_url: str | None,
        *,
        sleep: Any = None,
        rand: Any = None,
        observers: Any = None,
        clock: Any = None,
        secret_keys: Any = None,
        client_token: Any = None,
        wall: Any = None,
        environ: Any = None,
        **sections: Any,
    ) -> Sidecar:
        data = _merge(
            {
                "server": {"listen": "127.0.0.1:0", "drain_period": 0, "shutdown_grace": 2.0},
                "upstream": {"override": upstream_url},
            },
            sections,
        )
        extra = {
            k: v
            for k, v in (
                ("sleep", sleep), ("rand", rand), ("observers", observers), ("clock", clock),
                ("secret_keys", secret_keys), ("client_token", client_token),
                ("wall", wall), ("environ", environ),
            )
            if v is not None
        }
        stream = io.StringIO()
        sidecar = Sidecar(config_from_dict(data), log_stream=stream, **extra)
        sidecar.log_stream = stream  # type: ignore[attr-defined]
        await sidecar.start()
        sidecar.url = f"http://127.0.0.1:{sidecar.port}"  # type: ignore[attr-defined]
        started.append(sidecar)
        return sidecar

    yield make
    for s in started:
        await s.stop()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Callable[[Received], Answer]], Any]]:
    """Start scriptable raw upstreams (``await raw_upstream(handler)``); stopped at the end."""
    started: list[RawUpstream] = []

    async def make(handler: Callable[[Received], Answer]) -> RawUpstream:
        up = await RawUpstream(handler).start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()
