"""Metric families on prometheus_client's own types: exact buckets, children resolved once.

Answers and attempts are counted as the sidecar counts them, by records through the built-in
observer.
"""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.log import Logger
from proxy.metrics import CONTENT_TYPE, LATENCY_BUCKETS, Metrics, add_observations
from proxy.observers import BuiltinObserver
from proxy.records import AttemptRecord, RequestRecord

OP = "GET /v1/customers/{customer}"


def _observer(metrics: Metrics) -> BuiltinObserver:
    """The built-in observer counting into ``metrics`` (no access lines)."""
    return BuiltinObserver(metrics, Logger(io.StringIO(), access_log=False))


def _answer(duration: float, status: int = 200, outcome: str = "success", *, op: str = OP, key_injected: bool = False) -> RequestRecord:
    """An answer after one attempt: no fail-fast, no budget, no limiter wait."""
    return RequestRecord(op, op.split(" ", 1)[0], status, outcome, 1, duration, None, None, key_injected, "answered", 0.0)


def _attempt(duration: float, outcome: str = "success", *, op: str = OP) -> AttemptRecord:
    """A final attempt (no retry follows)."""
    return AttemptRecord(op, 1, outcome, 200, None, None, None, None, duration, None)


def _bucket(reg: CollectorRegistry, family: str, le: str) -> float | None:
    return reg.get_sample_value(f"{family}_bucket", {"operation": OP, "le": le})


@pytest.mark.parametrize("family", ["stripe_sidecar_request_duration_seconds", "stripe_sidecar_upstream_attempt_duration_seconds"])
def test_an_observation_on_a_bucket_boundary_lands_in_that_bucket(family):
    """le is inclusive: 0.1 counts in le=0.1, a hair above in le=0.25, above 30 only in +Inf."""
    reg = CollectorRegistry()
    observer = _observer(Metrics(reg))
    for value in (0.1, 0.1000001, 31.0):
        if family.endswith("request_duration_seconds"):
            observer.request(_answer(value))
        else:
            observer.attempt(_attempt(value))
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
    observer = _observer(Metrics(reg))
    for bound in LATENCY_BUCKETS:
        observer.request(_answer(bound))
    for i, bound in enumerate(LATENCY_BUCKETS):
        assert _bucket(reg, "stripe_sidecar_request_duration_seconds", str(bound)) == i + 1


def test_requests_attempts_and_keys_are_counted_by_their_labels():
    """Status classes, outcomes and injected keys land on their own labelled series."""
    reg = CollectorRegistry()
    observer = _observer(Metrics(reg))
    post = "POST /v1/customers/{customer}"
    observer.request(_answer(0.01, op=post, key_injected=True))
    observer.request(_answer(0.01, 201, op=post))
    observer.request(_answer(0.01, 402, "card_declined", op=post))
    observer.attempt(_attempt(0.5, "timeout", op=post))
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
    """After an operation's first scrape, neither counting nor the next scrape looks a label up."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    op = m.operation(OP)
    observer = _observer(m)
    observer.request(_answer(0.01, key_injected=True))
    observer.attempt(_attempt(0.01))
    generate_latest(reg)

    def no_lookup(*_: object) -> None:
        raise AssertionError("label look-up on the hot path")

    for family in (m.requests, m.attempts, m.request_duration, m.attempt_duration, m.keys_injected):
        monkeypatch.setattr(family, "labels", no_lookup)
    observer.request(_answer(0.02, key_injected=True))
    observer.attempt(_attempt(0.02))
    assert m.operation(OP) is op
    assert reg.get_sample_value("stripe_sidecar_idempotency_keys_injected_total", {"operation": OP}) == 2
    assert reg.get_sample_value("stripe_sidecar_upstream_attempts_total", {"operation": OP, "outcome": "success"}) == 2


def test_counting_touches_no_child_until_the_registry_is_collected():
    """The hot path only adds plain numbers; a scrape (any collect) moves them, exactly once."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    observer = _observer(m)
    for _ in range(3):
        observer.request(_answer(0.01))
    assert [f.samples for f in m.requests.collect()] == [[]]  # the family alone: nothing moved yet
    assert reg.get_sample_value("stripe_sidecar_requests_total", {"operation": OP, "method": "GET", "status_class": "2xx", "outcome": "success"}) == 3
    assert reg.get_sample_value("stripe_sidecar_requests_total", {"operation": OP, "method": "GET", "status_class": "2xx", "outcome": "success"}) == 3
    assert reg.get_sample_value("stripe_sidecar_request_duration_seconds_count", {"operation": OP}) == 3


async def test_a_render_in_the_worker_thread_never_moves_counts():
    """Only the owner thread moves counts: render_async moves them before the worker renders."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    observer = _observer(m)
    observer.attempt(_attempt(0.01))
    text = (await m.render_async()).decode()
    assert 'stripe_sidecar_upstream_attempts_total{operation="GET /v1/customers/{customer}",outcome="success"} 1.0' in text
    observer.attempt(_attempt(0.01))
    text = (await asyncio.to_thread(m.render)).decode()  # another thread: the count stays put
    assert 'stripe_sidecar_upstream_attempts_total{operation="GET /v1/customers/{customer}",outcome="success"} 1.0' in text
    assert reg.get_sample_value("stripe_sidecar_upstream_attempts_total", {"operation": OP, "outcome": "success"}) == 2


_AWKWARD = [0.0, -0.5, 0.005, 0.0050000001, 0.01, 0.099, 0.1, 0.25, 1.0, 2.5, 29.9, 30.0, 30.0001, 1e9, float("inf"), 1e-12]


@pytest.mark.parametrize("flushes", [1, 3])
def test_counted_observations_expose_exactly_what_observe_does(flushes):
    """Counting per operation then flushing gives the exposition observe() gives, value by value."""
    values = [v * k for k in (1, 1.5, 0.3) for v in _AWKWARD if v != float("inf")] + [float("inf")]
    direct_reg, counted_reg = CollectorRegistry(), CollectorRegistry()
    direct = Metrics(direct_reg)
    direct_req = direct.request_duration.labels(OP)
    direct_att = direct.attempt_duration.labels(OP)
    counted = Metrics(counted_reg)
    observer = _observer(counted)
    for i, value in enumerate(values):
        direct_req.observe(value)
        direct_att.observe(value)
        direct.requests.labels(OP, "GET", "2xx", "success").inc()
        direct.attempts.labels(OP, "success").inc()
        observer.request(_answer(value))
        observer.attempt(_attempt(value))
        if flushes > 1 and i % (len(values) // flushes) == 0:
            counted.flush()
    direct_text = generate_latest(direct_reg).decode().splitlines()
    counted_text = generate_latest(counted_reg).decode().splitlines()
    if flushes == 1:
        assert counted_text == direct_text
    else:  # sums added in another grouping may differ in the last bit; everything else is exact
        assert [line for line in counted_text if "_sum" not in line] == [line for line in direct_text if "_sum" not in line]
        sums = [(a, b) for a, b in zip(counted_text, direct_text, strict=True) if "_sum{" in a]
        assert len(sums) == 2
        for a, b in sums:
            assert a.rsplit(" ", 1)[0] == b.rsplit(" ", 1)[0]
            assert float(a.rsplit(" ", 1)[1]) == pytest.approx(float(b.rsplit(" ", 1)[1]))


def test_add_observations_adds_counts_and_sum_to_the_childs_own_values():
    """Bucket i gets counts[i] (cumulative in the exposition) and the sum grows by total."""
    reg = CollectorRegistry()
    h = Histogram("h_seconds", "h", buckets=(1.0, 2.0), registry=reg)
    h.observe(0.5)
    add_observations(h, [2, 0, 3], 7.5)
    assert reg.get_sample_value("h_seconds_bucket", {"le": "1.0"}) == 3
    assert reg.get_sample_value("h_seconds_bucket", {"le": "2.0"}) == 3
    assert reg.get_sample_value("h_seconds_bucket", {"le": "+Inf"}) == 6
    assert reg.get_sample_value("h_seconds_sum") == 8.0


def test_content_type_is_the_librarys():
    """/metrics declares the exposition format prometheus_client writes."""
    assert CONTENT_TYPE == CONTENT_TYPE_LATEST


async def test_concurrent_renders_share_one_pass_and_parse():
    """Two scrapes at once collect once, off the loop, and both get the full parseable text."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    _observer(m).request(_answer(0.01))
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
    observer = _observer(Metrics(reg))
    observer.request(_answer(0.01))
    observer.attempt(_attempt(0.01))
    expected = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "+Inf"]
    histograms = {f.name: [s.labels["le"] for s in f.samples if s.name.endswith("_bucket")] for f in reg.collect() if f.type == "histogram"}
    assert histograms == {
        "stripe_sidecar_request_duration_seconds": expected,
        "stripe_sidecar_upstream_attempt_duration_seconds": expected,
    }
