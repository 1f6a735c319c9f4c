"""Operator endpoints and the process lifecycle: /health, /ready, /metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families
from rawclient import exchange, open_raw
from rawupstream import held, json_answer

from proxy import __version__

OK = json_answer(200, b'{"object":"customer"}')


async def test_health_reports_version_and_uptime(raw_upstream, make_sidecar):
    """/health answers 200 JSON with the version and a non-negative uptime."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    body = answers[0].json()
    assert answers[0].status == 200
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["uptime_seconds"] >= 0
    assert up.received == []


async def test_operator_endpoints_refuse_other_methods(raw_upstream, make_sidecar):
    """A POST to /health gets 405 and nothing is forwarded."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert answers[0].status == 405
    assert up.received == []


async def test_head_health_has_no_body(raw_upstream, make_sidecar):
    """HEAD /health returns the head only."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    reader, writer = await open_raw(sc.port)
    writer.write(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        first = await reader.readuntil(b"\r\n\r\n")
        second = await reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_metrics_use_operation_templates_never_ids(raw_upstream, make_sidecar):
    """/metrics counts requests by operation template, method, status class and outcome."""
    up = await raw_upstream(lambda r: OK if r.method == "GET" else json_answer(404, b'{"error":{"type":"invalid_request_error"}}'))
    sc = await make_sidecar(up.url)
    for cid in ("cus_A1", "cus_B2", "cus_C3"):
        await exchange(sc.port, b"GET /v1/customers/%s HTTP/1.1\r\nHost: x\r\n\r\n" % cid.encode())
    await exchange(sc.port, b"POST /v1/customers/cus_Z9 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    answers, _ = await exchange(sc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    text = answers[0].body.decode()
    assert "cus_" not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    get_key = ("stripe_sidecar_requests_total", (("method", "GET"), ("operation", "GET /v1/customers/{customer}"), ("outcome", "success"), ("status_class", "2xx")))
    post_key = ("stripe_sidecar_requests_total", (("method", "POST"), ("operation", "POST /v1/customers/{customer}"), ("outcome", "validation"), ("status_class", "4xx")))
    assert samples[get_key] == 3
    assert samples[post_key] == 1
    assert samples[("stripe_sidecar_upstream_attempt_duration_seconds_count", (("operation", "GET /v1/customers/{customer}"),))] == 3
    assert samples[("stripe_sidecar_in_flight_requests", ())] == 0
    assert samples[("stripe_sidecar_idempotency_keys_injected_total", (("operation", "POST /v1/customers/{customer}"),))] == 1


async def test_in_flight_gauge_counts_requests_being_handled(raw_upstream, make_sidecar):
    """While an upstream answer is pending, the in-flight gauge reads 1."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow)
    sc = await make_sidecar(up.url)
    pending = asyncio.create_task(exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"))
    deadline = time.monotonic() + 5
    while sc.registry.get_sample_value("stripe_sidecar_in_flight_requests") != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    release.set()
    answers, _ = await pending
    assert answers[0].status == 200
    assert sc.registry.get_sample_value("stripe_sidecar_in_flight_requests") == 0


async def test_ready_turns_503_when_draining(raw_upstream, make_sidecar):
    """/ready is 200 while serving and 503 (ready: false) as soon as shutdown begins, while Stripe calls are still served."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"drain_period": 30, "shutdown_grace": 31})
    answers, _ = await exchange(sc.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].status == 200 and answers[0].json()["ready"] is True
    hurry = asyncio.Event()
    stopping = asyncio.create_task(sc.stop(hurry))
    deadline = time.monotonic() + 5
    while not sc.server.stopping:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    ready, _ = await exchange(sc.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    served, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
    hurry.set()
    assert await stopping is True
    assert ready[0].status == 503 and ready[0].json() == {"ready": False, "breakers": {}}
    assert served[0].status == 200


async def test_a_slow_scrape_never_holds_up_a_stripe_request(raw_upstream, make_sidecar):
    """While /metrics is rendering (held on purpose), a Stripe request is answered; the scrape then completes and parses."""
    import threading

    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    await exchange(sc.port, b"GET /v1/customers/cus_abcdef HTTP/1.1\r\nHost: x\r\n\r\n")
    entered, gate = threading.Event(), threading.Event()

    class HeldCollector:
        def collect(self):
            entered.set()
            gate.wait(20)  # synchronous on purpose: a render on the event loop would freeze it
            return []

    sc.registry.register(HeldCollector())
    try:
        scrape = asyncio.create_task(exchange(sc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30))
        assert await asyncio.to_thread(entered.wait, 10)
        answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert answers[0].status == 200
        assert not scrape.done()
    finally:
        gate.set()
    answers, _ = await scrape
    assert answers[0].status == 200
    assert answers[0].header("Content-Type") == CONTENT_TYPE_LATEST.encode()
    families = {f.name: f for f in text_string_to_metric_families(answers[0].body.decode())}
    requests = {s.labels["operation"]: s.value for s in families["stripe_sidecar_requests"].samples if s.name.endswith("_total")}
    assert requests["GET /v1/customers/{customer}"] == 1
    assert "stripe_sidecar_in_flight_requests" in families
    assert "stripe_sidecar_upstream_attempt_duration_seconds" in families


async def test_head_metrics_has_the_length_of_the_body_and_no_body(raw_upstream, make_sidecar):
    """HEAD /metrics answers the head alone (the next answer follows at once) with a body length."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    reader, writer = await open_raw(sc.port)
    writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        first = await reader.readuntil(b"\r\n\r\n")
        second = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
    length = next(line for line in first.split(b"\r\n") if line.startswith(b"Content-Length:"))
    assert int(length.split(b":")[1]) > 0
