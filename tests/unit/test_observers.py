"""The built-in observer: every series and every log line a run of records comes to, written out."""

from __future__ import annotations

import io

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.observers import BuiltinObserver
from proxy.records import AttemptRecord, RequestRecord

OP = "POST /v1/payment_intents"
GET = "GET /v1/customers/{customer}"
ATTEMPTS = [
    AttemptRecord(OP, 1, "gateway_error", 503, "overloaded", None, "req_1", None, 0.02, 0.25),
    AttemptRecord(OP, 2, "success", 200, None, None, "req_2", None, 0.011, None),
    AttemptRecord(GET, 1, "timeout", 0, None, None, None, "timeout", 31.0, None),
]
REQUESTS = [
    RequestRecord(OP, "POST", 200, "success", 2, 0.3, "req_2", None, True, "answered", 0.0),
    RequestRecord(OP, "POST", 503, "circuit_open", 0, 0.0001, None, None, False, None, 0.0),
    RequestRecord(OP, "POST", 503, "gateway_error", 3, 1.5, 'req"3', None, True, "budget", 0.25),
    RequestRecord(GET, "GET", 402, "card_declined", 1, 0.004999, "réq", None, False, "answered", 0.0),
]
# A retry, its success and the answer; a refusal; a timeout; an answer after the budget ran out
# (with a limiter wait); a decline just under the first bucket's bound.
RECORDS: list[AttemptRecord | RequestRecord] = [
    ATTEMPTS[0], ATTEMPTS[1], REQUESTS[0], REQUESTS[1], ATTEMPTS[2], REQUESTS[2], REQUESTS[3]
]  # fmt: skip
_NOW = 1_764_504_000.5  # 2025-11-30T12:00:00.500Z


def _observe(records: list[AttemptRecord | RequestRecord]) -> tuple[list[str], list[str]]:
    """The exposition's samples (no HELP or TYPE lines) and the log lines the records come to."""
    registry, out = CollectorRegistry(), io.StringIO()
    log = Logger(out, clock=lambda: _NOW)
    observer = BuiltinObserver(Metrics(registry), log)
    for record in records:
        if isinstance(record, AttemptRecord):
            observer.attempt(record)
        else:
            observer.request(record)
    log.flush()
    exposition = generate_latest(registry).decode().splitlines()
    return [line for line in exposition if not line.startswith("#")], out.getvalue().splitlines()


def _histogram(family: str, operation: str, cumulative: list[int], total: str) -> list[str]:
    """The sample lines of one histogram child: cumulative counts per bound, +Inf last."""
    bounds = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "+Inf"]
    assert len(cumulative) == len(bounds)
    labels = f'operation="{operation}"'
    return [
        *(f'{family}_bucket{{le="{le}",{labels}}} {n:.1f}' for le, n in zip(bounds, cumulative, strict=True)),
        f"{family}_count{{{labels}}} {cumulative[-1]:.1f}",
        f"{family}_sum{{{labels}}} {total}",
    ]


_REQ = "stripe_sidecar_request_duration_seconds"
_ATT = "stripe_sidecar_upstream_attempt_duration_seconds"
# Worked out from the records: the first bucket whose bound is at least the duration.
SERIES = [
    'stripe_sidecar_requests_total{method="POST",operation="POST /v1/payment_intents",outcome="success",status_class="2xx"} 1.0',
    'stripe_sidecar_requests_total{method="POST",operation="POST /v1/payment_intents",outcome="circuit_open",status_class="5xx"} 1.0',
    'stripe_sidecar_requests_total{method="POST",operation="POST /v1/payment_intents",outcome="gateway_error",status_class="5xx"} 1.0',
    'stripe_sidecar_requests_total{method="GET",operation="GET /v1/customers/{customer}",outcome="card_declined",status_class="4xx"} 1.0',
    # POST answers: 0.0001 (le 0.005), 0.3 (le 0.5), 1.5 (le 2.5)
    *_histogram(_REQ, OP, [1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3], "1.8001"),
    # GET answer: 0.004999 (le 0.005)
    *_histogram(_REQ, GET, [1] * 13, "0.004999"),
    'stripe_sidecar_upstream_attempts_total{operation="POST /v1/payment_intents",outcome="gateway_error"} 1.0',
    'stripe_sidecar_upstream_attempts_total{operation="POST /v1/payment_intents",outcome="success"} 1.0',
    'stripe_sidecar_upstream_attempts_total{operation="GET /v1/customers/{customer}",outcome="timeout"} 1.0',
    # POST attempts: 0.02 and 0.011 (both le 0.025)
    *_histogram(_ATT, OP, [0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], "0.031"),
    # GET attempt: 31.0 (over the last bound: +Inf only)
    *_histogram(_ATT, GET, [0] * 12 + [1], "31.0"),
    'stripe_sidecar_idempotency_keys_injected_total{operation="POST /v1/payment_intents"} 2.0',
    "stripe_sidecar_in_flight_requests 0.0",
    'stripe_sidecar_retries_total{operation="POST /v1/payment_intents",outcome="gateway_error"} 1.0',
    'stripe_sidecar_fail_fast_total{operation="POST /v1/payment_intents",reason="circuit_open"} 1.0',
    "stripe_sidecar_client_connections_over_bound_total 0.0",
    'stripe_sidecar_retry_budget_exhausted_total{operation="POST /v1/payment_intents"} 1.0',
    'stripe_sidecar_ratelimit_waits_total{operation="POST /v1/payment_intents"} 1.0',
    'stripe_sidecar_ratelimit_wait_seconds_total{operation="POST /v1/payment_intents"} 0.25',
]
_TS = '{"ts":"2025-11-30T12:00:00.500Z","level":"info",'
LINES = [
    _TS + '"event":"retry_scheduled","operation":"POST /v1/payment_intents","outcome":"gateway_error","attempt":1,"delay_ms":250.0}',
    _TS + '"event":"request","operation":"POST /v1/payment_intents","status":200,"outcome":"success","attempts":2,"duration_ms":300.00,"request_id":"req_2","key_injected":true}',
    _TS + '"event":"request","operation":"POST /v1/payment_intents","status":503,"outcome":"circuit_open","attempts":0,"duration_ms":0.10,"request_id":null,"key_injected":false}',
    _TS + '"event":"request","operation":"POST /v1/payment_intents","status":503,"outcome":"gateway_error","attempts":3,"duration_ms":1500.00,"request_id":"req\\"3","key_injected":true}',
    _TS + '"event":"request","operation":"GET /v1/customers/{customer}","status":402,"outcome":"card_declined","attempts":1,"duration_ms":5.00,"request_id":"r\\u00e9q","key_injected":false}',
]


def test_the_builtin_observer_exposes_every_series_the_records_come_to():
    """Requests, attempts, both histograms, keys, retries, fail-fast, budget and limiter waits."""
    series, _ = _observe(RECORDS)
    assert sorted(series) == sorted(SERIES)  # in any order: the counts, not the children's order


def test_the_builtin_observer_logs_every_line_the_records_come_to():
    """The retry when it is scheduled, then one access line per answer, odd request ids escaped."""
    _, lines = _observe(RECORDS)
    assert lines == LINES


@pytest.mark.parametrize(
    ("status", "outcome", "counted"),
    [(503, "circuit_open", True), (429, "rate_limited", True), (503, "bulkhead_full", True),
     (503, "overloaded", True), (401, "client_token_required", False), (202, "queued", False)],
)  # fmt: skip
def test_only_the_sidecars_refusals_count_as_fail_fast(status, outcome, counted):
    """An answer without an attempt is fail-fast by its reason only if the reason is a refusal."""
    record = RequestRecord(OP, "POST", status, outcome, 0, 0.001, None, None, False, None, 0.0)
    series, _ = _observe([record])
    line = f'stripe_sidecar_fail_fast_total{{operation="POST /v1/payment_intents",reason="{outcome}"}} 1.0'
    assert (line in series) is counted
    assert sum(s.startswith("stripe_sidecar_fail_fast_total") for s in series) == counted


def test_the_builtin_observer_writes_no_access_line_when_the_access_log_is_off():
    """access_log false: metrics still counted, no request lines."""
    out = io.StringIO()
    registry = CollectorRegistry()
    log = Logger(out, access_log=False)
    BuiltinObserver(Metrics(registry), log).request(REQUESTS[0])
    log.flush()
    assert out.getvalue() == ""
    labels = {"operation": OP, "method": "POST", "status_class": "2xx", "outcome": "success"}
    assert registry.get_sample_value("stripe_sidecar_requests_total", labels) == 1
