"""The built-in observers of outcome records: Prometheus metrics and the access log."""

from __future__ import annotations

import json

from proxy.log import Logger
from proxy.metrics import Metrics, OperationMetrics
from proxy.records import AttemptRecord, RequestRecord
from proxy.retry import GiveUp

__all__ = ["AccessLog", "MetricsRecorder"]

_BUDGET = GiveUp.BUDGET.value
# The sidecar's own answers given before any send, counted as fail-fast by reason.
_FAIL_FAST = frozenset({"circuit_open", "rate_limited", "bulkhead_full", "overloaded"})


class MetricsRecorder:
    """Counts attempts, retries and answers into :class:`~proxy.metrics.Metrics`."""

    __slots__ = ("_metrics", "_ops")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ops: dict[str, OperationMetrics] = {}  # by name: one dict look-up per record

    def _op(self, name: str) -> OperationMetrics:
        op = self._ops[name] = self._metrics.operation(name)
        return op

    def attempt(self, record: AttemptRecord) -> None:
        """Count a send to Stripe, and the retry it leads to."""
        op = self._ops.get(record.operation) or self._op(record.operation)
        op.attempt(record.outcome, record.duration)
        if record.retry_in is not None:
            op.retry(record.outcome)

    def request(self, record: RequestRecord) -> None:
        """Count an answered request and what happened on its way."""
        op = self._ops.get(record.operation) or self._op(record.operation)
        op.request(record.status, record.outcome, record.duration, record.key_injected)
        if record.attempts == 0 and record.outcome in _FAIL_FAST:
            op.fail_fast(record.outcome)
        elif record.give_up == _BUDGET:
            op.budget_exhausted()
        if record.limiter_wait > 0.0:
            op.limiter_wait(record.limiter_wait)


class AccessLog:
    """Writes the one ``request`` log line per answer and a ``retry_scheduled`` per retry."""

    __slots__ = ("_access", "_log", "_names")

    def __init__(self, log: Logger) -> None:
        self._log = log
        self._access = log.access_enabled
        self._names: dict[str, str] = {}  # operation -> its JSON string, encoded once

    def attempt(self, record: AttemptRecord) -> None:
        """Log a scheduled retry."""
        if record.retry_in is not None:
            self._log.event(
                "retry_scheduled",
                operation=record.operation,
                outcome=record.outcome,
                attempt=record.attempt,
                delay_ms=round(record.retry_in * 1000, 1),
            )

    def request(self, record: RequestRecord) -> None:
        """Log the answer."""
        if not self._access:
            return
        name = self._names.get(record.operation)
        if name is None:
            name = json.dumps(record.operation)
            if len(self._names) < 4096:
                self._names[record.operation] = name
        self._log.access(
            name,
            record.status,
            record.outcome,
            record.attempts,
            record.duration,
            record.request_id,
            record.key_injected,
        )
