"""Hostile clients on real loopback sockets: unread pipelines, endless header and trailer lines,
stalled and trickled bodies, half-closes, smuggled trailers, odd versions, broken uploads."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from rawclient import exchange, open_raw
from rawupstream import Received, held, json_answer
from unit.fakeclock import FakeClock
from waiting import poll, waits_for_the_client

from proxy.server import ClientConnection

OK = json_answer(200, b'{"id":"cus_1","object":"customer"}', b"Request-Id: req_ok")
GET = b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n"
UPLOAD_HEAD = b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_good\r\n"


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """One Content-Length framed answer: (head, body)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
    return head, body


async def read_to_close(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the sidecar closes the connection."""
    async with asyncio.timeout(timeout):
        return await reader.read()


def the_connection(sc) -> ClientConnection:
    """The sidecar's only client connection."""
    (conn,) = sc.server.connections
    return conn


# -- 1. backpressure on every answer --------------------------------------------------------------


async def test_unread_pipelined_answers_stop_the_sidecar_from_starting_more(raw_upstream, make_sidecar):
    """300 pipelined requests for 900 KiB answers, never read: few reach Stripe, the rest wait; all arrive in order later."""
    size = 900 * 1024

    def big(r: Received) -> bytes:
        n = int(r.target.rsplit(b"_", 1)[1])
        return json_answer(200, b"%06d" % n + b"x" * (size - 6))

    up = await raw_upstream(big)
    sc = await make_sidecar(up.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sc.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4 << 20)
    await poll(lambda: len(sc.server.connections) == 1, what="the connection")
    conn = the_connection(sc)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    writer.write(b"".join(b"GET /v1/customers/cus_%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(300)))
    # The client reads nothing: the sidecar must come to rest, its write buffer full, not busy,
    # the remaining requests queued rather than forwarded.
    await poll(lambda: conn._write_paused and not conn.busy and bool(conn._queue), what="the sidecar to hold back")
    forwarded = len(up.received)
    buffered = conn.transport.get_write_buffer_size()
    assert forwarded <= 16, forwarded
    assert buffered <= 2 * size, buffered
    seen = []
    for _ in range(300):
        head, body = await read_answer(reader, 20)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert len(body) == size
        seen.append(int(body[:6]))
    writer.close()
    assert seen == list(range(300))
    assert len(up.received) == 300


# -- 2. endless header and trailer lines -----------------------------------------------------------


async def feed_until(
    writer: asyncio.StreamWriter, conn: ClientConnection, piece: bytes, refused: Callable[[], bool]
) -> int:
    """Write ``piece`` after ``piece`` of a line that never ends until ``refused()``; bytes sent.

    Each piece is its own read: the next goes once the sidecar has taken the last one in.
    """
    sent = 0
    while not refused() and sent < 1 << 20:
        before = conn._stalled_bytes
        writer.write(piece)
        sent += len(piece)
        await poll(lambda b=before: refused() or conn._stalled_bytes > b, what="the piece to be read")
    return sent


async def test_header_line_that_never_ends_gets_431_at_the_limit(raw_upstream, make_sidecar):
    """A header value fed in pieces that never ends is refused with 431 once past max_header_bytes."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_header_bytes": 8192})
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/customers HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    await poll(lambda: len(sc.server.connections) == 1 and the_connection(sc)._req is not None, what="the head to start")
    conn = the_connection(sc)
    piece = b"a" * 1024
    sent = await feed_until(writer, conn, piece, lambda: conn.closed)
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    assert b"sidecar_headers_too_large" in data
    assert sent <= 8192 + 2 * len(piece), sent
    assert up.received == []


async def fields_until_refused(raw_upstream, make_sidecar, line: bytes, limit: int) -> tuple[bytes, int]:
    """Send a head that never ends, ``line`` after ``line``, each its own read: (answer, bytes sent)."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_header_bytes": limit})
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/customers HTTP/1.1\r\n")
    await poll(lambda: len(sc.server.connections) == 1 and the_connection(sc)._req is not None, what="the head to start")
    conn = the_connection(sc)

    def state() -> tuple[int, int, int]:
        return conn._stalled_bytes, conn._head_bytes, len(conn._head)

    sent = 28
    while not conn.closed and sent < 1 << 20:
        before = state()
        writer.write(line)
        sent += len(line)
        # httptools hands a field over when the next one starts; either way the read shows.
        await poll(lambda b=before: conn.closed or state() != b, what="the field to be read")
    data = await read_to_close(reader)
    writer.close()
    assert up.received == []
    return data, sent


async def test_complete_fields_one_read_each_get_431_at_the_limit(raw_upstream, make_sidecar):
    """Whole fields, each its own read, kept (User-Agent) or dropped (Host): 431 once past the limit.

    Kept fields are summed when a read ends inside the head, dropped ones counted as they come:
    a head that never ends is refused within two fields of max_header_bytes either way (httptools
    hands a field over when the next one starts).
    """
    kept, dropped = b"User-Agent: " + b"u" * 100 + b"\r\n", b"Host: " + b"h" * 100 + b"\r\n"
    # A dropped field between kept ones: every read completes a kept field, so only counting the
    # dropped one as it comes holds the limit (a read that completes none counts all it holds).
    for line in (kept, dropped + b"User-Agent: u\r\n"):
        data, sent = await fields_until_refused(raw_upstream, make_sidecar, line, 4096)
        assert data.startswith(b"HTTP/1.1 431 "), (line[:10], data[:80])
        assert b"sidecar_headers_too_large" in data
        assert 4096 < sent <= 4096 + 2 * len(line), (line[:10], sent)


async def test_a_head_of_many_small_fields_in_one_read_gets_431(raw_upstream, make_sidecar):
    """A head past the limit in one read, of fields SDKs send (kept without a count each): 431."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_header_bytes": 2048})
    fields = b"Stripe-Version: 2024-06-20\r\n" * 80  # 2,240 bytes
    answers, closed = await exchange(sc.port, b"GET /v1/customers HTTP/1.1\r\n" + fields + b"\r\n", check_closed=True)
    assert answers[0].status == 431
    assert closed and up.received == []
    # One field fewer than the limit allows passes.
    fields = b"Stripe-Version: 2024-06-20\r\n" * 70
    answers, _ = await exchange(sc.port, b"GET /v1/customers HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answers[0].status == 200
    assert len(up.received) == 1


async def test_trailer_line_that_never_ends_gets_431(raw_upstream, make_sidecar):
    """A chunked upload whose trailer value never ends gets a Stripe-shaped 431, not a bare close."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_header_bytes": 4096}, retry={"max_replay_body": 100})
    reader, writer = await open_raw(sc.port)
    writer.write(UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: ")
    await poll(lambda: up.connections >= 1, what="the upload to start upstream")
    conn = the_connection(sc)
    piece = b"t" * 1024
    sent = await feed_until(writer, conn, piece, lambda: conn._input_done)
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    assert b"sidecar_headers_too_large" in data
    assert data.count(b"HTTP/1.1 ") == 1
    assert sent <= 4096 + 2 * len(piece), sent
    assert up.received == []  # the upstream never saw a complete request


async def test_stalled_trailers_get_408_at_the_trailer_timeout(raw_upstream, make_sidecar):
    """Trailers that stop arriving get 408 at min(header_timeout, body_timeout) on the clock, not later."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        server={"header_timeout": 10.0, "body_timeout": 30.0},
        retry={"max_replay_body": 100, "attempt_timeout": 60.0},
    )
    reader, writer = await open_raw(sc.port)
    writer.write(UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: a")
    await poll(lambda: len(sc.server.connections) == 1, what="the connection")
    conn = the_connection(sc)
    await poll(
        lambda: conn._body_bytes == 5 and conn.deadline == clock.now + 10.0,
        what="the last chunk read and the trailer deadline armed",
    )
    # Connected, not still connecting: the clock jump must not expire the connect timeout.
    await poll(lambda: waits_for_the_client(sc), what="the attempt to wait for the client")
    assert conn.waiting_for == "body"
    clock.advance(9.75)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"sidecar_body_timeout" in data
    assert up.received == []


# -- 3. body timeouts ---------------------------------------------------------------------------


# A body that stops after a few bytes: tests/test_timeouts.py
# (test_a_body_that_stops_gets_408_at_body_timeout_and_is_never_forwarded).

LIMITS = {"header_timeout": 10.0, "body_timeout": 10.0, "body_deadline": 300.0}


async def body_read(sc, size: int) -> ClientConnection:
    """The one connection, once ``size`` body bytes of its request have been read."""
    await poll(lambda: len(sc.server.connections) == 1, what="the connection")
    conn = the_connection(sc)
    await poll(lambda: conn._body_bytes == size and conn.waiting_for == "body", what=f"{size} body bytes read")
    return conn


async def test_body_that_never_starts_gets_408(raw_upstream, make_sidecar):
    """A declared body of which no byte ever arrives gets 408 at body_timeout on the clock, not before."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=LIMITS)
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    await body_read(sc, 0)
    clock.advance(9.75)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"sidecar_body_timeout" in data
    assert up.received == []


async def test_stalled_streamed_body_is_blamed_on_the_client(raw_upstream, make_sidecar):
    """A streamed upload that stalls gets the door's 408 at body_timeout, long before the attempt timeout, and Stripe is not blamed."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url, clock=clock, server=LIMITS, retry={"max_replay_body": 100, "attempt_timeout": 30.0}
    )
    reader, writer = await open_raw(sc.port)
    writer.write(UPLOAD_HEAD + b"Content-Length: 5000\r\n\r\n" + b"x" * 200)
    await body_read(sc, 200)
    await poll(lambda: up.connections == 1, what="the upload to start upstream")
    # Connected, not still connecting: the clock jump must not expire the connect timeout.
    await poll(lambda: waits_for_the_client(sc), what="the attempt to wait for the client")
    clock.advance(9.75)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"sidecar_body_timeout" in data
    assert data.count(b"HTTP/1.1 ") == 1
    await poll(lambda: sc.metrics.in_flight == 0, what="the run to end")
    assert up.received == []
    assert sc.registry.get_sample_value(
        "stripe_sidecar_upstream_attempts_total", {"operation": "POST /v1/files", "outcome": "timeout"}
    ) is None


async def test_trickled_body_is_cut_at_the_body_deadline(raw_upstream, make_sidecar):
    """A body that keeps trickling in (each byte within body_timeout) is cut with 408 once body_deadline has passed overall."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server={**LIMITS, "body_timeout": 5.0, "body_deadline": 20.0})
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
    await body_read(sc, 0)
    for sent in range(1, 6):  # a byte every 4 s: 20 s in all, never 5 s of silence
        writer.write(b"a")
        await body_read(sc, sent)
        clock.advance(4.0 if sent < 5 else 3.75)
        assert sc.deadlines.sweep() == 0, f"cut after {sent} bytes"
    clock.advance(0.25)  # 20 s since the head
    assert sc.deadlines.sweep() == 1
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"sidecar_body_timeout" in data
    assert up.received == []


async def test_slow_but_steady_body_is_not_cut_by_the_idle_timeout(raw_upstream, make_sidecar):
    """Each body byte restarts body_timeout: a body arriving in pieces over many body_timeouts is accepted."""
    up = await raw_upstream(lambda r: OK)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, server=LIMITS)
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
    await body_read(sc, 0)
    for sent in range(1, 31):  # a byte every 9.9 s: 297 s in all, 29 body_timeouts
        clock.advance(9.9)
        assert sc.deadlines.sweep() == 0, f"cut after {sent - 1} bytes"
        writer.write(b"a")
        if sent < 30:
            await body_read(sc, sent)
    head, body = await read_answer(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head + body
    assert [r.body for r in up.received] == [b"a" * 30]


async def test_body_read_paused_by_the_sidecar_is_not_timed_out(raw_upstream, make_sidecar):
    """A streamed upload queued behind a slow request is not timed out while the sidecar itself holds it."""
    release = asyncio.Event()
    up = await raw_upstream(lambda r: held(release, OK) if r.method == "GET" else OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        server=LIMITS,
        retry={"max_replay_body": 100, "attempt_timeout": 60.0, "deadline": 60.0},
    )
    reader, writer = await open_raw(sc.port)
    writer.write(GET + UPLOAD_HEAD + b"Content-Length: 500\r\n\r\n")
    await poll(lambda: len(up.received) == 1, what="the GET upstream")
    conn = the_connection(sc)
    await poll(lambda: bool(conn._queue), what="the upload to queue")
    assert conn.waiting_for == "body"
    for _ in range(3):  # three body_timeouts while the sidecar, not the client, holds the body
        clock.advance(10.0)
        sc.deadlines.sweep()
        assert not conn._input_done, "the queued upload was timed out while the sidecar held it"
        assert conn.waiting_for == "body"
    release.set()
    first, _ = await read_answer(reader)
    writer.write(b"h" * 500)
    second, _ = await read_answer(reader)
    writer.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert second.startswith(b"HTTP/1.1 200"), second
    assert [r.body for r in up.received if r.method == "POST"] == [b"h" * 500]


# -- 4. half-close and bytes after a closing request -----------------------------------------------


async def test_half_closed_client_still_gets_its_answer(raw_upstream, make_sidecar):
    """A client that shuts down its sending side after a complete request still receives the answer."""
    release = asyncio.Event()
    up = await raw_upstream(lambda r: held(release, OK))
    sc = await make_sidecar(up.url)
    reader, writer = await open_raw(sc.port)
    writer.write(GET)
    await poll(lambda: len(up.received) == 1, what="the request upstream")
    writer.write_eof()
    conn = the_connection(sc)
    await poll(lambda: conn._input_done, what="the sidecar to see the half-close")
    release.set()
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:80]
    assert b"cus_1" in data
    assert b"\r\nConnection: close\r\n" in data


async def test_half_close_after_pipelined_requests_answers_all(raw_upstream, make_sidecar):
    """Two pipelined requests then a half-close: both answered, in order, then the connection closes."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    reader, writer = await open_raw(sc.port)
    writer.write(GET + GET)
    writer.write_eof()
    data = await read_to_close(reader)
    writer.close()
    assert data.count(b"HTTP/1.1 200") == 2, data


async def test_byte_after_a_closing_request_does_not_cancel_its_answer(raw_upstream, make_sidecar):
    """Bytes sent after a Connection: close or HTTP/1.0 request are ignored; the answer still arrives."""
    for request in (
        b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /v1/customers/cus_1 HTTP/1.0\r\nHost: x\r\n\r\n",
    ):
        release = asyncio.Event()
        up = await raw_upstream(lambda r, release=release: held(release, OK))
        sc = await make_sidecar(up.url)
        reader, writer = await open_raw(sc.port)
        writer.write(request + b"X")  # a stray byte in the same read as the request
        await poll(lambda up=up: len(up.received) == 1, what="the request upstream")
        conn = the_connection(sc)
        writer.write(b"GET /v1/balance HTTP/1.1\r\n\r\n")  # and a whole request later
        release.set()
        data = await read_to_close(reader)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200"), (request, data[:80])
        assert data.count(b"HTTP/1.1 ") == 1
        assert conn.closed
        assert len(up.received) == 1


# -- 5. trailers never become headers ----------------------------------------------------------------


async def test_trailers_in_the_same_read_are_not_forwarded_as_headers(raw_upstream, make_sidecar):
    """Authorization, Stripe-Account and Idempotency-Key from a chunked trailer never reach Stripe."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    raw = (
        UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        b"Authorization: Bearer sk_test_evil\r\nStripe-Account: acct_evil\r\nIdempotency-Key: evil\r\n\r\n"
    )
    answers, _ = await exchange(sc.port, raw)
    assert answers[0].status == 200, answers[0].body
    (rec,) = up.received
    assert rec.body == b"hello"
    assert [v for n, v in rec.headers if n.lower() == b"authorization"] == [b"Bearer sk_test_good"]
    assert rec.header("Stripe-Account") is None
    assert rec.header("Idempotency-Key") is None


async def test_connection_trailer_does_not_strip_headers_of_the_next_request(raw_upstream, make_sidecar):
    """A Connection field in one request's trailer leaves the next request's headers alone."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    raw = (
        UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nConnection: Stripe-Account\r\n\r\n"
        b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\nStripe-Account: acct_1\r\n\r\n"
    )
    answers, _ = await exchange(sc.port, raw, answers=2)
    assert [a.status for a in answers] == [200, 200]
    get = [r for r in up.received if r.method == "GET"]
    assert get and get[0].header("Stripe-Account") == b"acct_1"


async def test_connection_header_applies_to_its_own_request_only(raw_upstream, make_sidecar):
    """Headers named by one request's Connection header are dropped from that request only."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    raw = (
        b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n"
        b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\nX-Hop: 2\r\n\r\n"
    )
    answers, _ = await exchange(sc.port, raw, answers=2)
    assert [a.status for a in answers] == [200, 200]
    assert [r.header("X-Hop") for r in up.received] == [None, b"2"]


# -- 7. a streamed body refused mid-stream gets its answer ----------------------------------------------


async def test_malformed_streamed_body_gets_a_400_answer(raw_upstream, make_sidecar):
    """Bad chunk framing mid-upload: one Stripe-shaped 400, the upstream attempt abandoned."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, retry={"max_replay_body": 100, "attempt_timeout": 30.0})
    reader, writer = await open_raw(sc.port)
    writer.write(UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await poll(lambda: up.connections >= 1, what="the upload to start upstream")
    writer.write(b"zz-not-hex\r\n")
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data[:80]
    assert b"sidecar_malformed_request" in data
    assert data.count(b"HTTP/1.1 ") == 1
    await poll(lambda: not up._transports, what="the upstream attempt to be abandoned")
    assert up.received == []


async def test_streamed_body_over_the_limit_gets_a_413_answer(raw_upstream, make_sidecar):
    """A chunked upload growing past max_body_bytes mid-stream gets one Stripe-shaped 413."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        up.url, server={"max_body_bytes": 1000}, retry={"max_replay_body": 100, "attempt_timeout": 30.0}
    )
    reader, writer = await open_raw(sc.port)
    chunk = b"a" * 600
    writer.write(UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n" % (len(chunk), chunk))
    await poll(lambda: up.connections >= 1, what="the upload to start upstream")
    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    data = await read_to_close(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 413 "), data[:80]
    assert b"sidecar_body_too_large" in data
    assert data.count(b"HTTP/1.1 ") == 1
    await poll(lambda: sc.metrics.in_flight == 0, what="the run to end")
    assert up.received == []
