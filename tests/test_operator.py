"""Operator endpoints and the process lifecycle: /health, /ready, /metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
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
    """/ready is 200 while serving and 503 once shutdown has begun."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].status == 200 and answers[0].json()["ready"] is True
    sc.server.draining = True
    assert json.loads(sc.operator(type("R", (), {"method": "GET"})(), "/ready").split(b"\r\n\r\n", 1)[1])["ready"] is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


async def test_sigterm_finishes_in_flight_requests_then_exits_0(raw_upstream):
    """`stripe-sidecar serve` drains on SIGTERM: the in-flight request completes, exit status 0."""
    release = asyncio.Event()

    slow = held(release, OK)

    up = await raw_upstream(lambda r: slow)
    port = _free_port()
    env = {**os.environ, "STRIPE_SIDECAR_LISTEN": f"127.0.0.1:{port}", "STRIPE_SIDECAR_UPSTREAM": up.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await asyncio.get_running_loop().run_in_executor(None, _wait_for_port, port, proc)
        pending = asyncio.create_task(exchange(port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n"))
        deadline = time.monotonic() + 5
        while not up.received:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        # New connections are refused once draining has begun.
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        release.set()
        answers, _ = await pending
        assert answers[0].status == 200
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        assert code == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert '"event":"stopped"' in out and '"clean":true' in out
    finally:
        if proc.poll() is None:
            proc.kill()
