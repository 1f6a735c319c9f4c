"""Prometheus metrics, every one registered on the registry it is given.

Labels are bounded: operation names (``POST /v1/customers/{customer}``, see :mod:`proxy.routes`),
outcome names, status classes, breaker scopes. Never IDs, keys or raw paths.

Every family is one of prometheus_client's own types. The hot path never looks a label up: each
operation's children are resolved once (:class:`OperationMetrics`), and the in-flight gauge reads a
plain integer the pipeline keeps (``Metrics.in_flight``) only when scraped. Rendering is safe from a
worker thread (prometheus_client guards its values with locks), which is how ``/metrics`` keeps
the event loop free (:meth:`Metrics.render_async`).
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics", "OperationMetrics"]

# The exposition format generate_latest writes, as the library names it.
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_NS = "stripe_sidecar"


class Metrics:
    """All of the sidecar's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # No `_created` series: a timestamp per child, a seventh more series to scrape, and
        # nothing we use (a process-wide switch of the library; every registry here wants it).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        ns = _NS
        self._ops: dict[str, OperationMetrics] = {}
        self._rendering: asyncio.Future[bytes] | None = None
        self.in_flight = 0  # client requests being handled now (read by the gauge when scraped)
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
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            f"{ns}_upstream_attempts",
            "Attempts sent to Stripe, by operation and the outcome of each.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.attempt_duration = Histogram(
            f"{ns}_upstream_attempt_duration_seconds",
            "Latency of each attempt to Stripe, until the answer's head (or failure).",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.keys_injected = Counter(
            f"{ns}_idempotency_keys_injected",
            "POSTs that arrived without an Idempotency-Key and got one from the sidecar.",
            ["operation"],
            registry=registry,
        )
        in_flight = Gauge(
            f"{ns}_in_flight_requests", "Client requests being handled now.", registry=registry
        )
        in_flight.set_function(lambda: self.in_flight)
        self._rare(registry)

    def _rare(self, registry: CollectorRegistry) -> None:
        """Families touched only on retries, refusals, breaker and limiter changes."""
        ns = _NS
        self.retries = Counter(
            f"{ns}_retries",
            "Retries made, by operation and the outcome that caused them.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.fail_fast = Counter(
            f"{ns}_fail_fast",
            "Requests answered by the sidecar without calling Stripe, by reason.",
            ["operation", "reason"],
            registry=registry,
        )
        self.connections_over_bound = Counter(
            f"{ns}_client_connections_over_bound",
            "Client connections over server.max_connections, answered 503 sidecar_overloaded.",
            registry=registry,
        )
        self.budget_exhausted = Counter(
            f"{ns}_retry_budget_exhausted",
            "Retries not made because the retry budget was spent.",
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

    def operation(self, operation: str) -> OperationMetrics:
        """The pre-resolved children for one operation (created on first use)."""
        found = self._ops.get(operation)
        if found is None:
            found = self._ops[operation] = OperationMetrics(self, operation)
        return found

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered (blocks while it runs)."""
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """:meth:`render` in a worker thread; concurrent scrapes share one rendering."""
        pending = self._rendering
        if pending is None:
            pending = self._rendering = asyncio.ensure_future(asyncio.to_thread(self.render))
            pending.add_done_callback(self._rendered)
        return await asyncio.shield(pending)

    def _rendered(self, _: asyncio.Future[bytes]) -> None:
        self._rendering = None


class OperationMetrics:
    """One operation's metric children, resolved once so the hot path only counts."""

    __slots__ = (
        "_attempt_seconds",
        "_attempts",
        "_keys_injected",
        "_m",
        "_method",
        "_operation",
        "_request_seconds",
        "_requests",
    )

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self._m = metrics
        self._operation = operation
        self._method = operation.split(" ", 1)[0]
        # Children keyed by the labels that vary per call, made on first use.
        self._requests: dict[tuple[int, str], Counter] = {}
        self._attempts: dict[str, Counter] = {}
        self._keys_injected: Counter | None = None  # only POSTs get keys: no 0 series for GETs
        self._request_seconds = metrics.request_duration.labels(operation).observe
        self._attempt_seconds = metrics.attempt_duration.labels(operation).observe

    def request(self, status: int, outcome: str, duration: float) -> None:
        """Count one answered client request."""
        key = (status // 100, outcome)
        child = self._requests.get(key)
        if child is None:
            status_class = _STATUS_CLASS.get(key[0], "other")
            child = self._requests[key] = self._m.requests.labels(
                self._operation, self._method, status_class, outcome
            )
        child.inc()
        self._request_seconds(duration)

    def attempt(self, outcome: str, duration: float) -> None:
        """Count one attempt to Stripe."""
        child = self._attempts.get(outcome)
        if child is None:
            child = self._attempts[outcome] = self._m.attempts.labels(self._operation, outcome)
        child.inc()
        self._attempt_seconds(duration)

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
        child = self._keys_injected
        if child is None:
            child = self._keys_injected = self._m.keys_injected.labels(self._operation)
        child.inc()

    def limiter_wait(self, seconds: float) -> None:
        """Count a wait for a rate-limit token."""
        self._m.limiter_waits.labels(self._operation).inc()
        self._m.limiter_wait_seconds.labels(self._operation).inc(seconds)
