"""Outcome records: every attempt and every answer reaches the observers, exactly as it happened."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from rawclient import exchange
from rawupstream import Received, json_answer

from proxy.records import AttemptRecord, RequestRecord, new_attempt, new_request

POST = b"POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\namount=2000"
GET_FILE = b"GET /v1/files/file_1/contents HTTP/1.1\r\nHost: x\r\n\r\n"
BUSY = json_answer(
    503, b'{"error":{"type":"api_error","code":"overloaded"}}', b"Request-Id: req_busy"
)
OK = json_answer(200, b'{"id":"pi_1"}', b"Request-Id: req_ok")


def cut_midway(r: Received):
    """A 3 MiB answer (streamed: over the buffer limit) whose upstream breaks off halfway."""
    size = 3 * 1024 * 1024

    async def write(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        transport.write(b"x" * (size // 2))
        await asyncio.sleep(0)
        transport.abort()

    return write


class Recorder:
    """An observer that keeps what it is given."""

    def __init__(self) -> None:
        self.attempts: list[AttemptRecord] = []
        self.requests: list[RequestRecord] = []

    def attempt(self, record: AttemptRecord) -> None:
        self.attempts.append(record)

    def request(self, record: RequestRecord) -> None:
        self.requests.append(record)


class Sleeps:
    """Returns at once (the backoff is not what these tests look at)."""

    async def __call__(self, delay: float) -> None:
        return None


async def test_a_retried_post_gives_one_record_per_attempt_and_one_for_the_answer(raw_upstream, make_sidecar):
    """A 503 then a 200: two attempt records (the first says a retry follows) and one request record."""
    answers = [BUSY, OK]
    up = await raw_upstream(lambda r: answers.pop(0))
    seen = Recorder()
    sc = await make_sidecar(up.url, sleep=Sleeps(), rand=lambda: 0.5, observers=[seen])
    result, _ = await exchange(sc.port, POST)
    assert result[0].status == 200
    op = seen.attempts[0].operation
    assert op.startswith("POST /v1/payment_intents")
    first, second = seen.attempts
    assert first._replace(duration=0.0) == AttemptRecord(
        op, 1, "gateway_error", 503, "overloaded", None, "req_busy", None, 0.0, 0.025
    )
    assert second._replace(duration=0.0) == AttemptRecord(
        op, 2, "success", 200, None, None, "req_ok", None, 0.0, None
    )
    (answer,) = seen.requests
    assert answer._replace(duration=0.0) == RequestRecord(
        op, "POST", 200, "success", 2, 0.0, "req_ok", None, True, "answered", 0.0
    )
    assert answer.duration >= first.duration + second.duration


async def test_a_refusal_is_recorded_with_no_attempt(raw_upstream, make_sidecar):
    """A request the open breaker refuses is one request record, zero attempts, reason as outcome."""
    up = await raw_upstream(lambda r: BUSY)
    seen = Recorder()
    sc = await make_sidecar(
        up.url,
        sleep=Sleeps(),
        observers=[seen],
        retry={"max_attempts": 1},
        breaker={"consecutive_failures": 1, "open_duration": 60.0},
    )
    await exchange(sc.port, POST)
    result, _ = await exchange(sc.port, POST)
    assert result[0].status == 503
    assert [r.outcome for r in seen.requests] == ["gateway_error", "circuit_open"]
    assert seen.requests[1].attempts == 0 and seen.requests[1].give_up is None
    assert len(seen.attempts) == 1


async def test_a_streamed_answer_cut_midway_is_never_recorded_as_a_success(raw_upstream, make_sidecar):
    """An upstream that breaks off a large answer: the record and the metrics say so, not success."""
    up = await raw_upstream(cut_midway)
    seen = Recorder()
    sc = await make_sidecar(up.url, observers=[seen])
    _, closed = await exchange(sc.port, GET_FILE, timeout=10, check_closed=True)
    assert closed
    deadline = asyncio.get_running_loop().time() + 5
    while not seen.requests:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    (answer,) = seen.requests
    assert answer.status == 200 and answer.outcome == "connection_error"
    text = sc.metrics.render().decode()
    outcomes = {
        s.labels["outcome"]
        for family in text_string_to_metric_families(text)
        if family.name == "stripe_sidecar_requests"
        for s in family.samples
    }
    assert outcomes == {"connection_error"}


async def test_streams_stripe_breaks_off_count_against_the_breaker(raw_upstream, make_sidecar):
    """Two large answers cut midway by the upstream open a breaker set to trip after two failures."""
    up = await raw_upstream(cut_midway)
    sc = await make_sidecar(up.url, breaker={"consecutive_failures": 2, "open_duration": 60.0})
    for _ in range(2):
        _, closed = await exchange(sc.port, GET_FILE, timeout=10)
        assert closed
    breaker = sc.forwarder.breakers()["GET /v1/files/{file}/contents"]
    deadline = asyncio.get_running_loop().time() + 5
    while breaker.state.value != "open":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    result, _ = await exchange(sc.port, GET_FILE)
    assert result[0].status == 503 and result[0].json()["error"]["code"] == "sidecar_circuit_open"
    assert len(up.received) == 2


def test_fast_constructors_build_the_same_records_as_the_classes():
    """new_attempt and new_request (used on the hot path) build records equal to, and of the type of, the classes' own."""
    attempt = ("POST /v1/x", 2, "success", 200, None, "global", "req_1", None, 0.25, 1.5, "p", "tls")
    request = ("POST /v1/x", "POST", 200, "success", 1, 0.5, "req_1", None, True, "answered", 0.0)
    assert len(attempt) == len(AttemptRecord._fields) and len(request) == len(RequestRecord._fields)
    built = new_attempt(attempt)
    assert type(built) is AttemptRecord and built == AttemptRecord(*attempt)
    assert built.transport_step == "tls" and built.retry_in == 1.5
    answered = new_request(request)
    assert type(answered) is RequestRecord and answered == RequestRecord(*request)
    assert answered.limiter_wait == 0.0 and answered.give_up == "answered"
