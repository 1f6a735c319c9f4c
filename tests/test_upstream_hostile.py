"""A misbehaving upstream, on real loopback sockets: extra answers, impossible statuses, endless
heads, local fd exhaustion; and the slow sides of streaming (a client pausing a large answer, a
slow but steady upload), which must never be blamed on the wrong side."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from rawclient import exchange, open_raw
from rawupstream import json_answer
from test_hardening import poll, read_answer, script
from unit.fakeclock import FakeClock
from waiting import waits_for_the_client

from proxy.breaker import BreakerState
from proxy.config import config_from_dict
from proxy.errors import ConfigError

OK = json_answer(200, b'{"id":"cus_1","object":"customer"}', b"Request-Id: req_ok")
GET = b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n"


def post(key: bytes = b"k-1", body: bytes = b"amount=100") -> bytes:
    """A keyed form POST (retryable when the answer is a gateway error)."""
    return (
        b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nIdempotency-Key: %s\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%b"
        % (key, len(body), body)
    )


def _count(sc: Any, name: str, outcome: str) -> float:
    total = 0.0
    for metric in sc.registry.collect():
        for sample in metric.samples:
            if sample.name == name and sample.labels.get("outcome") == outcome:
                total += sample.value
    return total


def attempts(sc: Any, outcome: str) -> float:
    """Upstream attempts with ``outcome``, over every operation."""
    return _count(sc, "stripe_sidecar_upstream_attempts_total", outcome)


def requests_with(sc: Any, outcome: str) -> float:
    """Client requests recorded with the final ``outcome``, over every operation and status."""
    return _count(sc, "stripe_sidecar_requests_total", outcome)


# -- 1. pool poisoning ----------------------------------------------------------------------------


async def test_extra_answer_in_the_same_read_never_reaches_another_client(raw_upstream, make_sidecar):
    """A second (bodyless) answer head after a framed answer closes the connection: the next client's POST runs once and is answered right."""
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # promises a body that never comes
    created = json_answer(200, b'{"id":"cus_new","object":"customer"}')
    up = await raw_upstream(lambda r: OK + extra if r.method == "GET" else created)
    sc = await make_sidecar(up.url)
    first, _ = await exchange(sc.port, GET)
    second, _ = await exchange(sc.port, post())
    assert first[0].status == 200 and first[0].body == b'{"id":"cus_1","object":"customer"}'
    assert second[0].status == 200, second[0]
    assert second[0].json()["id"] == "cus_new"
    posts = [r for r in up.received if r.method == "POST"]
    assert len(posts) == 1
    assert posts[0].conn_id != up.received[0].conn_id  # the poisoned connection was not reused


async def test_partial_extra_head_in_the_same_read_never_swallows_the_next_answer(raw_upstream, make_sidecar):
    """The first bytes of a second answer, arriving with the first, close the connection before a second request can reuse it."""
    up = await raw_upstream(lambda r: OK + b"HTTP/1.1 200 OK\r\nX-" if len(up.received) == 1 else OK)
    sc = await make_sidecar(up.url)
    first, _ = await exchange(sc.port, GET)
    second, _ = await exchange(sc.port, GET)
    assert [first[0].status, second[0].status] == [200, 200]
    assert second[0].body == first[0].body
    assert up.received[1].conn_id != up.received[0].conn_id


async def test_bytes_arriving_while_pooled_close_the_connection(raw_upstream, make_sidecar):
    """Bytes an upstream sends on an idle pooled connection make the sidecar drop it, never read them as an answer."""
    transports: list[asyncio.Transport] = []

    async def answer_and_keep(transport: asyncio.Transport) -> None:
        transports.append(transport)
        transport.write(OK)

    up = await raw_upstream(lambda r: answer_and_keep if not transports else OK)
    sc = await make_sidecar(up.url)
    pool = sc.forwarder.pools["api"]
    first, _ = await exchange(sc.port, GET)
    await poll(lambda: pool.idle_count == 1, what="the connection to be pooled")
    transports[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")  # unasked
    await poll(lambda: pool.idle_count == 0, what="the poisoned connection to be dropped")
    second, _ = await exchange(sc.port, GET)
    assert first[0].status == 200
    assert second[0].status == 200 and second[0].body == first[0].body
    assert up.received[1].conn_id != up.received[0].conn_id


# -- 2. impossible status codes and reason phrases --------------------------------------------------


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 000 OK", b"HTTP/1.1 600 OK", b"HTTP/1.1 099 OK", b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 200 OK\x7f"],
)
async def test_impossible_status_line_is_a_stripe_shaped_502(raw_upstream, make_sidecar, status_line):
    """A status outside 100-599 or a control character in the reason is a 502, never forwarded; the next answer on the client connection is framed right."""
    bad = status_line + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    up = await raw_upstream(lambda r: bad if r.target.endswith(b"cus_1") else OK)
    sc = await make_sidecar(up.url, retry={"max_attempts": 2, "base_delay": 0.001, "max_delay": 0.002})
    data = GET + b"GET /v1/customers/cus_2 HTTP/1.1\r\nHost: x\r\n\r\n"
    answers, _ = await exchange(sc.port, data, answers=2)
    assert [a.status for a in answers] == [502, 200], answers
    assert answers[0].json()["error"]["code"] == "sidecar_upstream_bad_response"
    assert answers[0].json()["error"]["type"] == "api_error"
    assert answers[1].body == b'{"id":"cus_1","object":"customer"}'
    # A gateway error for the breakers, and retried like one (GET: twice).
    assert attempts(sc, "gateway_error") == 2


async def test_keyed_post_is_retried_after_an_impossible_status(raw_upstream, make_sidecar):
    """A POST with an idempotency key whose first answer has status 000 is retried with the same key and succeeds."""
    bad = b"HTTP/1.1 000 Nope\r\nContent-Length: 0\r\n\r\n"
    up = await raw_upstream(script(bad, OK))
    sc = await make_sidecar(up.url, retry={"base_delay": 0.001, "max_delay": 0.002})
    answers, _ = await exchange(sc.port, post(b"key-000"))
    assert answers[0].status == 200
    assert [r.header("Idempotency-Key") for r in up.received] == [b"key-000", b"key-000"]


# -- 3. response head limits ------------------------------------------------------------------------


async def test_endless_header_is_cut_at_the_limit_not_buffered(raw_upstream, make_sidecar):
    """A 100 MB header line gets a 502 and the upstream connection is dropped long before 100 MB are taken."""
    sent = [0]

    async def endless_header(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        piece = b"a" * 65536
        while sent[0] < 100 << 20 and not transport.is_closing():
            transport.write(piece)
            sent[0] += len(piece)
            while transport.get_write_buffer_size() > 1 << 20 and not transport.is_closing():
                await asyncio.sleep(0.005)

    up = await raw_upstream(lambda r: endless_header)
    sc = await make_sidecar(up.url, retry={"max_attempts": 1})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 502
    assert answers[0].json()["error"]["code"] == "sidecar_upstream_bad_response"
    await poll(lambda: up.connections == 1 and not up._transports, what="the upstream connection to close")
    # What the kernel's socket buffers hold aside, the sidecar took no more than the limit.
    assert sent[0] < 24 << 20, sent[0]


@pytest.mark.parametrize(("extra_headers", "status"), [(98, 200), (99, 502)])
async def test_header_count_limit(raw_upstream, make_sidecar, extra_headers, status):
    """An answer with more than upstream.max_headers fields (here 100) is a 502; one at the limit passes."""
    lines = [b"X-H%d: v" % i for i in range(extra_headers)]
    answer = json_answer(200, b"{}", *lines)  # plus Content-Type and Content-Length
    up = await raw_upstream(lambda r: answer)
    sc = await make_sidecar(up.url, retry={"max_attempts": 1})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == status


async def test_head_byte_limit_counts_partial_reads(raw_upstream, make_sidecar):
    """upstream.max_header_bytes bounds the whole head even when it trickles in: under passes, over is a 502."""

    def trickled(size: int) -> Any:
        answer = json_answer(200, b"{}", b"X-Pad: " + b"p" * size)

        async def write(transport: asyncio.Transport) -> None:
            for i in range(0, len(answer), 100):
                transport.write(answer[i : i + 100])
                await asyncio.sleep(0)

        return write

    up = await raw_upstream(lambda r: trickled(1500 if r.target.endswith(b"cus_1") else 2500))
    sc = await make_sidecar(up.url, upstream={"max_header_bytes": 2048}, retry={"max_attempts": 1})
    small, _ = await exchange(sc.port, GET)
    large, _ = await exchange(sc.port, b"GET /v1/customers/cus_2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert small[0].status == 200
    assert large[0].status == 502


async def test_trailers_never_become_headers(raw_upstream, make_sidecar):
    """A trailer on a chunked answer is not passed on as a header of the buffered answer."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nStripe-Should-Retry: true\r\nX-Trailer: 1\r\n\r\n"
    )
    up = await raw_upstream(lambda r: answer)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200 and answers[0].body == b"{}"
    assert answers[0].header("X-Trailer") is None
    assert answers[0].header("Stripe-Should-Retry") is None


def test_head_limits_are_validated_with_their_key_paths():
    """Zero or negative head limits and write timeout are refused, each named by its key path."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(
            {"upstream": {"max_header_bytes": 0, "max_headers": -1}, "server": {"write_timeout": 0}}
        )
    text = str(info.value)
    assert "upstream.max_header_bytes: 0 is not a positive number" in text
    assert "upstream.max_headers: -1 is not a positive number" in text
    assert "server.write_timeout: 0 is not a positive number" in text


# -- 4. a client pausing a large streamed answer ------------------------------------------------------


def upstream_paused(sc: Any) -> bool:
    """Whether the one client's streamed answer has its upstream connection paused for the client."""
    return [c._streaming is not None and c._streaming.conn._reading_paused for c in sc.server.connections] == [True]


def large_answer(size: int) -> bytes:
    """A Content-Length framed answer of ``size`` body bytes (well over the buffer limit)."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: %d\r\n\r\n%b" % (
        size,
        b"x" * size,
    )


async def test_paused_client_gets_the_whole_stream_after_the_attempt_timeout(raw_upstream, make_sidecar):
    """A client that stops reading a streamed answer for several attempt timeouts (within write_timeout)
    still gets all of it, recorded as a success."""
    size = 48 << 20  # more than loopback socket buffers hold, so the client's pause holds the upstream
    up = await raw_upstream(lambda r: large_answer(size))
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        upstream={"buffer_limit": 65536},
        retry={"attempt_timeout": 5.0},
        server={"write_timeout": 60.0},
    )
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/quotes/qt_1/pdf HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await poll(lambda: upstream_paused(sc), what="the upstream paused for the client")
    # Not reading, for eleven attempt timeouts: a silence timer running now would cut it.
    for _ in range(11):
        clock.advance(5.0)
        assert sc.deadlines.sweep() == 0
    got = 0
    async with asyncio.timeout(20):
        while got < size:
            chunk = await reader.read(1 << 20)
            assert chunk, f"cut after {got} of {size} bytes"
            got += len(chunk)
    writer.close()
    await poll(lambda: sc.metrics.in_flight == 0, what="the request to be recorded")
    assert requests_with(sc, "success") == 1
    assert requests_with(sc, "connection_error") == 0


async def test_client_stalling_past_the_write_timeout_is_cut_and_not_a_success(raw_upstream, make_sidecar):
    """A client that takes nothing of a streamed answer is cut off at server.write_timeout on the clock (not
    before), recorded as client_stalled; the upstream is not read meanwhile."""
    size = 64 << 20
    sent = [0]

    async def paced(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"x" * 65536
        while sent[0] < size and not transport.is_closing():
            transport.write(piece)
            sent[0] += len(piece)
            while transport.get_write_buffer_size() > 1 << 20 and not transport.is_closing():
                await asyncio.sleep(0.005)

    up = await raw_upstream(lambda r: paced)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        upstream={"buffer_limit": 65536},
        retry={"attempt_timeout": 5.0},
        server={"write_timeout": 60.0},
    )
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/quotes/qt_1/pdf HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await poll(lambda: upstream_paused(sc), what="the upstream paused for the client")
    clock.advance(59.75)
    assert sc.deadlines.sweep() == 0
    assert requests_with(sc, "client_stalled") == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    await poll(lambda: requests_with(sc, "client_stalled") == 1, timeout=10, what="the stall to be recorded")
    writer.close()
    assert requests_with(sc, "success") == 0
    # Memory stayed bounded by pausing: beyond what kernel buffers hold, the upstream was not read.
    assert sent[0] < 40 << 20, sent[0]


# -- 5. a slow but steady upload ------------------------------------------------------------------

SLOW = {"body_timeout": 10.0, "body_deadline": 300.0}


async def body_read(sc: Any, size: int) -> None:
    """Wait until the one client connection has read ``size`` body bytes and waits for more."""
    await poll(
        lambda: [(c._body_bytes, c.waiting_for) for c in sc.server.connections] == [(size, "body")],
        what=f"{size} body bytes read",
    )


async def paced(sc: Any, clock: FakeClock, writer: asyncio.StreamWriter, piece: bytes, pieces: int) -> None:
    """Send ``pieces`` pieces, 8 s apart on the clock (within body_timeout), sweeping as time passes."""
    for n in range(1, pieces + 1):
        writer.write(piece)
        if n == pieces:
            return
        await body_read(sc, n * len(piece))
        # The clock may jump only once the attempt waits on the client (not still connecting).
        await poll(lambda: waits_for_the_client(sc), what="the attempt to wait for the client")
        clock.advance(8.0)
        assert sc.deadlines.sweep() == 0, f"cut after {n} pieces"


async def test_slow_steady_upload_outlasting_the_attempt_timeout_succeeds(raw_upstream, make_sidecar):
    """An upload paced over many attempt timeouts (each pause longer than one, within body_timeout) is sent
    whole and answered: the time the client takes is never charged to Stripe, never a 504."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=SLOW, retry={"attempt_timeout": 5.0, "max_replay_body": 100})
    piece = b"p" * 1000
    pieces = 30  # one every 8 s: 240 s in all, 48 attempt timeouts
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(piece) * pieces))
    await paced(sc, clock, writer, piece, pieces)
    answer = await read_answer(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert [len(r.body) for r in up.received] == [len(piece) * pieces]
    assert attempts(sc, "timeout") == 0


async def test_upstream_silent_after_a_slow_upload_is_a_504(raw_upstream, make_sidecar):
    """Once the whole slow upload is sent, an upstream that never answers is Stripe's timeout (504),
    attempt_timeout on the clock after the last byte (not counting the upload's time)."""
    up = await raw_upstream(lambda r: (lambda transport: asyncio.sleep(0)))
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=SLOW, retry={"attempt_timeout": 5.0, "max_replay_body": 100})
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    await paced(sc, clock, writer, b"p" * 500, 10)
    await poll(lambda: len(up.received) == 1, what="the whole upload upstream")
    clock.advance(4.75)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    answer = await read_answer(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 504"), answer
    assert len(up.received) == 1 and len(up.received[0].body) == 5000


async def test_stalled_upload_is_the_clients_408_not_stripes_504(raw_upstream, make_sidecar):
    """An upload stalling longer than attempt_timeout (but within body_timeout) is not cut as Stripe's timeout; the door's 408 ends it."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url, clock=clock, server=SLOW, retry={"attempt_timeout": 2.0, "max_replay_body": 100}
    )
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 200)
    await poll(lambda: up.connections == 1, what="the upload to start upstream")
    await body_read(sc, 200)
    # Connected, not still connecting: the clock jump must not expire the connect timeout.
    await poll(lambda: waits_for_the_client(sc), what="the attempt to wait for the client")
    clock.advance(9.75)  # many attempt timeouts, within body_timeout
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"sidecar_body_timeout" in data
    assert attempts(sc, "timeout") == 0


# -- 6. local resource exhaustion -----------------------------------------------------------------


async def test_local_fd_exhaustion_is_a_503_and_never_opens_a_breaker(raw_upstream, make_sidecar, monkeypatch):
    """EMFILE at connect is answered 503 sidecar_overloaded with Retry-After, tried once, no breaker opens; requests succeed once fds are back."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        up.url,
        breaker={"consecutive_failures": 3, "min_calls": 5},
        host_breaker={"consecutive_failures": 3, "min_calls": 5, "min_failing_operations": 1},
    )
    pool = sc.forwarder.pools["api"]
    real = pool._create_connection
    calls = [0]

    async def out_of_fds(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(pool, "_create_connection", out_of_fds)
    answers, _ = await exchange(sc.port, GET * 20, answers=20)
    assert [a.status for a in answers] == [503] * 20
    error = answers[0].json()["error"]
    assert error["code"] == "sidecar_overloaded" and error["type"] == "api_error"
    assert answers[0].header("Retry-After") == b"1"
    assert calls[0] == 20  # one connect per request: no retry loop on a local fault
    assert all(b.state is BreakerState.CLOSED for b in sc.forwarder.breakers().values())
    assert not up.received

    monkeypatch.setattr(pool, "_create_connection", real)
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200
    assert requests_with(sc, "local_resources") == 20


@pytest.mark.parametrize(("trailers", "status"), [(98, 200), (99, 502)])
async def test_trailer_fields_count_against_the_header_limit(raw_upstream, make_sidecar, trailers, status):
    """A chunked answer's trailer fields count against upstream.max_headers with its head's: at the limit passes, over is a 502."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(trailers)) + b"\r\n"
    )
    up = await raw_upstream(lambda r: answer)
    sc = await make_sidecar(up.url, retry={"max_attempts": 1})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == status


async def test_trailers_over_the_limit_in_a_later_read_are_a_502(raw_upstream, make_sidecar):
    """Trailer fields arriving in reads after the head's are counted too: over the limit is a 502."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    rest = b"2\r\n{}\r\n0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(120)) + b"\r\n"

    async def write(transport: asyncio.Transport) -> None:
        transport.write(head)
        for i in range(0, len(rest), 50):
            await asyncio.sleep(0)
            transport.write(rest[i : i + 50])

    up = await raw_upstream(lambda r: write)
    sc = await make_sidecar(up.url, retry={"max_attempts": 1})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 502


async def test_fields_of_a_trickled_head_after_an_interim_answer_pass_exactly(raw_upstream, make_sidecar):
    """An interim 103's fields are dropped; the final head, arriving a few bytes per read, passes its fields with their values exact."""
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + json_answer(
        200, b"{}", b"Request-Id:   req_trickled", b"X-Odd:\tv  ", b"Stripe-Should-Retry: false"
    )

    async def write(transport: asyncio.Transport) -> None:
        for i in range(0, len(answer), 7):
            transport.write(answer[i : i + 7])
            await asyncio.sleep(0)

    up = await raw_upstream(lambda r: write)
    sc = await make_sidecar(up.url, retry={"max_attempts": 1})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200 and answers[0].body == b"{}"
    assert answers[0].header("Link") is None
    assert answers[0].header("Request-Id") == b"req_trickled"
    assert answers[0].header("Stripe-Should-Retry") == b"false"
    assert answers[0].header("X-Odd") == b"v  "


async def test_head_over_the_field_limit_is_a_502_before_it_ends(raw_upstream, make_sidecar):
    """A head that has sent more than upstream.max_headers fields is a 502 at once, even though it never ends."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(102))

    async def write(transport: asyncio.Transport) -> None:
        transport.write(head)  # and nothing more: the head never ends

    up = await raw_upstream(lambda r: write)
    sc = await make_sidecar(up.url, retry={"max_attempts": 1, "attempt_timeout": 30.0})
    answers, _ = await asyncio.wait_for(exchange(sc.port, GET), 10)
    assert answers[0].status == 502
