"""Prometheus metrics, every one registered on the registry it is given.

Labels are bounded: operation templates (``POST /v1/customers/{id}``), outcome names, status
classes, breaker scopes. Never IDs, keys or raw paths.

The families touched by every request (requests, request duration, attempts, attempt duration,
injected keys) and the in-flight gauge are plain counters kept per operation and turned into metric
families only when scraped (:class:`_HotCollector`): the hot path pays an integer increment and a
bisect, not a lock and a label look-up. Everything rarer uses prometheus_client's own types.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

__all__ = ["Metrics", "OperationMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_LABELS = [str(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_NS = "stripe_sidecar"


class _Histogram:
    """Bucket counts and a sum, observed without locks (the event loop is single-threaded)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets in Prometheus' form."""
        out: list[tuple[str, float]] = []
        running = 0
        for label, count in zip(_BUCKET_LABELS, self.counts, strict=True):
            running += count
            out.append((label, running))
        return out


class Metrics:
    """All of the sidecar's metric families."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = _NS
        self._ops: dict[str, OperationMetrics] = {}
        self.in_flight = 0  # client requests being handled now (exported by the collector)
        registry.register(_HotCollector(self))
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
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)


class OperationMetrics:
    """Counts for one operation: plain numbers on the hot path, labels only when scraped."""

    __slots__ = (
        "_m",
        "_operation",
        "attempt_duration",
        "attempts",
        "keys_injected",
        "method",
        "request_duration",
        "requests",
    )

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self._m = metrics
        self._operation = operation
        self.method = operation.split(" ", 1)[0]
        self.requests: dict[tuple[int, str], int] = {}
        self.attempts: dict[str, int] = {}
        self.keys_injected = 0
        self.request_duration = _Histogram()
        self.attempt_duration = _Histogram()

    def request(self, status: int, outcome: str, duration: float) -> None:
        """Count one answered client request."""
        key = (status // 100, outcome)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.request_duration.observe(duration)

    def attempt(self, outcome: str, duration: float) -> None:
        """Count one attempt to Stripe."""
        attempts = self.attempts
        attempts[outcome] = attempts.get(outcome, 0) + 1
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
        self.keys_injected += 1

    def limiter_wait(self, seconds: float) -> None:
        """Count a wait for a rate-limit token."""
        self._m.limiter_waits.labels(self._operation).inc()
        self._m.limiter_wait_seconds.labels(self._operation).inc(seconds)


class _HotCollector(Collector):
    """Turns the per-operation counts into metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """The families this collector owns (so the registry can refuse duplicates)."""
        return self._families(with_samples=False)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """The current values."""
        return self._families(with_samples=True)

    def _families(
        self, *, with_samples: bool
    ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            f"{_NS}_requests",
            "Client requests answered, by operation, method, status class and final outcome.",
            labels=["operation", "method", "status_class", "outcome"],
        )
        request_duration = HistogramMetricFamily(
            f"{_NS}_request_duration_seconds",
            "Time from a client request's head to its answer, retries and waits included.",
            labels=["operation"],
        )
        attempts = CounterMetricFamily(
            f"{_NS}_upstream_attempts",
            "Attempts sent to Stripe, by operation and the outcome of each.",
            labels=["operation", "outcome"],
        )
        attempt_duration = HistogramMetricFamily(
            f"{_NS}_upstream_attempt_duration_seconds",
            "Latency of each attempt to Stripe, until the answer's head (or failure).",
            labels=["operation"],
        )
        keys = CounterMetricFamily(
            f"{_NS}_idempotency_keys_injected",
            "POSTs that arrived without an Idempotency-Key and got one from the sidecar.",
            labels=["operation"],
        )
        in_flight = GaugeMetricFamily(
            f"{_NS}_in_flight_requests", "Client requests being handled now."
        )
        if with_samples:
            for name, op in sorted(self._m._ops.items()):
                for (cls, outcome), count in sorted(op.requests.items()):
                    status_class = _STATUS_CLASS.get(cls, "other")
                    requests.add_metric([name, op.method, status_class, outcome], count)
                for outcome, count in sorted(op.attempts.items()):
                    attempts.add_metric([name, outcome], count)
                if op.keys_injected:
                    keys.add_metric([name], op.keys_injected)
                for family, hist in (
                    (request_duration, op.request_duration),
                    (attempt_duration, op.attempt_duration),
                ):
                    if any(hist.counts):
                        family.add_metric([name], hist.buckets(), hist.total)
            in_flight.add_metric([], self._m.in_flight)
        yield requests
        yield request_duration
        yield attempts
        yield attempt_duration
        yield keys
        yield in_flight
