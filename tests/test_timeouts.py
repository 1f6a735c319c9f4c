"""Every client-side time-out is driven by the sidecar's injected clock: a test moves a fake clock
and sweeps, and nothing waits on the wall clock."""

from __future__ import annotations

import asyncio
import socket

from prometheus_client.parser import text_string_to_metric_families
from rawclient import open_raw
from rawupstream import json_answer
from unit.fakeclock import FakeClock
from waiting import poll as until

OK = json_answer(200, b'{"object":"balance"}', b"Request-Id: req_1")
GET = b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"
LIMITS = {"header_timeout": 10.0, "idle_timeout": 75.0, "body_timeout": 10.0, "body_deadline": 300.0}


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


# -- upstream side: attempts, connects, streams, waits for a slot ------------------------------


def never(release: asyncio.Event):
    """An upstream answer held until ``release`` is set, then the connection is dropped."""

    async def hold(transport: asyncio.Transport) -> None:
        await release.wait()
        transport.abort()

    return hold


async def test_an_unanswered_attempt_times_out_at_attempt_timeout_on_the_clock(raw_upstream, make_sidecar):
    """Stripe silent: nothing before attempt_timeout, then 504 sidecar_upstream_timeout."""
    release = asyncio.Event()
    up = await raw_upstream(lambda r: never(release))
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, retry={"max_attempts": 1, "attempt_timeout": 10.0})
    reader, writer = await open_raw(sc.port)
    writer.write(GET)
    await until(lambda: len(up.received) == 1)
    clock.advance(9.9)
    sc.deadlines.sweep()
    clock.advance(0.1)
    sc.deadlines.sweep()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504 ")
    release.set()
    writer.close()


async def test_a_connect_that_hangs_fails_at_connect_timeout_on_the_clock(raw_upstream, make_sidecar):
    """A connect that never completes is abandoned at upstream.connect_timeout: 502, not a hang."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url, clock=clock, retry={"max_attempts": 1}, upstream={"connect_timeout": 5.0}
    )
    pool = sc.forwarder.pools["api"]
    started = asyncio.Event()

    async def hanging(*args, **kwargs):
        started.set()
        await asyncio.Event().wait()

    pool._create_connection = hanging
    reader, writer = await open_raw(sc.port)
    writer.write(GET)
    async with asyncio.timeout(5):
        await started.wait()
    clock.advance(4.9)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.1)
    assert sc.deadlines.sweep() == 1
    async with asyncio.timeout(5):
        data = await reader.readuntil(b"}}")
    assert data.startswith(b"HTTP/1.1 502 ") and b"timed out" in data
    writer.close()


async def test_a_wait_for_a_bulkhead_slot_ends_at_max_wait_on_the_clock(raw_upstream, make_sidecar):
    """With the one slot taken, the next request waits max_wait on the clock, then 503."""
    release = asyncio.Event()
    answers = [never(release)]
    up = await raw_upstream(lambda r: answers.pop() if answers else OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url, clock=clock, bulkhead={"max_in_flight": 1, "max_wait": 2.0}, retry={"max_attempts": 1}
    )
    _, first_w = await open_raw(sc.port)
    first_w.write(GET)
    await until(lambda: len(up.received) == 1)
    second_r, second_w = await open_raw(sc.port)
    second_w.write(GET)
    await until(lambda: len(sc.forwarder.bulkhead._waiters) == 1)
    clock.advance(1.9)
    sc.deadlines.sweep()
    clock.advance(0.1)
    sc.deadlines.sweep()
    async with asyncio.timeout(5):
        head = await second_r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Sidecar-Outcome: bulkhead_full" in head
    assert len(up.received) == 1
    release.set()
    first_w.close()
    second_w.close()


async def test_a_streamed_answer_that_goes_silent_is_cut_at_attempt_timeout_on_the_clock(raw_upstream, make_sidecar):
    """Half of a large answer, then silence: cut when attempt_timeout passes, recorded as a failure."""
    release = asyncio.Event()
    size = 3 * 1024 * 1024

    def half(r):
        async def write(transport: asyncio.Transport) -> None:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            transport.write(b"x" * (size // 2))
            await release.wait()

        return write

    up = await raw_upstream(half)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, retry={"attempt_timeout": 10.0})
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/files/file_1/contents HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    async with asyncio.timeout(5):
        while len(got) < size // 2:
            got += await reader.read(1 << 20)
    clock.advance(10.0)
    sc.deadlines.sweep()
    async with asyncio.timeout(5):
        while rest := await reader.read(1 << 20):
            got += rest
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and size // 2 <= len(body) < size  # truncated, not a hang
    def answered() -> set[str]:
        return {
            s.labels["outcome"]
            for family in text_string_to_metric_families(sc.metrics.render().decode())
            if family.name == "stripe_sidecar_requests"
            for s in family.samples
        }

    await until(lambda: bool(answered()))
    assert answered() == {"connection_error"}
    release.set()
    writer.close()


async def test_a_client_that_never_reads_its_answers_is_cut_at_write_timeout(raw_upstream, make_sidecar):
    """Pipelined requests for large answers, never read: held until write_timeout, then cut."""
    big = json_answer(200, b'{"data":"' + b"x" * (900 * 1024) + b'"}')
    up = await raw_upstream(lambda r: big)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server={**LIMITS, "write_timeout": 60.0})
    _, writer = await open_raw(sc.port)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(GET * 20)
    await waiting_for(sc, "client_to_read")
    forwarded = len(up.received)
    assert forwarded < 20  # backpressure: the rest wait for the client
    clock.advance(59.9)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.1)
    assert sc.deadlines.sweep() == 1
    await until(lambda: not sc.server.connections)
    assert len(up.received) == forwarded
    writer.close()
