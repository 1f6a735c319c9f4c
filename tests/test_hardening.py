"""Edge cases of the I/O core found in review, on real loopback sockets: streamed uploads that
break off or stall, pipelining, pool hygiene, bulkhead fairness, HTTP/1.0, draining."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import httptools
import pytest
from rawclient import exchange, open_raw
from rawupstream import Received, held, json_answer
from unit.fakeclock import FakeClock
from waiting import poll, waits_for_the_client

OK = json_answer(200, b'{"id":"cus_1","object":"customer"}', b"Request-Id: req_ok")
HTML_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: 17\r\n\r\n"
    b"<h1>overload</h1>"
)
GET = b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n"
BALANCE = b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"


class Sleeps:
    """A sleep that returns at once (no waiting in tests)."""

    async def __call__(self, delay: float) -> None:
        return None


def script(*answers: bytes) -> Callable[[Received], bytes]:
    """Answer with each of ``answers`` in turn, then repeat the last."""
    queue = list(answers)

    def handler(r: Received) -> bytes:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Read one complete Content-Length framed answer (head + body), or fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
    return head + body


# -- 1. door refusal in the middle of a streamed upload ------------------------------------------


async def test_bad_chunk_framing_mid_upload_ends_the_pipeline_run(raw_upstream, make_sidecar):
    """A streamed upload cut off at the door (malformed chunk) ends its run and frees its bulkhead slot
    at once: no time passes on the clock, so no time-out can be what ends it."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        up.url,
        clock=FakeClock(),
        bulkhead={"max_in_flight": 1, "max_wait": 1.0},
        retry={"max_replay_body": 100},
    )
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await poll(lambda: up.connections >= 1, what="the upload to start upstream")
    writer.write(b"zz-not-hex\r\n")
    async with asyncio.timeout(5):
        await reader.read()  # refused: the sidecar closes the connection
    writer.close()
    await poll(lambda: sc.metrics.in_flight == 0, what="the pipeline run of the refused upload to end")
    answers, _ = await exchange(sc.port, BALANCE)
    assert answers[0].status == 200, answers[0].body


async def test_body_over_limit_mid_upload_frees_the_bulkhead_slot(raw_upstream, make_sidecar):
    """A chunked upload that grows past max_body_bytes mid-stream frees its bulkhead slot at once (the
    clock stands still, so no time-out can be what frees it)."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        up.url,
        clock=FakeClock(),
        server={"max_body_bytes": 1000},
        bulkhead={"max_in_flight": 1, "max_wait": 1.0},
        retry={"max_replay_body": 100},
    )
    reader, writer = await open_raw(sc.port)
    chunk = b"a" * 600
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    await poll(lambda: up.connections >= 1, what="the upload to start upstream")
    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    async with asyncio.timeout(5):
        await reader.read()
    writer.close()
    await poll(lambda: sc.metrics.in_flight == 0, what="the upload's run to end")
    answers, _ = await exchange(sc.port, BALANCE)
    assert answers[0].status == 200, answers[0].body


# -- 2. pipelined streamed upload behind a busy request ------------------------------------------


async def test_pipelined_chunked_upload_behind_a_slow_request_completes(raw_upstream, make_sidecar):
    """A chunked upload pipelined behind a slow request gets its body read and is answered."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow if r.method == "GET" else OK)
    sc = await make_sidecar(up.url, clock=FakeClock(), retry={"max_replay_body": 100})
    reader, writer = await open_raw(sc.port)
    writer.write(GET + b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    await poll(lambda: len(up.received) >= 1, what="the GET upstream")
    writer.write(b"5\r\nhello\r\n0\r\n\r\n")  # the body follows its head a little later
    release.set()
    first = await read_answer(reader, 5)
    assert first.startswith(b"HTTP/1.1 200")
    try:
        second = await read_answer(reader, 5)
    except TimeoutError:
        second = b"<no answer within 5 s>"
    writer.close()
    assert second.startswith(b"HTTP/1.1 200"), second
    assert [r.body for r in up.received if r.method == "POST"] == [b"hello"]


# -- 3. a stalled upload body and the attempt timeout --------------------------------------------


async def test_stalled_upload_is_answered_when_the_body_times_out(raw_upstream, make_sidecar):
    """An upload whose client stops sending gets a 408 (and frees its slot) once server.body_timeout passes
    on the clock, even with an attempt_timeout as short."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url, clock=clock, server={"body_timeout": 10.0}, retry={"attempt_timeout": 10.0, "max_replay_body": 100}
    )
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 200)
    await poll(lambda: up.connections == 1, what="the upload to start upstream")
    await poll(
        lambda: [(c._body_bytes, c.waiting_for) for c in sc.server.connections] == [(200, "body")],
        what="the 200 bytes read",
    )
    # Connected, not still connecting: the clock jump must not expire the connect timeout.
    await poll(lambda: waits_for_the_client(sc), what="the attempt to wait for the client")
    clock.advance(9.75)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    try:
        async with asyncio.timeout(5):
            data = await reader.read(65536)
    except TimeoutError:
        data = b"<nothing within 5 s>"
    in_flight = sc.metrics.in_flight
    writer.close()
    # The client's body stalled, so the answer is the client's 408, and Stripe is not blamed.
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"sidecar_body_timeout" in data
    assert in_flight == 0
    assert sc.registry.get_sample_value("stripe_sidecar_upstream_attempts_total", {"operation": "POST /v1/files", "outcome": "timeout"}) is None


# -- 4. early upstream answer during a streamed upload -------------------------------------------


class EarlyUpstream(asyncio.Protocol):
    """Answers a POST with 400 as soon as its head arrives (keep-alive), then keeps reading its body."""

    def __init__(self, server: EarlyServer) -> None:
        self.server = server
        server.count += 1
        self.conn_id = server.count
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.server.heads.append((self.conn_id, method))
        if method == "POST":
            self.transport.write(json_answer(400, b'{"error":{"type":"invalid_request_error"}}'))
            self.server.early.set()

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.server.completed.append((self.conn_id, method))
        if method != "POST":
            self.transport.write(OK)


class EarlyServer:
    def __init__(self) -> None:
        self.count = 0
        self.transports: list[asyncio.BaseTransport] = []
        self.heads: list[tuple[int, str]] = []
        self.completed: list[tuple[int, str]] = []
        self.early = asyncio.Event()

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: EarlyUpstream(self), "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.close()
        for t in self.transports:
            t.abort()


async def test_connection_with_an_unsent_request_body_is_not_reused(make_sidecar):
    """After an early answer cuts an upload short, that upstream connection never carries another request."""
    early = EarlyServer()
    url = await early.start()
    try:
        sc = await make_sidecar(url, clock=FakeClock(), retry={"enabled": False, "max_replay_body": 100})
        reader, writer = await open_raw(sc.port)
        # POST /v1/customers goes to the same (api) pool as the GET below.
        writer.write(b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        async with asyncio.timeout(5):
            await early.early.wait()
        writer.write(b"b" * 900)  # the rest of the body; the answer is already on its way
        first = await read_answer(reader, 5)
        assert first.startswith(b"HTTP/1.1 400")
        writer.close()
        answers, _ = await exchange(sc.port, BALANCE)
        assert answers[0].status == 200, (answers[0].status, early.heads, early.completed)
    finally:
        early.stop()


# -- 5. bulkhead: one operation's queue blocks another --------------------------------------------


async def test_full_compartment_does_not_block_other_operations(raw_upstream, make_sidecar):
    """A request queued for one operation's full compartment does not make other operations wait or fail."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow if r.target.startswith(b"/v1/customers") else OK)
    sc = await make_sidecar(
        up.url,
        bulkhead={"max_wait": 30.0},
        operations={"GET /v1/customers/{customer}": {"limits": {"max_in_flight": 1}}},
    )
    first = asyncio.create_task(exchange(sc.port, GET))
    await poll(lambda: len(up.received) == 1, what="the first GET upstream")
    second = asyncio.create_task(exchange(sc.port, GET))  # queues for the customers compartment
    bulkhead = sc.forwarder.bulkhead
    await poll(lambda: len(bulkhead._waiters) == 1, what="the second GET to queue")
    other, _ = await exchange(sc.port, BALANCE)
    still_queued = not second.done()  # the other operation did not wait for the queue
    release.set()
    await first
    await second
    assert other[0].status == 200, other[0].body
    assert still_queued
    assert (await second)[0][0].status == 200


# -- 6. pipelining: a bad request behind a good one ------------------------------------------------


async def test_refused_pipelined_request_does_not_swallow_the_answer_before_it(raw_upstream, make_sidecar):
    """A valid request followed on the same connection by one refused at the door still gets its answer."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, closed = await exchange(sc.port, GET + b"GET /not-stripe HTTP/1.1\r\nHost: x\r\n\r\n", answers=2, check_closed=True)
    assert closed
    assert [a.status for a in answers][:1] == [200], [(a.status, a.body) for a in answers]


# -- 7. an Idempotency-Key named in Connection ------------------------------------------------------


async def test_post_never_goes_twice_without_a_key_when_key_is_hop_by_hop(raw_upstream, make_sidecar):
    """An Idempotency-Key named in Connection is kept end to end: the retry goes out under the app's key."""
    up = await raw_upstream(script(HTML_503, OK))
    sc = await make_sidecar(up.url, sleep=Sleeps())
    raw = (
        b"POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Idempotency-Key\r\n"
        b"Idempotency-Key: app-key-1\r\nContent-Length: 11\r\n\r\namount=2000"
    )
    answers, _ = await exchange(sc.port, raw)
    assert answers[0].status == 200
    assert answers[0].header("Sidecar-Attempts") == b"2"
    assert [r.header("Idempotency-Key") for r in up.received] == [b"app-key-1", b"app-key-1"]


# -- 8. HTTP/1.0 clients and streamed answers -----------------------------------------------------


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n", b"Proxy-Connection: keep-alive\r\n"])
async def test_http10_client_never_gets_a_chunked_answer(raw_upstream, make_sidecar, connection):
    """A streamed answer of unknown length to an HTTP/1.0 client (kept alive or not) is not
    chunk-framed (RFC 9112 7.1)."""
    release = asyncio.Event()
    first, rest = b"a" * 40000, b"b" * 40000

    async def stream(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nTransfer-Encoding: chunked\r\n\r\n")
        transport.write(b"%x\r\n%b\r\n" % (len(first), first))
        await release.wait()
        transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(rest), rest))

    up = await raw_upstream(lambda r: stream)
    sc = await make_sidecar(up.url, upstream={"buffer_limit": 16384})
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/quotes/qt_1/pdf HTTP/1.0\r\nHost: x\r\n" + connection + b"\r\n")
    data = b""
    async with asyncio.timeout(5):
        while b"a" * 1000 not in data:
            data += await reader.read(65536)
        release.set()  # the rest only once the answer is being streamed
        data += await reader.read(-1)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" not in head.lower(), head
    assert body == first + rest


# -- 9. client aborts count against the breaker ---------------------------------------------------


async def test_clients_abandoning_uploads_do_not_open_the_breaker(raw_upstream, make_sidecar):
    """Uploads cut short by their clients are not upstream failures: the breaker stays closed."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        up.url,
        retry={"max_replay_body": 100},
        breaker={"consecutive_failures": 2, "min_calls": 100},
    )
    for i in range(2):
        _reader, writer = await open_raw(sc.port)
        writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 200)
        await poll(lambda n=i + 1: up.connections >= n, what="the upload to start upstream")
        writer.transport.abort()  # the user cancelled the upload
        await poll(lambda: sc.metrics.in_flight == 0, what="the run to end")
    answers, _ = await exchange(sc.port, b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert answers[0].status == 200, answers[0].body


# -- 10. HEAD answers and the pool ---------------------------------------------------------------


async def test_head_answer_with_zero_length_keeps_the_connection_pooled(raw_upstream, make_sidecar):
    """A HEAD answered with Content-Length: 0 leaves its keep-alive connection reusable."""
    up = await raw_upstream(
        lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if r.method == "HEAD" else OK
    )
    sc = await make_sidecar(up.url)
    for _ in range(3):
        answers, _ = await exchange(sc.port, b"HEAD /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n", head_only=True)
        assert answers[0].status == 200
    assert up.connections == 1


# -- 11. backpressure: a paused upstream connection back in the pool -----------------------------


async def test_connection_paused_by_a_slow_client_is_not_pooled_paused(raw_upstream, make_sidecar):
    """An upstream connection paused for a slow client's streamed answer reads again when reused."""
    go = asyncio.Event()
    first, rest = b"a" * 20_000, b"b" * 100_000

    async def big(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: %d\r\n\r\n" % (len(first) + len(rest)))
        transport.write(first)
        await go.wait()
        transport.write(rest)  # arrives in one read, together with the end of the answer

    up = await raw_upstream(lambda r: big if r.target.startswith(b"/v1/customers") else OK)
    sc = await make_sidecar(
        up.url, clock=FakeClock(), upstream={"buffer_limit": 16384}, retry={"enabled": False}
    )
    pool = sc.forwarder.pools["api"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow client: small window, not reading
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sc.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(GET)
    await poll(lambda: any(c._streaming is not None for c in sc.server.connections), what="streaming")
    for c in sc.server.connections:  # a constrained path to the client: small kernel send buffer
        c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    go.set()
    await poll(lambda: pool.idle_count == 1, what="the upstream connection back in the pool")
    async with asyncio.timeout(5):  # now the slow client reads it all
        got = b""
        while not got.endswith(rest):
            got += await reader.read(65536)
    writer.close()
    answers, _ = await exchange(sc.port, BALANCE)
    assert answers[0].status == 200, answers[0].body


# -- 12. limiter tokens taken by requests the bulkhead then refuses --------------------------------


async def test_requests_refused_by_the_bulkhead_give_their_rate_token_back(raw_upstream, make_sidecar):
    """A request shed by the bulkhead (never sent) does not use up the rate limit of later requests."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow if r.target.startswith(b"/v1/customers") else OK)
    sc = await make_sidecar(
        up.url,
        sleep=Sleeps(),
        bulkhead={"max_in_flight": 1, "max_wait": 0.0},
        ratelimit={"enabled": True, "global_rate": 0.01, "global_burst": 3, "max_wait": 0.01},
    )
    first = asyncio.create_task(exchange(sc.port, GET))
    await poll(lambda: len(up.received) == 1, what="the first GET upstream")
    shed = [(await exchange(sc.port, BALANCE))[0][0].status for _ in range(2)]
    release.set()
    await first
    later, _ = await exchange(sc.port, BALANCE)
    assert shed == [503, 503]
    assert later[0].status == 200, later[0].body  # 3 tokens, only 1 request ever sent


# -- 13. SIGTERM drain: the last answer on a connection says so -----------------------------------


async def test_answer_finished_during_drain_says_connection_close(raw_upstream, make_sidecar):
    """An in-flight request finished while draining gets its answer with Connection: close."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow)
    sc = await make_sidecar(up.url)
    reader, writer = await open_raw(sc.port)
    writer.write(GET)
    await poll(lambda: len(up.received) == 1, what="the GET upstream")
    stopping = asyncio.create_task(sc.stop())
    await poll(lambda: sc.server.closing, what="the drain to end")
    release.set()
    answer = await read_answer(reader, 5)
    assert await stopping
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"\r\nconnection: close\r\n" in answer.lower(), answer


# -- passing regression test (kept: a tricky path that works today) -------------------------------


async def test_regression_client_gone_mid_stream_drops_the_upstream_connection(raw_upstream, make_sidecar):
    """PASSES TODAY (regression guard): a client leaving (reset) mid streamed answer closes that upstream
    connection at once (the clock stands still: no silence timer does it); the next request works."""
    never = asyncio.Event()
    first = b"a" * 40_000

    async def big(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: 100000\r\n\r\n" + first)
        await never.wait()  # the rest never comes

    up = await raw_upstream(lambda r: big if r.target.startswith(b"/v1/customers") else OK)
    sc = await make_sidecar(up.url, clock=FakeClock(), upstream={"buffer_limit": 16384}, retry={"enabled": False})
    reader, writer = await open_raw(sc.port)
    writer.write(GET)
    async with asyncio.timeout(5):
        got = b""
        while b"a" * 1000 not in got:
            got += await reader.read(65536)
    # Gone, not half-closed: a reset (a FIN alone would be a half-close, whose answer still goes on).
    linger_zero = struct.pack("ii", 1, 0)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    writer.transport.abort()
    await poll(lambda: not up._transports, what="the upstream connection to close")
    answers, _ = await exchange(sc.port, BALANCE)
    assert answers[0].status == 200
    assert up.connections == 2
