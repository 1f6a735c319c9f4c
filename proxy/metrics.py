"""Prometheus metrics, every one registered on the registry it is given.

Labels are bounded: operation templates (``POST /v1/customers/{id}``), outcome names, status
classes, breaker scopes. Never IDs, keys or raw paths. The per-operation children are resolved
once (see :class:`OperationMetrics`) so recording a request costs a few dict look-ups.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

__all__ = ["Metrics", "OperationMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Metrics:
    """All of the sidecar's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = "stripe_sidecar"
        self.requests = Counter(
            f"{ns}_requests",
            "Client requests answered, by operation, method, status class and final outcome.",
            ["operation", "method", "status_class", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{ns}_request_duration_seconds",
            "Time from a client request's head to its answer, retries and waits included.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.attempt_duration = Histogram(
            f"{ns}_upstream_attempt_duration_seconds",
            "Latency of each attempt to Stripe, until the answer's head (or failure).",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            f"{ns}_upstream_attempts",
            "Attempts sent to Stripe, by operation and the outcome of each.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            f"{ns}_retries",
            "Retries made, by operation and the outcome that caused them.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{ns}_in_flight_requests",
            "Client requests being handled now.",
            registry=registry,
        )
        self.fail_fast = Counter(
            f"{ns}_fail_fast",
            "Requests answered by the sidecar without calling Stripe, by reason.",
            ["operation", "reason"],
            registry=registry,
        )
        self.budget_exhausted = Counter(
            f"{ns}_retry_budget_exhausted",
            "Retries not made because the retry budget was spent.",
            ["operation"],
            registry=registry,
        )
        self.keys_injected = Counter(
            f"{ns}_idempotency_keys_injected",
            "POSTs that arrived without an Idempotency-Key and got one from the sidecar.",
            ["operation"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            f"{ns}_breaker_state",
            "Circuit breaker state per scope: 0 closed, 1 half-open, 2 open.",
            ["scope"],
            registry=registry,
        )
        self.breaker_transitions = Counter(
            f"{ns}_breaker_transitions",
            "Circuit breaker state changes, by scope and new state.",
            ["scope", "state"],
            registry=registry,
        )
        self.limiter_waits = Counter(
            f"{ns}_ratelimit_waits",
            "Requests that waited for a client-side rate-limit token.",
            ["operation"],
            registry=registry,
        )
        self.limiter_wait_seconds = Counter(
            f"{ns}_ratelimit_wait_seconds",
            "Total time requests waited for rate-limit tokens.",
            ["operation"],
            registry=registry,
        )
        self.limiter_rate = Gauge(
            f"{ns}_ratelimit_rate",
            "Current client-side rate limit (requests/s) per scope, after adapting to 429s.",
            ["scope"],
            registry=registry,
        )
        self._ops: dict[str, OperationMetrics] = {}

    def operation(self, operation: str) -> OperationMetrics:
        """The pre-resolved children for one operation (created on first use)."""
        found = self._ops.get(operation)
        if found is None:
            found = self._ops[operation] = OperationMetrics(self, operation)
        return found

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)


class OperationMetrics:
    """Metric children for one operation, so the hot path does no label resolution."""

    __slots__ = (
        "_attempts",
        "_m",
        "_method",
        "_operation",
        "_requests",
        "attempt_duration",
        "request_duration",
    )

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self._m = metrics
        self._operation = operation
        self._method = operation.split(" ", 1)[0]
        self.request_duration = metrics.request_duration.labels(operation)
        self.attempt_duration = metrics.attempt_duration.labels(operation)
        self._requests: dict[tuple[int, str], Counter] = {}
        self._attempts: dict[str, Counter] = {}

    def request(self, status: int, outcome: str, duration: float) -> None:
        """Count one answered client request."""
        key = (status // 100, outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._m.requests.labels(
                self._operation, self._method, _STATUS_CLASS.get(key[0], "other"), outcome
            )
        child.inc()
        self.request_duration.observe(duration)

    def attempt(self, outcome: str, duration: float) -> None:
        """Count one attempt to Stripe."""
        child = self._attempts.get(outcome)
        if child is None:
            child = self._attempts[outcome] = self._m.attempts.labels(self._operation, outcome)
        child.inc()
        self.attempt_duration.observe(duration)

    def retry(self, outcome: str) -> None:
        """Count a retry caused by ``outcome``."""
        self._m.retries.labels(self._operation, outcome).inc()

    def fail_fast(self, reason: str) -> None:
        """Count an answer given without calling Stripe."""
        self._m.fail_fast.labels(self._operation, reason).inc()

    def budget_exhausted(self) -> None:
        """Count a retry refused by the budget."""
        self._m.budget_exhausted.labels(self._operation).inc()

    def key_injected(self) -> None:
        """Count an injected Idempotency-Key."""
        self._m.keys_injected.labels(self._operation).inc()

    def limiter_wait(self, seconds: float) -> None:
        """Count a wait for a rate-limit token."""
        self._m.limiter_waits.labels(self._operation).inc()
        self._m.limiter_wait_seconds.labels(self._operation).inc(seconds)
