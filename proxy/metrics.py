"""Prometheus metrics, every one registered on the registry it is given.

Labels are bounded: operation names (``POST /v1/customers/{customer}``, see :mod:`proxy.routes`),
outcome names, status classes, breaker scopes. Never IDs, keys or raw paths.

Every family is one of prometheus_client's own types. The per-request families (requests, attempts,
their latency histograms, injected keys) are counted on the hot path in plain numbers per operation
(:class:`OperationMetrics`) by the built-in observer (:class:`proxy.observers.BuiltinObserver`): a
dict add and a bisect, no lock, no child. Whenever the registry is collected (a scrape,
``get_sample_value``) those counts move into the library's children first (:meth:`Metrics.flush`),
so every reader sees every request counted. The in-flight gauge reads a plain integer the pipeline
keeps (``Metrics.in_flight``). Counts are kept and moved by the thread that made the
:class:`Metrics` (the event loop's); ``/metrics`` moves them there and then renders in a worker
thread, so the loop stays free (:meth:`Metrics.render_async`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

__all__ = ["BOUNDS", "CONTENT_TYPE", "Metrics", "OperationMetrics", "add_observations"]

# The exposition format generate_latest writes, as the library names it.
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The upper bounds of every bucket, +Inf last, as prometheus_client's Histogram keeps them.
BOUNDS = _BOUNDS = (*LATENCY_BUCKETS, float("inf"))
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_NS = "stripe_sidecar"


def add_observations(child: Histogram, counts: list[int], total: float) -> None:
    """Add observations, counted per bucket, to a histogram child, as ``observe`` would have.

    ``counts[i]`` observations fell in bucket ``i`` (the first whose bound is at least the
    value: ``bisect_left`` over the bounds, +Inf last) and ``total`` is their sum. The library
    has no public call for a batch, so this adds to the child's own bucket and sum values (the
    same ``inc`` that ``observe`` makes); tests compare the exposition with observing one by one.
    """
    child._sum.inc(total)
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class _Flush:
    """A collector with no series of its own: collecting the registry first moves the counts."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        if threading.get_ident() == self._metrics.owner:
            self._metrics.flush()
        return ()


class Metrics:
    """All of the sidecar's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # No `_created` series: a timestamp per child, a seventh more series to scrape, and
        # nothing we use (a process-wide switch of the library; every registry here wants it).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        ns = _NS
        self._ops: dict[str, OperationMetrics] = {}
        # The thread that counts (the event loop's) is the only one that moves counts.
        self.owner = threading.get_ident()
        registry.register(_Flush(self))  # before the families, so it is collected first
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

    def flush(self) -> None:
        """Move every operation's pending counts into the library's children (owner thread)."""
        for op in self._ops.values():
            op.flush()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered (blocks while it runs)."""
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """:meth:`render` in a worker thread; concurrent scrapes share one rendering.

        The counts move into the children here, on the loop's thread, before the worker renders.
        """
        pending = self._rendering
        if pending is None:
            self.flush()
            pending = self._rendering = asyncio.ensure_future(asyncio.to_thread(self.render))
            pending.add_done_callback(self._rendered)
        return await asyncio.shield(pending)

    def _rendered(self, _: asyncio.Future[bytes]) -> None:
        self._rendering = None


class OperationMetrics:
    """One operation's per-request counts, kept in plain numbers until :meth:`flush`.

    :class:`~proxy.observers.BuiltinObserver` counts each record into them; the rare families
    (retries, fail-fast, budget, limiter waits) are counted here, straight into the children.
    """

    __slots__ = (
        "_attempt_child",
        "_attempts_children",
        "_key_child",
        "_m",
        "_method",
        "_operation",
        "_request_child",
        "_requests_children",
        "attempt_buckets",
        "attempt_counts",
        "attempt_sum",
        "key_count",
        "request_buckets",
        "request_counts",
        "request_sum",
    )

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self._m = metrics
        self._operation = operation
        self._method = operation.split(" ", 1)[0]
        # Pending counts since the last flush: answers by outcome and status // 100 (two dicts:
        # cheaper than hashing a tuple key twice per answer), attempts by outcome, observations
        # per latency bucket (``bisect_left(BOUNDS, seconds)``) and their sums, injected keys.
        # The built-in observer (proxy.observers) adds to them inline: no call per record.
        self.request_counts: dict[str, dict[int, int]] = {}  # outcome -> status // 100 -> n
        self.attempt_counts: dict[str, int] = {}
        self.request_buckets = [0] * len(_BOUNDS)
        self.attempt_buckets = [0] * len(_BOUNDS)
        self.request_sum = 0.0
        self.attempt_sum = 0.0
        self.key_count = 0
        # The histogram series exist from the operation's first request, as before any count.
        self._request_child = metrics.request_duration.labels(operation)
        self._attempt_child = metrics.attempt_duration.labels(operation)
        # Counter children, made at the first flush that has a count for them.
        self._requests_children: dict[tuple[int, str], Counter] = {}
        self._attempts_children: dict[str, Counter] = {}
        self._key_child: Counter | None = None

    def flush(self) -> None:
        """Move the pending counts into the library's children, and start again from zero."""
        m, op = self._m, self._operation
        for outcome, by_class in self.request_counts.items():
            for status_class, n in by_class.items():
                self._request_child_of(status_class, outcome).inc(n)
        self.request_counts.clear()
        for outcome, n in self.attempt_counts.items():
            child = self._attempts_children.get(outcome)
            if child is None:
                child = self._attempts_children[outcome] = m.attempts.labels(op, outcome)
            child.inc(n)
        self.attempt_counts.clear()
        if self.key_count:
            if self._key_child is None:
                self._key_child = m.keys_injected.labels(op)
            self._key_child.inc(self.key_count)
            self.key_count = 0
        if self.request_sum or any(self.request_buckets):
            add_observations(self._request_child, self.request_buckets, self.request_sum)
            self.request_buckets = [0] * len(_BOUNDS)
            self.request_sum = 0.0
        if self.attempt_sum or any(self.attempt_buckets):
            add_observations(self._attempt_child, self.attempt_buckets, self.attempt_sum)
            self.attempt_buckets = [0] * len(_BOUNDS)
            self.attempt_sum = 0.0

    def _request_child_of(self, status_class: int, outcome: str) -> Counter:
        key = (status_class, outcome)
        child = self._requests_children.get(key)
        if child is None:
            child = self._requests_children[key] = self._m.requests.labels(
                self._operation, self._method, _STATUS_CLASS.get(status_class, "other"), outcome
            )
        return child

    # -- rare: counted straight into the children ------------------------------------------
    def retry(self, outcome: str) -> None:
        """Count a retry caused by ``outcome``."""
        self._m.retries.labels(self._operation, outcome).inc()

    def fail_fast(self, reason: str) -> None:
        """Count an answer given without calling Stripe."""
        self._m.fail_fast.labels(self._operation, reason).inc()

    def budget_exhausted(self) -> None:
        """Count a retry refused by the budget."""
        self._m.budget_exhausted.labels(self._operation).inc()

    def limiter_wait(self, seconds: float) -> None:
        """Count a wait for a rate-limit token."""
        self._m.limiter_waits.labels(self._operation).inc()
        self._m.limiter_wait_seconds.labels(self._operation).inc(seconds)
