"""Each guard and setting has an effect a client or Stripe can see, on real loopback sockets.

Every test here was written against a deliberate wrong change to the code (the guard removed,
the setting ignored) and fails with it; the change each one catches is named in its docstring.
"""

from __future__ import annotations

import asyncio
import json

from rawclient import exchange
from rawupstream import held, json_answer
from unit.fakeclock import FakeClock
from waiting import poll

OK = json_answer(200, b'{"id":"cus_1","object":"customer"}', b"Request-Id: req_ok")
HTML_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: 17\r\n\r\n"
    b"<h1>overload</h1>"
)
GET = b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n"
BALANCE = b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"


class Clock:
    """A monotonic clock that only its own sleep moves: waits cost no wall time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.delays: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay


def logged(sc) -> list[dict]:
    """Every JSON log line the sidecar wrote so far."""
    sc.log.flush()
    return [json.loads(line) for line in sc.log_stream.getvalue().splitlines()]


# -- the attempt loop's guards between retries ----------------------------------------------------


async def test_no_retry_whose_backoff_would_end_past_the_deadline(raw_upstream, make_sidecar):
    """A retry whose backoff would end at or past retry.deadline is not made (catches: the
    overall-deadline check between retries removed)."""
    up = await raw_upstream(lambda r: HTML_503)
    clock = Clock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        sleep=clock.sleep,
        rand=lambda: 1.0,
        retry={"max_attempts": 5, "base_delay": 1.0, "max_delay": 1.0, "deadline": 2.0},
        breaker={"enabled": False},
    )
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 503
    assert answers[0].header("Sidecar-Attempts") == b"2"
    assert clock.delays == [1.0]  # a second wait would end at 2.0 s: the deadline
    assert len(up.received) == 2


async def test_breaker_that_opened_after_an_attempt_stops_the_retries(raw_upstream, make_sidecar):
    """When an attempt's failure opens the breaker, no retry goes out (catches: ignoring a breaker
    that reopened between attempts)."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Clock().sleep,
        retry={"max_attempts": 3},
        breaker={"consecutive_failures": 1, "open_duration": 60, "open_duration_max": 60},
    )
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 503
    assert answers[0].header("Sidecar-Attempts") == b"1"
    assert len(up.received) == 1
    assert sc.registry.get_sample_value("stripe_sidecar_breaker_state", {"scope": "GET /v1/customers/{customer}"}) == 2
    again, _ = await exchange(sc.port, GET)
    assert again[0].json()["error"]["code"] == "sidecar_circuit_open"
    assert len(up.received) == 1


async def test_limiter_refusing_a_retry_stops_the_retries(raw_upstream, make_sidecar):
    """A retry the rate limiter refuses (an operation's ceiling of 1/s spent) is not sent (catches:
    ignoring a limiter refusal of a retry)."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Clock().sleep,
        retry={"max_attempts": 3},
        ratelimit={"enabled": True, "max_wait": 0.01},
        operations={"GET /v1/customers/{customer}": {"limits": {"endpoint_rate": 1.0, "endpoint_burst": 1.0}}},
    )
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 503
    assert answers[0].header("Sidecar-Attempts") == b"1"
    assert len(up.received) == 1


# -- connection settings ---------------------------------------------------------------------------


# The client keep-alive idle timeout: tests/test_timeouts.py.


async def test_pooled_connection_idle_past_the_pool_timeout_is_not_reused(raw_upstream, make_sidecar):
    """An upstream connection idle longer than upstream.idle_timeout (30 s by default) is replaced,
    one idle for less is reused (catches: the pool idle timeout ignored)."""
    up = await raw_upstream(lambda r: OK)
    clock = Clock()
    sc = await make_sidecar(up.url, clock=clock)
    assert (await exchange(sc.port, BALANCE))[0][0].status == 200
    clock.now += 29.0
    assert (await exchange(sc.port, BALANCE))[0][0].status == 200
    assert up.connections == 1
    clock.now += 31.0
    assert (await exchange(sc.port, BALANCE))[0][0].status == 200
    assert [r.conn_id for r in up.received] == [1, 1, 2]


async def test_pool_keeps_at_most_max_idle_per_host_connections(raw_upstream, make_sidecar):
    """After three concurrent requests end, only upstream.max_idle_per_host (1) connections stay
    open (catches: max_idle_per_host ignored)."""
    release = asyncio.Event()
    up = await raw_upstream(lambda r: held(release, OK))
    sc = await make_sidecar(up.url, upstream={"max_idle_per_host": 1})
    pending = [asyncio.create_task(exchange(sc.port, BALANCE)) for _ in range(3)]
    await poll(lambda: len(up.received) == 3, what="three requests upstream")
    assert up.connections == 3
    release.set()
    for task in pending:
        assert (await task)[0][0].status == 200
    await poll(lambda: len(up._transports) == 1, what="the surplus idle connections to close")
    assert (await exchange(sc.port, BALANCE))[0][0].status == 200
    assert up.connections == 3  # the one kept was reused


async def test_connect_timeout_bounds_a_handshake_that_never_completes(make_sidecar):
    """An https upstream that accepts TCP but never answers the TLS handshake fails the attempt
    at upstream.connect_timeout on the clock (not before) with a Stripe-shaped 502 (catches: connect_timeout ignored)."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, write nothing: the handshake never ends

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        clock = FakeClock()
        sc = await make_sidecar(
            f"https://127.0.0.1:{port}",
            clock=clock,
            upstream={"connect_timeout": 5.0},
            retry={"max_attempts": 1, "attempt_timeout": 30},
        )
        asking = asyncio.create_task(exchange(sc.port, BALANCE))
        await poll(lambda: len(accepted) == 1, what="the TCP connection to be accepted")
        clock.advance(4.75)
        assert sc.deadlines.sweep() == 0
        assert not asking.done()
        clock.advance(0.25)
        assert sc.deadlines.sweep() == 1
        answers, _ = await asking
        assert answers[0].status == 502
        err = answers[0].json()["error"]
        assert err["code"] == "sidecar_upstream_unreachable"
        assert f"connect to https://127.0.0.1:{port} timed out" in err["message"]
        assert len(accepted) == 1
    finally:
        server.close()
        for w in accepted:
            w.transport.abort()


async def test_stale_pooled_connection_resends_an_options_request(raw_upstream, make_sidecar):
    """An OPTIONS lost on a reused connection the upstream closed is resent once at once, like a
    GET, with retries off (catches: OPTIONS left out of the resend after a stale connection)."""
    seq: list[bytes | None] = [OK, None, OK]
    up = await raw_upstream(lambda r: seq.pop(0))
    sc = await make_sidecar(up.url, retry={"enabled": False})
    options = b"OPTIONS /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"
    assert (await exchange(sc.port, options))[0][0].status == 200
    answers, _ = await exchange(sc.port, options)
    assert answers[0].status == 200
    assert answers[0].header("Sidecar-Attempts") == b"2"
    assert [(r.method, r.conn_id) for r in up.received] == [("OPTIONS", 1), ("OPTIONS", 1), ("OPTIONS", 2)]


# -- what the sidecar adds to answers and logs ----------------------------------------------------


async def test_sidecar_headers_false_adds_none_of_the_sidecars_headers(raw_upstream, make_sidecar):
    """With server.sidecar_headers: false no Sidecar-* header (nor the injected key echo) is added
    to forwarded answers, sidecar errors or refusals (catches: the setting ignored)."""
    seq = [HTML_503, OK]
    up = await raw_upstream(lambda r: seq.pop(0) if seq else HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Clock().sleep,
        server={"sidecar_headers": False},
        retry={"max_attempts": 2},
        breaker={"consecutive_failures": 2},
    )
    post = b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    ok, _ = await exchange(sc.port, post)  # retried once, then 200
    failed, _ = await exchange(sc.port, GET)  # 503 twice: gateway error, breaker opens
    refused, _ = await exchange(sc.port, GET)  # circuit open
    assert [a.status for a in (ok[0], failed[0], refused[0])] == [200, 503, 503]
    assert refused[0].json()["error"]["code"] == "sidecar_circuit_open"
    assert up.received[0].header("Idempotency-Key") is not None  # a key was injected...
    for answer in (ok[0], failed[0], refused[0]):
        names = {n.lower() for n, _ in answer.headers}
        assert not {b"sidecar-attempts", b"sidecar-outcome", b"idempotency-key"} & names, answer.headers


async def test_log_level_warning_drops_info_events_and_the_access_log(raw_upstream, make_sidecar):
    """With log.level: warning only warnings and errors are written: a breaker opening, not the
    start, the retries or the per-request line (catches: the log-level filter removed)."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Clock().sleep,
        log={"level": "warning"},
        retry={"max_attempts": 2},
        breaker={"consecutive_failures": 2},
    )
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].header("Sidecar-Attempts") == b"2"
    written = [(line["level"], line["event"]) for line in logged(sc)]
    assert ("warning", "breaker_open") in written
    assert {level for level, _ in written} <= {"warning", "error"}, written
