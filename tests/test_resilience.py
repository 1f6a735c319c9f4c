"""The pipeline's decisions on real sockets: keys, retries, give-up signals, breakers, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rawclient import exchange
from rawupstream import Received, held, json_answer
from test_timeouts import until
from unit.fakeclock import FakeClock

from proxy.forward import Forwarder

OK = json_answer(200, b'{"id":"pi_1","object":"payment_intent"}', b"Request-Id: req_ok")
HTML_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: 17\r\n\r\n"
    b"<h1>overload</h1>"
)
POST = b"POST /v1/payment_intents HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\namount=2000"
GET = b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\n\r\n"


def script(*answers: bytes) -> Callable[[Received], bytes]:
    """Answer with each of ``answers`` in turn, then repeat the last."""
    queue = list(answers)

    def handler(r: Received) -> bytes:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


class Sleeps:
    """A sleep that records its delays and returns at once (no waiting in tests)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_injected_key_is_the_same_on_every_attempt(raw_upstream, make_sidecar):
    """A POST without a key gets one random key, sent on every attempt and echoed to the app."""
    up = await raw_upstream(script(HTML_503, HTML_503, OK))
    sleeps = Sleeps()
    sc = await make_sidecar(up.url, sleep=sleeps)
    answers, _ = await exchange(sc.port, POST)
    a = answers[0]
    assert a.status == 200
    keys = [r.header("Idempotency-Key") for r in up.received]
    assert len(keys) == 3 and len(set(keys)) == 1
    key = keys[0]
    assert key is not None and key.startswith(b"sidecar-") and len(key) <= 255
    assert a.header("Idempotency-Key") == key
    assert a.header("Sidecar-Attempts") == b"3"
    assert a.header("Sidecar-Outcome") == b"success"
    assert len(sleeps.delays) == 2
    assert sc.registry.get_sample_value("stripe_sidecar_idempotency_keys_injected_total", {"operation": "POST /v1/payment_intents"}) == 1
    assert sc.registry.get_sample_value("stripe_sidecar_retries_total", {"operation": "POST /v1/payment_intents", "outcome": "gateway_error"}) == 2


async def test_two_requests_get_different_keys(raw_upstream, make_sidecar):
    """Injected keys are unique per request."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    await exchange(sc.port, POST)
    await exchange(sc.port, POST)
    assert up.received[0].header("Idempotency-Key") != up.received[1].header("Idempotency-Key")


async def test_app_key_is_never_replaced(raw_upstream, make_sidecar):
    """The app's own Idempotency-Key goes out unchanged on every attempt."""
    up = await raw_upstream(script(HTML_503, OK))
    sc = await make_sidecar(up.url, sleep=Sleeps())
    raw = POST.replace(b"Host: x\r\n", b"Host: x\r\nIdempotency-Key: app-key-7\r\n")
    answers, _ = await exchange(sc.port, raw)
    assert answers[0].status == 200
    assert [r.header("Idempotency-Key") for r in up.received] == [b"app-key-7", b"app-key-7"]
    assert sc.registry.get_sample_value("stripe_sidecar_idempotency_keys_injected_total", {"operation": "POST /v1/payment_intents"}) is None


async def test_get_is_retried_but_never_gets_a_key(raw_upstream, make_sidecar):
    """GETs are repeatable without a key, and none is added."""
    up = await raw_upstream(script(HTML_503, OK))
    sc = await make_sidecar(up.url, sleep=Sleeps())
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200
    assert len(up.received) == 2
    assert all(r.header("Idempotency-Key") is None for r in up.received)


async def test_post_without_key_is_not_retried_when_injection_is_off(raw_upstream, make_sidecar):
    """Without a key a POST is never repeated (it could charge twice); the 503 goes back as is."""
    up = await raw_upstream(script(HTML_503, OK))
    sc = await make_sidecar(up.url, sleep=Sleeps(), idempotency={"inject": False})
    answers, _ = await exchange(sc.port, POST)
    assert answers[0].status == 503
    assert answers[0].body == b"<h1>overload</h1>"
    assert len(up.received) == 1
    assert up.received[0].header("Idempotency-Key") is None


NEVER_RETRIED = [
    json_answer(400, b'{"error":{"type":"invalid_request_error","code":"parameter_missing","param":"amount"}}', reason=b"Bad Request"),
    json_answer(401, b'{"error":{"type":"invalid_request_error","message":"Invalid API Key provided: sk_test_****1234"}}', reason=b"Unauthorized"),
    json_answer(402, b'{"error":{"type":"card_error","code":"card_declined","decline_code":"generic_decline"}}', reason=b"Payment Required"),
    json_answer(403, b'{"error":{"type":"invalid_request_error","code":"secret_key_required"}}', reason=b"Forbidden"),
    json_answer(400, b'{"error":{"type":"idempotency_error","message":"Keys for idempotent requests..."}}', reason=b"Bad Request"),
    json_answer(500, b'{"error":{"type":"api_error","message":"Something went wrong"}}', b"Stripe-Should-Retry: false", reason=b"Internal Server Error"),
    json_answer(404, b'{"error":{"type":"invalid_request_error","code":"resource_missing"}}', reason=b"Not Found"),
]


async def test_business_and_client_errors_pass_through_after_one_attempt(raw_upstream, make_sidecar):
    """400, 401, 402, 403, idempotency errors, 404 and a saved 500 are answered as is, after exactly one attempt."""
    for answer in NEVER_RETRIED:
        up = await raw_upstream(lambda r, a=answer: a)
        sc = await make_sidecar(up.url, sleep=Sleeps())
        answers, _ = await exchange(sc.port, POST)
        got = answers[0]
        expected_body = answer.split(b"\r\n\r\n", 1)[1]
        assert got.body == expected_body
        assert got.status == int(answer[9:12])
        assert len(up.received) == 1, answer[:40]
        assert got.header("Sidecar-Attempts") == b"1"
        if b"Should-Retry" in answer:
            assert got.header("Stripe-Should-Retry") == b"false"


async def test_final_failure_tells_the_sdk_not_to_retry(raw_upstream, make_sidecar):
    """After the last attempt fails, Stripe-Should-Retry: false is set so SDK retries don't multiply."""
    up = await raw_upstream(lambda r: json_answer(502, b'{"error":{"type":"api_error"}}', b"Stripe-Should-Retry: true", reason=b"Bad Gateway"))
    sc = await make_sidecar(up.url, sleep=Sleeps(), retry={"max_attempts": 3})
    answers, _ = await exchange(sc.port, GET)
    a = answers[0]
    assert a.status == 502
    assert len(up.received) == 3
    assert a.header("Sidecar-Attempts") == b"3"
    assert [v for n, v in a.headers if n.lower() == b"stripe-should-retry"] == [b"false"]


async def test_retry_after_is_honoured_up_to_the_cap(raw_upstream, make_sidecar):
    """A 429 with Retry-After waits that long (capped), then tries again."""
    limited = json_answer(429, b'{"error":{"type":"invalid_request_error","code":"rate_limit"}}', b"Stripe-Rate-Limited-Reason: global-rate", b"Retry-After: 1", reason=b"Too Many Requests")
    too_long = limited.replace(b"Retry-After: 1", b"Retry-After: 30")
    up = await raw_upstream(script(limited, too_long, OK))
    sleeps = Sleeps()
    sc = await make_sidecar(up.url, sleep=sleeps, rand=lambda: 0.0, retry={"retry_after_cap": 2.0})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200
    assert sleeps.delays == [1.0, 2.0]


async def test_backoff_is_jittered_exponential(raw_upstream, make_sidecar):
    """Delays follow full jitter: rand * min(max_delay, base * 2^n)."""
    up = await raw_upstream(script(HTML_503, HTML_503, HTML_503, OK))
    sleeps = Sleeps()
    sc = await make_sidecar(up.url, sleep=sleeps, rand=lambda: 0.5, retry={"base_delay": 0.1, "max_delay": 0.3})
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200
    assert sleeps.delays == [0.05, 0.1, 0.15]


async def test_saved_500_without_should_retry_is_retried_under_the_same_key(raw_upstream, make_sidecar):
    """A 500 with no Stripe-Should-Retry is retried, and only under the same key (Stripe replays it if saved)."""
    err = json_answer(500, b'{"error":{"type":"api_error"}}', reason=b"Internal Server Error")
    up = await raw_upstream(script(err, OK))
    sc = await make_sidecar(up.url, sleep=Sleeps())
    answers, _ = await exchange(sc.port, POST)
    assert answers[0].status == 200
    assert len({r.header("Idempotency-Key") for r in up.received}) == 1


async def test_dropped_connection_after_sending_is_retried_under_the_key(raw_upstream, make_sidecar):
    """A reset after the POST was sent is retried with the same key (safe: Stripe replays)."""
    answers_seq = [None, OK]

    def handler(r: Received):
        return answers_seq.pop(0) if len(answers_seq) > 1 else answers_seq[0]

    up = await raw_upstream(handler)
    sc = await make_sidecar(up.url, sleep=Sleeps())
    answers, _ = await exchange(sc.port, POST)
    assert answers[0].status == 200
    assert len(up.received) == 2
    assert up.received[0].header("Idempotency-Key") == up.received[1].header("Idempotency-Key")


async def test_large_bodies_are_never_retried(raw_upstream, make_sidecar):
    """A body above max_replay_body is streamed once; its failure goes back to the app."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(up.url, sleep=Sleeps(), retry={"max_replay_body": 16})
    body = b"x" * 100
    answers, _ = await exchange(sc.port, b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + body)
    assert answers[0].status == 503
    assert len(up.received) == 1


async def test_timeouts_are_retried_then_answered_504(raw_upstream, make_sidecar):
    """An upstream that never answers costs attempt_timeout on the clock per attempt (not less), then a
    Stripe-shaped 504."""
    async def silent(transport: asyncio.Transport) -> None:
        return None

    up = await raw_upstream(lambda r: silent)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url, clock=clock, sleep=clock.sleep, retry={"attempt_timeout": 5.0, "max_attempts": 2}
    )
    asking = asyncio.create_task(exchange(sc.port, GET))
    for attempt in (1, 2):
        await until(lambda n=attempt: len(up.received) == n)
        clock.advance(4.75)
        assert sc.deadlines.sweep() == 0
        clock.advance(0.25)
        assert sc.deadlines.sweep() == 1
    answers, _ = await asking
    a = answers[0]
    assert a.status == 504
    assert a.json()["error"]["code"] == "sidecar_upstream_timeout"
    assert len(up.received) == 2
    assert a.header("Stripe-Should-Retry") == b"false"


async def test_breaker_opens_and_fails_fast(raw_upstream, make_sidecar):
    """After consecutive upstream failures the breaker answers 503 sidecar_circuit_open without calling Stripe."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Sleeps(),
        retry={"max_attempts": 1},
        breaker={"consecutive_failures": 5},
    )
    for _ in range(5):
        answers, _ = await exchange(sc.port, GET)
        assert answers[0].status == 503
        assert answers[0].json()["error"]["code"] == "sidecar_upstream_gateway_error"
    answers, _ = await exchange(sc.port, GET)
    a = answers[0]
    assert a.status == 503
    assert a.json()["error"]["code"] == "sidecar_circuit_open"
    assert a.header("Stripe-Should-Retry") == b"false"
    assert int(a.header("Retry-After")) >= 1
    assert a.header("Sidecar-Attempts") == b"0"
    assert len(up.received) == 5
    assert sc.registry.get_sample_value("stripe_sidecar_breaker_state", {"scope": "GET /v1/customers/{customer}"}) == 2
    assert sc.registry.get_sample_value("stripe_sidecar_fail_fast_total", {"operation": "GET /v1/customers/{customer}", "reason": "circuit_open"}) == 1
    # Another operation still flows: one bad endpoint does not take the host down.
    answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].json()["error"]["code"] == "sidecar_upstream_gateway_error"
    assert len(up.received) == 6


async def test_breaker_heals_through_half_open_probes(raw_upstream, make_sidecar):
    """Once the open time has passed on the clock (not before), probes go through and successes close the
    breaker."""
    healthy = False
    up = await raw_upstream(lambda r: OK if healthy else HTML_503)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        sleep=clock.sleep,
        retry={"max_attempts": 1},
        breaker={"consecutive_failures": 3, "open_duration": 30.0, "open_duration_max": 30.0, "half_open_probes": 2},
    )
    for _ in range(3):
        await exchange(sc.port, GET)
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].json()["error"]["code"] == "sidecar_circuit_open"
    healthy = True
    clock.advance(29.75)
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].json()["error"]["code"] == "sidecar_circuit_open"
    clock.advance(0.25)
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200, "the breaker let no probe through once open_duration had passed"
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200
    assert sc.registry.get_sample_value("stripe_sidecar_breaker_state", {"scope": "GET /v1/customers/{customer}"}) == 0
    assert sc.registry.get_sample_value("stripe_sidecar_breaker_transitions_total", {"scope": "GET /v1/customers/{customer}", "state": "closed"}) == 1


async def test_declines_rate_limits_and_client_errors_never_trip_a_breaker(raw_upstream, make_sidecar):
    """402s, 429s and 4xx are not upstream failures: the breaker stays closed through many of them."""
    decline = NEVER_RETRIED[2]
    lock = json_answer(429, b'{"error":{"type":"invalid_request_error","code":"lock_timeout"}}', reason=b"Too Many Requests")
    answers_cycle = [decline, lock, NEVER_RETRIED[0]]
    count = 0

    def handler(r: Received) -> bytes:
        nonlocal count
        count += 1
        return answers_cycle[count % 3]

    up = await raw_upstream(handler)
    sc = await make_sidecar(up.url, sleep=Sleeps(), retry={"max_attempts": 1}, breaker={"consecutive_failures": 3, "min_calls": 5})
    for _ in range(30):
        answers, _ = await exchange(sc.port, POST)
        assert answers[0].status in (400, 402, 429)
    assert sc.registry.get_sample_value("stripe_sidecar_breaker_state", {"scope": "POST /v1/payment_intents"}) == 0
    assert len(up.received) == 30


async def test_host_breaker_opens_when_failures_span_operations(raw_upstream, make_sidecar):
    """Failures across several operations open the host breaker, failing fast even for a new operation."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Sleeps(),
        retry={"max_attempts": 1},
        breaker={"consecutive_failures": 100},
        host_breaker={"consecutive_failures": 6, "min_failing_operations": 3},
    )
    for path in (b"/v1/customers/cus_1", b"/v1/balance", b"/v1/charges/ch_1") * 2:
        await exchange(sc.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    answers, _ = await exchange(sc.port, b"GET /v1/refunds/re_1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].json()["error"]["code"] == "sidecar_circuit_open"
    assert len(up.received) == 6
    assert sc.registry.get_sample_value("stripe_sidecar_breaker_state", {"scope": "upstream"}) == 2


async def test_rate_limiter_refuses_locally_when_the_wait_is_too_long(raw_upstream, make_sidecar):
    """Under a ceiling, requests wait up to max_wait; past it they get a local 429 and Stripe sees nothing."""
    up = await raw_upstream(lambda r: OK)
    sleeps = Sleeps()
    sc = await make_sidecar(
        up.url,
        sleep=sleeps,
        ratelimit={"enabled": True, "endpoint_rate": 2.0, "endpoint_burst": 2.0, "max_wait": 0.6},
    )
    statuses = []
    for _ in range(4):
        answers, _ = await exchange(sc.port, GET)
        statuses.append(answers[0].status)
    # burst of 2, then a reservation 0.5 s ahead, then 1.0 s ahead (> max_wait): refused.
    assert statuses == [200, 200, 200, 429]
    assert 0.0 < sleeps.delays[0] <= 0.5
    assert len(up.received) == 3
    refused, _ = await exchange(sc.port, GET)
    err = refused[0].json()["error"]
    assert err["code"] == "sidecar_rate_limited"
    assert "Answered by the sidecar" in err["message"]
    assert refused[0].header("Retry-After") is not None


async def test_rate_limited_429_activates_that_operations_limiter(raw_upstream, make_sidecar):
    """A 429 naming endpoint-rate activates a limiter for that operation only, and the retry goes through."""
    limited = json_answer(429, b'{"error":{"type":"invalid_request_error","code":"rate_limit"}}', b"Stripe-Rate-Limited-Reason: endpoint-rate", reason=b"Too Many Requests")
    up = await raw_upstream(script(OK, limited, limited, OK))
    sleeps = Sleeps()
    sc = await make_sidecar(up.url, sleep=sleeps, ratelimit={"enabled": True, "max_wait": 5.0})
    first, _ = await exchange(sc.port, GET)
    assert first[0].status == 200
    assert sc.forwarder.limiter.rates() == {}  # dormant: no scope limits
    answers, _ = await exchange(sc.port, GET)
    assert answers[0].status == 200
    assert list(sc.forwarder.limiter.rates()) == ["GET /v1/customers/{customer}"]
    assert sc.forwarder.limiter.state()["GET /v1/customers/{customer}"]["adaptive"] is True
    assert len(up.received) == 4


async def test_bulkhead_bounds_requests_in_flight(raw_upstream, make_sidecar):
    """With one slot, a second concurrent request waits max_wait on the clock (not less), then gets 503
    sidecar_bulkhead_full."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow)
    clock = FakeClock()
    sc = await make_sidecar(up.url, clock=clock, bulkhead={"max_in_flight": 1, "max_wait": 2.0})
    first = asyncio.create_task(exchange(sc.port, GET))
    await until(lambda: len(up.received) == 1)
    second = asyncio.create_task(exchange(sc.port, GET))
    await until(lambda: len(sc.forwarder.bulkhead._waiters) == 1)
    clock.advance(1.75)
    assert sc.deadlines.sweep() == 0
    clock.advance(0.25)
    assert sc.deadlines.sweep() == 1
    answers, _ = await second
    assert answers[0].status == 503
    assert answers[0].json()["error"]["code"] == "sidecar_bulkhead_full"
    release.set()
    done, _ = await first
    assert done[0].status == 200
    assert len(up.received) == 1


async def test_retry_budget_caps_retries(raw_upstream, make_sidecar):
    """With a zero ratio and a tiny floor, only the floor's worth of retries is made."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        sleep=Sleeps(),
        retry={"budget_ratio": 0.0, "budget_min_per_second": 0.2, "budget_window": 10.0, "max_attempts": 4},
        breaker={"enabled": False},
        host_breaker={"enabled": False},
    )
    for _ in range(5):
        await exchange(sc.port, GET)
    # 0.2/s over a 10 s window = 2 retries in all (both by the first request), then none:
    # the first request is refused a third retry, the other four their first.
    assert len(up.received) == 5 + 2
    assert sc.registry.get_sample_value("stripe_sidecar_retry_budget_exhausted_total", {"operation": "GET /v1/customers/{customer}"}) == 5


async def test_retries_off_is_a_transparent_proxy(raw_upstream, make_sidecar):
    """With retries, breakers, limiter and injection off, a failure passes through after one attempt."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(
        up.url,
        retry={"enabled": False},
        breaker={"enabled": False},
        host_breaker={"enabled": False},
        idempotency={"inject": False},
        bulkhead={"enabled": False},
    )
    answers, _ = await exchange(sc.port, POST)
    assert answers[0].status == 503
    assert answers[0].body == b"<h1>overload</h1>"  # the upstream's page, not a sidecar error
    assert answers[0].header("Stripe-Should-Retry") is None
    assert len(up.received) == 1
    assert up.received[0].header("Idempotency-Key") is None


async def test_operation_limits_apply_to_that_operation_only(raw_upstream, make_sidecar):
    """An operation's own endpoint_rate ceiling throttles it while other operations stay unlimited."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(
        up.url,
        sleep=Sleeps(),
        ratelimit={"enabled": True, "max_wait": 0.01},
        operations={"GET /v1/customers/{customer}": {"limits": {"endpoint_rate": 1.0, "endpoint_burst": 1.0}}},
    )
    limited = [(await exchange(sc.port, GET))[0][0].status for _ in range(3)]
    others = [(await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"))[0][0].status for _ in range(3)]
    assert limited == [200, 429, 429]
    assert others == [200, 200, 200]


async def test_operation_max_in_flight_bounds_that_operation(raw_upstream, make_sidecar):
    """An operation's own max_in_flight refuses its excess while other operations still flow."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow if r.target.startswith(b"/v1/customers") else OK)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        bulkhead={"max_wait": 2.0},
        operations={"GET /v1/customers/{customer}": {"limits": {"max_in_flight": 1}}},
    )
    first = asyncio.create_task(exchange(sc.port, GET))
    await until(lambda: len(up.received) == 1)
    waiting = asyncio.create_task(exchange(sc.port, GET))
    await until(lambda: len(sc.forwarder.bulkhead._waiters) == 1)
    clock.advance(2.0)
    assert sc.deadlines.sweep() == 1
    second, _ = await waiting
    assert second[0].json()["error"]["code"] == "sidecar_bulkhead_full"
    other, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    assert other[0].status == 200
    release.set()
    done, _ = await first
    assert done[0].status == 200


async def test_final_html_gateway_page_becomes_a_stripe_shaped_error(raw_upstream, make_sidecar):
    """Giving up on a load balancer's HTML page answers Stripe-shaped JSON, so no SDK retries it."""
    up = await raw_upstream(lambda r: HTML_503)
    sc = await make_sidecar(up.url, sleep=Sleeps(), retry={"max_attempts": 2})
    answers, _ = await exchange(sc.port, POST)
    a = answers[0]
    assert a.status == 503
    err = a.json()["error"]
    assert err["type"] == "api_error"
    assert err["code"] == "sidecar_upstream_gateway_error"
    assert a.header("Stripe-Should-Retry") == b"false"
    assert a.header("Sidecar-Attempts") == b"2"
    assert a.header("Idempotency-Key") == up.received[0].header("Idempotency-Key")
    assert len(up.received) == 2


async def test_empty_idempotency_key_is_replaced_by_a_real_one(raw_upstream, make_sidecar):
    """An empty Idempotency-Key header counts as none: the POST gets a real key before any retry."""
    up = await raw_upstream(script(HTML_503, OK))
    sc = await make_sidecar(up.url, sleep=Sleeps())
    raw = POST.replace(b"Host: x\r\n", b"Host: x\r\nIdempotency-Key: \r\n")
    answers, _ = await exchange(sc.port, raw)
    assert answers[0].status == 200
    keys = [r.header("Idempotency-Key") for r in up.received]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0] and keys[0].startswith(b"sidecar-")
    assert all(sum(1 for n, _ in r.headers if n.lower() == b"idempotency-key") == 1 for r in up.received)


async def test_an_internal_error_gives_its_half_open_probe_back(raw_upstream, make_sidecar, monkeypatch):
    """A bug that costs a half-open probe its answer must not keep the breaker from probing again."""
    healthy = False
    up = await raw_upstream(lambda r: OK if healthy else HTML_503)
    clock = FakeClock()
    sc = await make_sidecar(
        up.url,
        clock=clock,
        sleep=clock.sleep,
        retry={"max_attempts": 1},
        breaker={"consecutive_failures": 1, "open_duration": 30.0, "open_duration_max": 30.0, "half_open_probes": 1},
    )
    await exchange(sc.port, GET)  # opens the breaker
    breaker = sc.forwarder.breakers()["GET /v1/customers/{customer}"]
    assert breaker.retry_after() > 0
    clock.advance(30.0)
    assert breaker.retry_after() == 0
    healthy = True

    def broken(*args, **kwargs):
        raise RuntimeError("a bug after admission, with the probe's permit taken")

    monkeypatch.setattr(Forwarder, "_make_safe", broken)
    answers, _ = await exchange(sc.port, GET)  # the probe: the bug answers 500
    assert answers[0].json()["error"]["code"] == "sidecar_internal_error"
    monkeypatch.undo()
    answers, _ = await exchange(sc.port, GET)  # the slot came back: a new probe goes through
    assert answers[0].status == 200
