"""The built-in observer: the same metrics and the same log lines as counting and logging apart."""

from __future__ import annotations

import io

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.observers import AccessLog, BuiltinObserver
from proxy.records import AttemptRecord, RequestRecord

OP = "POST /v1/payment_intents"
ATTEMPTS = [
    AttemptRecord(OP, 1, "gateway_error", 503, "overloaded", None, "req_1", None, 0.02, 0.25),
    AttemptRecord(OP, 2, "success", 200, None, None, "req_2", None, 0.011, None),
    AttemptRecord("GET /v1/customers/{customer}", 1, "timeout", 0, None, None, None, "timeout", 31.0, None),
]
REQUESTS = [
    RequestRecord(OP, "POST", 200, "success", 2, 0.3, "req_2", None, True, "answered", 0.0),
    RequestRecord(OP, "POST", 503, "circuit_open", 0, 0.0001, None, None, False, None, 0.0),
    RequestRecord(OP, "POST", 503, "gateway_error", 3, 1.5, 'req"3', None, True, "budget", 0.25),
    RequestRecord("GET /v1/customers/{customer}", "GET", 402, "card_declined", 1, 0.004999, "réq", None, False, "answered", 0.0),
]


class _Clock:
    def __init__(self) -> None:
        self.now = 1_764_504_000.0

    def __call__(self) -> float:
        self.now += 0.0007
        return self.now


def _apart(records: list[AttemptRecord | RequestRecord]) -> tuple[bytes, str]:
    """What the records come to counted by OperationMetrics' own methods and logged by AccessLog."""
    registry, out = CollectorRegistry(), io.StringIO()
    metrics, log = Metrics(registry), Logger(out, clock=_Clock())
    access = AccessLog(log)
    for record in records:
        op = metrics.operation(record.operation)
        if isinstance(record, AttemptRecord):
            op.attempt(record.outcome, record.duration)
            if record.retry_in is not None:
                op.retry(record.outcome)
            access.attempt(record)
            continue
        op.request(record.status, record.outcome, record.duration, record.key_injected)
        if record.attempts == 0:
            op.fail_fast(record.outcome)
        elif record.give_up == "budget":
            op.budget_exhausted()
        if record.limiter_wait > 0.0:
            op.limiter_wait(record.limiter_wait)
        access.request(record)
    log.flush()
    return generate_latest(registry), out.getvalue()


def _builtin(records: list[AttemptRecord | RequestRecord]) -> tuple[bytes, str]:
    registry, out = CollectorRegistry(), io.StringIO()
    log = Logger(out, clock=_Clock())
    observer = BuiltinObserver(Metrics(registry), log)
    for record in records:
        if isinstance(record, AttemptRecord):
            observer.attempt(record)
        else:
            observer.request(record)
    log.flush()
    return generate_latest(registry), out.getvalue()


def test_the_builtin_observer_counts_and_logs_as_metrics_and_access_log_apart():
    """Every series and every line (retries, fail-fast, budget, limiter waits, odd ids) the same."""
    records: list[AttemptRecord | RequestRecord] = [
        ATTEMPTS[0], ATTEMPTS[1], REQUESTS[0], REQUESTS[1], ATTEMPTS[2], REQUESTS[2], REQUESTS[3]
    ]  # fmt: skip
    exposition, lines = _builtin(records)
    assert (exposition, lines) == _apart(records)
    assert lines.count('"event":"request"') == 4 and lines.count("retry_scheduled") == 1


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
