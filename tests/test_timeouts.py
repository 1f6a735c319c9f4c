"""Every client-side time-out is driven by the sidecar's injected clock: a test moves a fake clock
and sweeps, and nothing waits on the wall clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rawclient import open_raw
from rawupstream import json_answer
from unit.fakeclock import FakeClock

OK = json_answer(200, b'{"object":"balance"}', b"Request-Id: req_1")
GET = b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"
LIMITS = {"header_timeout": 10.0, "idle_timeout": 75.0, "body_timeout": 10.0, "body_deadline": 300.0}


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``condition`` until it holds, failing after ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not condition():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def waiting_for(sc, what: str) -> None:
    """Wait until the sidecar's one client connection waits for ``what`` (head, body, idle...)."""
    await until(lambda: [c.waiting_for for c in sc.server.connections] == [what])


async def test_a_head_that_stops_gets_408_when_the_clock_passes_header_timeout(raw_upstream, make_sidecar):
    """Just before header_timeout nothing happens; at it, 408 sidecar_header_timeout and a close."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=LIMITS)
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n")
    await waiting_for(sc, "head")
    clock.advance(9.99)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.01)
    assert sc.deadlines.sweep() == 1
    async with asyncio.timeout(5):
        data = await reader.read()
    assert data.startswith(b"HTTP/1.1 408 ") and b"sidecar_header_timeout" in data
    assert up.received == []
    writer.close()


async def test_an_idle_kept_alive_connection_closes_at_idle_timeout(raw_upstream, make_sidecar):
    """After an answer the connection stays open until idle_timeout on the clock, then closes."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=LIMITS)
    reader, writer = await open_raw(sc.port)
    writer.write(GET)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    await waiting_for(sc, "idle")
    clock.advance(74.9)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.1)
    assert sc.deadlines.sweep() == 1
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_a_body_that_stops_gets_408_at_body_timeout_and_is_never_forwarded(raw_upstream, make_sidecar):
    """A small body that stalls: 408 sidecar_body_timeout once body_timeout passes on the clock."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=LIMITS)
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nname")
    await waiting_for(sc, "body")
    clock.advance(10.0)
    assert sc.deadlines.sweep() == 1
    async with asyncio.timeout(5):
        data = await reader.read()
    assert data.startswith(b"HTTP/1.1 408 ") and b"sidecar_body_timeout" in data
    assert up.received == []
    writer.close()
