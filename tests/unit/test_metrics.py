"""Metric families on prometheus_client's own types: exact buckets, children resolved once."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import CONTENT_TYPE, LATENCY_BUCKETS, Metrics

OP = "GET /v1/customers/{customer}"


def _bucket(reg: CollectorRegistry, family: str, le: str) -> float | None:
    return reg.get_sample_value(f"{family}_bucket", {"operation": OP, "le": le})


@pytest.mark.parametrize("family", ["stripe_sidecar_request_duration_seconds", "stripe_sidecar_upstream_attempt_duration_seconds"])
def test_an_observation_on_a_bucket_boundary_lands_in_that_bucket(family):
    """le is inclusive: 0.1 counts in le=0.1, a hair above in le=0.25, above 30 only in +Inf."""
    reg = CollectorRegistry()
    op = Metrics(reg).operation(OP)
    for value in (0.1, 0.1000001, 31.0):
        if family.endswith("request_duration_seconds"):
            op.request(200, "success", value)
        else:
            op.attempt("success", value)
    assert _bucket(reg, family, "0.05") == 0
    assert _bucket(reg, family, "0.1") == 1
    assert _bucket(reg, family, "0.25") == 2
    assert _bucket(reg, family, "30.0") == 2
    assert _bucket(reg, family, "+Inf") == 3
    assert reg.get_sample_value(f"{family}_count", {"operation": OP}) == 3
    assert reg.get_sample_value(f"{family}_sum", {"operation": OP}) == pytest.approx(31.2000001)


def test_every_bucket_bound_is_inclusive():
    """Each configured bound, observed once, lands exactly in its own bucket (cumulative i+1)."""
    reg = CollectorRegistry()
    op = Metrics(reg).operation(OP)
    for bound in LATENCY_BUCKETS:
        op.request(200, "success", bound)
    for i, bound in enumerate(LATENCY_BUCKETS):
        assert _bucket(reg, "stripe_sidecar_request_duration_seconds", str(bound)) == i + 1


def test_requests_attempts_and_keys_are_counted_by_their_labels():
    """Status classes, outcomes and injected keys land on their own labelled series."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    op = m.operation("POST /v1/customers/{customer}")
    op.request(200, "success", 0.01)
    op.request(201, "success", 0.01)
    op.request(402, "card_declined", 0.01)
    op.attempt("timeout", 0.5)
    op.key_injected()
    labels = {"operation": "POST /v1/customers/{customer}", "method": "POST"}
    assert reg.get_sample_value("stripe_sidecar_requests_total", {**labels, "status_class": "2xx", "outcome": "success"}) == 2
    assert reg.get_sample_value("stripe_sidecar_requests_total", {**labels, "status_class": "4xx", "outcome": "card_declined"}) == 1
    assert reg.get_sample_value("stripe_sidecar_upstream_attempts_total", {"operation": "POST /v1/customers/{customer}", "outcome": "timeout"}) == 1
    assert reg.get_sample_value("stripe_sidecar_idempotency_keys_injected_total", {"operation": "POST /v1/customers/{customer}"}) == 1
    assert reg.get_sample_value("stripe_sidecar_idempotency_keys_injected_total", {"operation": OP}) is None


def test_in_flight_gauge_reads_the_pipelines_counter_when_scraped():
    """Metrics.in_flight is a plain integer the pipeline moves; the gauge shows its value."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.in_flight += 3
    assert reg.get_sample_value("stripe_sidecar_in_flight_requests") == 3
    m.in_flight -= 3
    assert reg.get_sample_value("stripe_sidecar_in_flight_requests") == 0


def test_hot_path_children_are_resolved_once(monkeypatch):
    """After the first request and attempt of an operation, no label look-up happens again."""
    m = Metrics(CollectorRegistry())
    op = m.operation(OP)
    op.request(200, "success", 0.01)
    op.attempt("success", 0.01)
    op.key_injected()

    def no_lookup(*_: object) -> None:
        raise AssertionError("label look-up on the hot path")

    for family in (m.requests, m.attempts, m.request_duration, m.attempt_duration, m.keys_injected):
        monkeypatch.setattr(family, "labels", no_lookup)
    op.request(200, "success", 0.02)
    op.attempt("success", 0.02)
    op.key_injected()
    assert m.operation(OP) is op


def test_content_type_is_the_librarys():
    """/metrics declares the exposition format prometheus_client writes."""
    assert CONTENT_TYPE == CONTENT_TYPE_LATEST


async def test_concurrent_renders_share_one_pass_and_parse():
    """Two scrapes at once collect once, off the loop, and both get the full parseable text."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.operation(OP).request(200, "success", 0.01)
    entered, gate = threading.Event(), threading.Event()
    calls = []

    class Slow:
        def collect(self):
            calls.append(1)
            entered.set()
            gate.wait(10)
            return []

    reg.register(Slow())
    try:
        first = asyncio.create_task(m.render_async())
        assert await asyncio.to_thread(entered.wait, 10)
        second = asyncio.create_task(m.render_async())
        await asyncio.sleep(0)
        assert not first.done() and not second.done()
    finally:
        gate.set()
    a, b = await first, await second
    assert a == b and calls == [1]
    names = {f.name for f in text_string_to_metric_families(a.decode())}
    assert {"stripe_sidecar_requests", "stripe_sidecar_request_duration_seconds", "stripe_sidecar_in_flight_requests"} <= names


def test_latency_buckets_are_the_documented_ones():
    """Both latency histograms expose exactly these bounds (dashboards and alerts depend on them)."""
    reg = CollectorRegistry()
    op = Metrics(reg).operation(OP)
    op.request(200, "success", 0.01)
    op.attempt("success", 0.01)
    expected = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "+Inf"]
    histograms = {f.name: [s.labels["le"] for s in f.samples if s.name.endswith("_bucket")] for f in reg.collect() if f.type == "histogram"}
    assert histograms == {
        "stripe_sidecar_request_duration_seconds": expected,
        "stripe_sidecar_upstream_attempt_duration_seconds": expected,
    }
