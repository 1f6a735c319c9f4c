"""The built-in observers of outcome records: Prometheus metrics and the access log."""

from __future__ import annotations

from bisect import bisect_left
from json.encoder import encode_basestring_ascii

from proxy.log import Logger
from proxy.metrics import BOUNDS, Metrics, OperationMetrics
from proxy.records import AttemptRecord, RequestRecord
from proxy.retry import GiveUp

__all__ = ["BuiltinObserver"]

_BUDGET = GiveUp.BUDGET.value
# The sidecar's own answers given before any send, counted as fail-fast by reason.
_FAIL_FAST = frozenset({"circuit_open", "rate_limited", "bulkhead_full", "overloaded"})
_MAX_NAMES = 4096  # operation names JSON-encoded once (the router bounds them; a backstop)


class _Operation:
    """What the built-in observer keeps per operation: its metrics and its JSON name."""

    __slots__ = ("metrics", "name")

    def __init__(self, metrics: OperationMetrics, name: str) -> None:
        self.metrics = metrics
        self.name = name  # JSON-encoded (quoted) for the access line


class BuiltinObserver:
    """Prometheus metrics and the access log, as one observer: where records are counted.

    Each record is counted straight into its operation's pending counts
    (:class:`~proxy.metrics.OperationMetrics`, moved into the library's children when the registry
    is collected), inline: one Python call per record, as a call costs about what its counting
    does. The logger formats the access line and the ``retry_scheduled`` event.
    """

    __slots__ = ("_access", "_log", "_metrics", "_ops")

    def __init__(self, metrics: Metrics, log: Logger) -> None:
        self._metrics = metrics
        self._log = log
        self._access = log.access_enabled
        self._ops: dict[str, _Operation] = {}  # by name: one dict look-up per record

    def _op(self, name: str) -> _Operation:
        op = _Operation(self._metrics.operation(name), encode_basestring_ascii(name))
        if len(self._ops) < _MAX_NAMES:
            self._ops[name] = op
        return op

    def attempt(self, record: AttemptRecord) -> None:
        """Count a send to Stripe; count and log the retry it leads to."""
        m = (self._ops.get(record.operation) or self._op(record.operation)).metrics
        outcome, duration = record.outcome, record.duration
        counts = m.attempt_counts
        counts[outcome] = counts.get(outcome, 0) + 1
        m.attempt_buckets[bisect_left(BOUNDS, duration)] += 1
        m.attempt_sum += duration
        if record.retry_in is not None:
            m.retry(outcome)
            log_retry(self._log, record)

    def request(self, record: RequestRecord) -> None:
        """Count an answered request and what happened on its way; log its line."""
        # One unpacking: a namedtuple's attribute costs a descriptor call each.
        name, _, status, outcome, attempts, duration, rid, _, injected, give_up, wait = record
        op = self._ops.get(name) or self._op(name)
        m = op.metrics
        by_class = m.request_counts.get(outcome)
        if by_class is None:
            by_class = m.request_counts[outcome] = {}
        status_class = status // 100
        by_class[status_class] = by_class.get(status_class, 0) + 1
        m.request_buckets[bisect_left(BOUNDS, duration)] += 1
        m.request_sum += duration
        if injected:
            m.key_count += 1
        if not attempts and outcome in _FAIL_FAST:
            m.fail_fast(outcome)
        elif give_up == _BUDGET:
            m.budget_exhausted()
        if wait > 0.0:
            m.limiter_wait(wait)
        if self._access:
            self._log.access(op.name, status, outcome, attempts, duration, rid, injected)


def log_retry(log: Logger, record: AttemptRecord) -> None:
    """The ``retry_scheduled`` event of an attempt a retry follows."""
    assert record.retry_in is not None
    log.event(
        "retry_scheduled",
        operation=record.operation,
        outcome=record.outcome,
        attempt=record.attempt,
        delay_ms=round(record.retry_in * 1000, 1),
    )
