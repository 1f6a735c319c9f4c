"""Byte-faithful forwarding on real loopback sockets, against a raw scriptable upstream."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from rawclient import exchange, open_raw
from rawupstream import Received, json_answer

OK = json_answer(200, b'{"id":"cus_1","object":"customer"}', b"Request-Id: req_abc")


async def test_request_headers_body_and_query_arrive_unchanged(raw_upstream, make_sidecar):
    """End-to-end request headers keep their case, order and values; hop-by-hop ones are dropped."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    body = b"amount=2000&currency=usd&metadata[order]=%C3%A9t%C3%A9"
    request = (
        b"POST /v1/payment_intents?expand[]=customer&x=%%2Fy HTTP/1.1\r\n"
        b"Host: localhost:8080\r\n"
        b"Authorization: Bearer sk_test_abc123\r\n"
        b"Stripe-Version: 2026-10-28.acacia\r\n"
        b"Stripe-Account: acct_1ABC\r\n"
        b"Stripe-Context: ctx_1\r\n"
        b"Idempotency-Key: app-key-1\r\n"
        b"User-Agent: Stripe/v1 PythonBindings/16.1.0\r\n"
        b"X-Stripe-Client-User-Agent: {\"lang\":\"python\"}\r\n"
        b"X-Stripe-Client-Telemetry: {\"last_request_metrics\":{}}\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: drop-me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"TE: trailers\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    answers, _ = await exchange(sc.port, request)
    assert answers[0].status == 200
    (got,) = up.received
    assert got.method == "POST"
    assert got.target == b"/v1/payment_intents?expand[]=customer&x=%2Fy"
    assert got.body == body
    assert got.names() == [
        b"Host",
        b"Authorization",
        b"Stripe-Version",
        b"Stripe-Account",
        b"Stripe-Context",
        b"Idempotency-Key",
        b"User-Agent",
        b"X-Stripe-Client-User-Agent",
        b"X-Stripe-Client-Telemetry",
        b"Content-Type",
        b"Content-Length",
    ]
    assert got.header("Host") == f"127.0.0.1:{up.port}".encode()
    assert got.header("Authorization") == b"Bearer sk_test_abc123"
    assert got.header("Idempotency-Key") == b"app-key-1"
    assert got.header("X-Stripe-Client-User-Agent") == b'{"lang":"python"}'


async def test_response_status_headers_and_body_pass_through(raw_upstream, make_sidecar):
    """Stripe's answer keeps its status, reason, end-to-end headers and exact body bytes."""
    body = b'{"error":{"type":"card_error","code":"card_declined"}}'
    answer = (
        b"HTTP/1.1 402 Payment Required\r\n"
        b"Content-Type: application/json\r\n"
        b"Request-Id: req_42\r\n"
        b"Idempotent-Replayed: true\r\n"
        b"Idempotency-Key: k1\r\n"
        b"Stripe-Should-Retry: false\r\n"
        b"Stripe-Notice: deprecated\r\n"
        b"Stripe-Version: 2026-10-28.acacia\r\n"
        b"Connection: keep-alive\r\n"
        b"Keep-Alive: timeout=60\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    up = await raw_upstream(lambda r: answer)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"POST /v1/charges HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    a = answers[0]
    assert (a.status, a.reason) == (402, b"Payment Required")
    assert a.body == body
    names = [n for n, _ in a.headers]
    for name in (b"Request-Id", b"Idempotent-Replayed", b"Idempotency-Key", b"Stripe-Should-Retry", b"Stripe-Notice", b"Stripe-Version", b"Content-Type"):
        assert name in names
    assert b"Keep-Alive" not in names
    assert a.header("Request-Id") == b"req_42"
    assert a.header("Stripe-Should-Retry") == b"false"
    assert a.header("Sidecar-Attempts") == b"1"
    assert a.header("Sidecar-Outcome") == b"card_declined"


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"])
async def test_every_method_is_forwarded(raw_upstream, make_sidecar, method):
    """Each method reaches the upstream as sent."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, f"{method} /v1/customers/cus_9 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answers[0].status == 200
    assert up.received[0].method == method
    assert up.received[0].target == b"/v1/customers/cus_9"


async def test_content_encoding_passes_untouched(raw_upstream, make_sidecar):
    """A gzip body is relayed compressed, byte for byte, with its Content-Encoding."""
    packed = gzip.compress(b'{"object":"list","data":[]}' * 50)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(packed), packed)
    )
    up = await raw_upstream(lambda r: answer)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"GET /v1/customers HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    assert answers[0].header("Content-Encoding") == b"gzip"
    assert answers[0].body == packed
    assert up.received[0].header("Accept-Encoding") == b"gzip"


async def test_chunked_answer_is_rechunked_intact(raw_upstream, make_sidecar):
    """An upstream chunked body arrives whole and in order."""
    parts = [b"a" * 10, b"b" * 70000, b"c" * 5]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    up = await raw_upstream(lambda r: answer)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"GET /v1/quotes/qt_1/pdf HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].status == 200
    assert answers[0].body == b"".join(parts)


async def test_large_answer_streams_before_upstream_finishes(raw_upstream, make_sidecar):
    """An answer above the buffer limit reaches the client while the upstream is still sending."""
    release = asyncio.Event()
    first, rest = b"x" * 300_000, b"y" * 300_000

    async def stream(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: %d\r\n\r\n" % (len(first) + len(rest)))
        transport.write(first)
        await release.wait()
        transport.write(rest)

    up = await raw_upstream(lambda r: stream)
    sc = await make_sidecar(up.url, upstream={"buffer_limit": 65536})
    reader, writer = await open_raw(sc.port)
    writer.write(b"GET /v1/files/file_1/contents HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    async with asyncio.timeout(10):
        while b"x" * 1000 not in got:
            got += await reader.read(65536)
        release.set()  # only now may the upstream finish: the head and first part came through
        while not got.endswith(rest):
            got += await reader.read(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"Content-Length: 600000" in head
    assert body == first + rest
    writer.close()


async def test_head_answer_has_no_body_and_connection_is_reused(raw_upstream, make_sidecar):
    """A HEAD answer keeps its Content-Length, carries no body, and the next request still works."""
    def handler(r: Received) -> bytes:
        if r.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"
        return OK

    up = await raw_upstream(handler)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"HEAD /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n", head_only=True)
    assert answers[0].status == 200
    assert answers[0].header("Content-Length") == b"1234"
    answers, _ = await exchange(sc.port, b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].body == b'{"id":"cus_1","object":"customer"}'
    assert up.connections == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_bodyless_statuses(raw_upstream, make_sidecar, status):
    """204 and 304 answers carry no body and leave the connection usable."""
    up = await raw_upstream(lambda r: b"HTTP/1.1 %d X\r\nETag: \"1\"\r\n\r\n" % status if r.target.endswith(b"/a") else OK)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(
        sc.port,
        b"GET /v1/x/a HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/x/b HTTP/1.1\r\nHost: x\r\n\r\n",
        answers=2,
    )
    assert [a.status for a in answers] == [status, 200]
    assert answers[0].body == b""
    assert answers[1].body.startswith(b'{"id"')


async def test_expect_continue_is_answered_by_the_sidecar(raw_upstream, make_sidecar):
    """The client gets 100 Continue before sending its body; the upstream never sees Expect."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"a=b&c")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert up.received[0].body == b"a=b&c"
    assert up.received[0].header("Expect") is None


async def test_chunked_request_body_is_streamed_upstream(raw_upstream, make_sidecar):
    """A chunked upload of unknown length arrives whole."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    parts = [b"--b\r\n", b"z" * 100000, b"\r\n--b--\r\n"]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    answers, _ = await exchange(
        sc.port,
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
    )
    assert answers[0].status == 200
    assert up.received[0].body == b"".join(parts)


async def test_large_request_body_is_streamed_not_buffered(raw_upstream, make_sidecar):
    """A body above the replay cap is forwarded as it arrives, with its Content-Length."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, retry={"max_replay_body": 1024})
    reader, writer = await open_raw(sc.port)
    payload = b"q" * 200_000
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload))
    writer.write(payload[:100_000])
    await writer.drain()
    writer.write(payload[100_000:])
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert up.received[0].body == payload
    assert up.received[0].header("Content-Length") == b"200000"
    # Not replayable, so no key was injected for it.
    assert up.received[0].header("Idempotency-Key") is None


async def test_keep_alive_pool_reuses_one_connection(raw_upstream, make_sidecar):
    """Sequential requests share one upstream connection."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    for _ in range(5):
        answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers[0].status == 200
    assert up.connections == 1
    assert len(up.received) == 5


async def test_upstream_connection_close_is_not_reused(raw_upstream, make_sidecar):
    """An upstream answer with Connection: close leads to a fresh connection next time."""
    close = json_answer(200, b"{}", b"Connection: close")
    up = await raw_upstream(lambda r: close)
    sc = await make_sidecar(up.url)
    for _ in range(3):
        answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers[0].status == 200
    assert up.connections == 3


async def test_stale_pooled_connection_is_replaced_without_duplicating(raw_upstream, make_sidecar):
    """When the upstream drops idle keep-alive connections, the next requests still succeed once each."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, retry={"enabled": False})
    for i in range(6):
        answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers[0].status == 200, i
        up.close_idle_connections()  # the upstream's keep-alive timeout fires
    assert len(up.received) == 6


async def test_pipelined_requests_are_answered_in_order(raw_upstream, make_sidecar):
    """Requests pipelined on one connection get their answers in order."""
    up = await raw_upstream(lambda r: json_answer(200, r.target))
    sc = await make_sidecar(up.url)
    data = b"".join(b"GET /v1/customers/cus_%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(4))
    answers, _ = await exchange(sc.port, data, answers=4)
    assert [a.body for a in answers] == [b"/v1/customers/cus_%d" % i for i in range(4)]


async def test_unreachable_upstream_gets_stripe_shaped_502(make_sidecar):
    """A refused upstream connection becomes a 502 with a Stripe-shaped error body."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    sc = await make_sidecar(f"http://127.0.0.1:{port}", retry={"base_delay": 0.001, "max_delay": 0.002})
    answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    a = answers[0]
    assert a.status == 502
    err = a.json()["error"]
    assert err["type"] == "api_error"
    assert err["code"] == "sidecar_upstream_unreachable"
    assert a.header("Stripe-Should-Retry") == b"false"


async def test_routes_pick_the_stripe_host_per_path(raw_upstream, make_sidecar):
    """Uploads go to the files host, OAuth to connect, the rest to api (by the route table)."""
    api = await raw_upstream(lambda r: OK)
    files = await raw_upstream(lambda r: OK)
    connect = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        None,
        upstream={"hosts": {"api": api.url, "files": files.url, "connect": connect.url, "meter_events": api.url}},
    )
    for line in (b"POST /v1/files", b"GET /v1/files/file_1A/contents", b"GET /v1/files/file_1A", b"POST /oauth/token", b"GET /v1/customers"):
        answers, _ = await exchange(sc.port, line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert answers[0].status == 200
    assert [r.target for r in files.received] == [b"/v1/files", b"/v1/files/file_1A/contents"]
    assert [r.target for r in connect.received] == [b"/oauth/token"]
    assert [r.target for r in api.received] == [b"/v1/files/file_1A", b"/v1/customers"]
    assert files.received[0].header("Host") == f"127.0.0.1:{files.port}".encode()


async def test_close_delimited_answer_ends_at_eof(raw_upstream, make_sidecar):
    """An answer with neither length nor chunking is complete when the upstream closes."""

    async def close_delimited(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        transport.write(b'{"object":"balance"}')
        transport.close()

    up = await raw_upstream(lambda r: close_delimited)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].status == 200
    assert answers[0].body == b'{"object":"balance"}'
    assert answers[0].header("Content-Length") == b"20"


async def test_resend_after_a_reused_connection_breaks_is_counted(raw_upstream, make_sidecar):
    """A request lost on a reused connection goes again at once, and both sends are counted."""
    seq = [OK, None, OK]  # the second request is read, then the connection is dropped

    def handler(r: Received):
        return seq.pop(0)

    up = await raw_upstream(handler)
    sc = await make_sidecar(up.url, retry={"enabled": False})
    await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].status == 200
    assert answers[0].header("Sidecar-Attempts") == b"2"
    assert len(up.received) == 3
    assert [r.conn_id for r in up.received] == [1, 1, 2]
    get = sc.registry.get_sample_value
    assert get("stripe_sidecar_upstream_attempts_total", {"operation": "GET /v1/balance", "outcome": "connection_error"}) == 1
    assert get("stripe_sidecar_upstream_attempts_total", {"operation": "GET /v1/balance", "outcome": "success"}) == 2


# A streamed answer that goes silent (cut at attempt_timeout): tests/test_timeouts.py.


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        # A field named in Connection before the app's Authorization: the held key takes the
        # Authorization line's place, not another's.
        (
            b"Connection: X-Hop\r\nX-Hop: 1\r\nX-Note: Authorization: kept\r\nAuthorization: Bearer sk_test_app\r\n",
            [b"Host", b"X-Note", b"Authorization", b"Stripe-Version"],
        ),
        # Several Authorization fields: none of them goes on, a value that looks like one does.
        (
            b"Authorization: Bearer a\r\nX-Note: Authorization: kept\r\nAuthorization: Bearer b\r\n",
            [b"Host", b"X-Note", b"Stripe-Version", b"Authorization"],
        ),
    ],
)
async def test_held_key_replaces_the_apps_authorization_and_nothing_else(raw_upstream, make_sidecar, fields, names):
    """With held keys, the upstream gets the held key as the one Authorization, every other field
    as sent, fields named in Connection dropped."""
    held = "sk_test_51HeldPrimaryKeyValue"
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, secret_keys=[held])
    raw = b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n" + fields + b"Stripe-Version: 2026-10-28\r\n\r\n"
    answers, _ = await exchange(sc.port, raw)
    assert answers[0].status == 200
    got = [r for r in up.received if r.target == b"/v1/customers/cus_1"][-1]
    assert got.names() == names
    assert got.header("Authorization") == b"Bearer " + held.encode()
    assert got.header("X-Note") == b"Authorization: kept"
