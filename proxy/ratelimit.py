"""Client-side rate limiter: stay under Stripe's account-wide and per-endpoint limits.

Pure: the clock is an argument (monotonic seconds), nothing sleeps. Two token buckets per request
(the account's global one and the operation's), with reservations in the future like Go's
``rate.Limiter.Reserve``: a bucket may go negative, so whoever reserves first goes first. Rates
adapt AIMD-style to Stripe's 429s: a ``Stripe-Rate-Limited-Reason`` multiplies the rate of the
scope it names by ``decrease_factor``; the rate then climbs back by ``recover_per_second`` per
second up to the configured one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GLOBAL_SCOPE", "RateLimitSettings", "RateLimiter"]

GLOBAL_SCOPE = "global"


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Token-bucket rates and bursts, the longest wait, and how rates adapt to Stripe's 429s."""

    enabled: bool = True
    global_rate: float = 100.0  # requests/s for the whole account (Stripe live-mode default)
    global_burst: float = 100.0
    endpoint_rate: float = 25.0  # per operation (Stripe's default per-endpoint limit)
    endpoint_burst: float = 25.0
    max_wait: float = 1.0  # a request waits at most this long for a token
    decrease_factor: float = 0.5  # on a 429 naming a scope: that scope's rate *= factor
    min_rate: float = 1.0
    # Additive recovery: each second a decreased scope regains this share of its configured
    # rate (0.25: from half to full in 2 s), so recovery takes the same time at any scale.
    recover_share_per_second: float = 0.25
    # A burst of requests in flight all get their 429 together: decrease a scope at most once
    # per this many seconds, so one overload halves the rate once rather than to min_rate.
    decrease_interval: float = 0.5


_GLOBAL_REASONS = frozenset({"global-rate", "global-concurrency"})


class _Bucket:
    """One token bucket; ``tokens`` may be negative (reserved ahead)."""

    __slots__ = (
        "burst",
        "full_burst",
        "full_rate",
        "last",
        "last_decrease",
        "rate",
        "recover",
        "recovering",
        "tokens",
    )

    def __init__(self, rate: float, burst: float, now: float, recover_share: float) -> None:
        self.recover = rate * recover_share  # requests/s regained per second
        self.full_rate = rate
        self.full_burst = burst
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now
        self.recovering = False
        self.last_decrease = -float("inf")

    def sync(self, now: float) -> None:
        """Bring tokens (and a recovering rate) up to ``now``; takes nothing."""
        recover_per_second = self.recover
        elapsed = now - self.last
        if elapsed <= 0.0:
            return
        rate = self.rate
        if self.recovering:
            # The rate climbs linearly, then stays at full: integrate it exactly.
            to_full = (self.full_rate - rate) / recover_per_second
            if elapsed < to_full:
                new_rate = rate + recover_per_second * elapsed
                gained = elapsed * (rate + new_rate) * 0.5
            else:
                new_rate = self.full_rate
                gained = to_full * (rate + new_rate) * 0.5 + (elapsed - to_full) * new_rate
                self.recovering = False
            self.rate = new_rate
            self.burst = self._scaled_burst(new_rate)
        else:
            gained = elapsed * rate
        tokens = self.tokens + gained
        self.tokens = tokens if tokens < self.burst else self.burst
        self.last = now

    def decrease(self, now: float, settings: RateLimitSettings) -> None:
        """Cut the rate by ``decrease_factor`` (not below ``min_rate``); the burst shrinks alike."""
        if now - self.last_decrease < settings.decrease_interval:
            return
        self.sync(now)
        self.last_decrease = now
        rate = self.rate * settings.decrease_factor
        floor = min(settings.min_rate, self.full_rate)
        self.rate = rate if rate > floor else floor
        self.burst = self._scaled_burst(self.rate)
        if self.tokens > self.burst:
            self.tokens = self.burst
        self.recovering = self.rate < self.full_rate and self.recover > 0.0

    def current_rate(self, now: float) -> float:
        """The effective rate at ``now`` without changing the bucket."""
        if not self.recovering:
            return self.rate
        rate = self.rate + self.recover * max(0.0, now - self.last)
        return rate if rate < self.full_rate else self.full_rate

    def _scaled_burst(self, rate: float) -> float:
        burst = self.full_burst * rate / self.full_rate
        return burst if burst > 1.0 else 1.0


class RateLimiter:
    """The account-wide bucket plus one bucket per operation, created on first use."""

    __slots__ = ("_clock", "_enabled", "_endpoints", "_global", "_max_wait", "_share", "settings")

    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float]) -> None:
        if settings.global_rate <= 0 or settings.endpoint_rate <= 0:
            raise ValueError("rate limiter rates must be positive")
        if settings.global_burst < 1 or settings.endpoint_burst < 1:
            raise ValueError("rate limiter bursts must be at least 1")
        self.settings = settings
        self._clock = clock
        self._enabled = settings.enabled
        self._max_wait = settings.max_wait
        self._share = settings.recover_share_per_second
        self._global = _Bucket(settings.global_rate, settings.global_burst, clock(), self._share)
        self._endpoints: dict[str, _Bucket] = {}

    def reserve(self, endpoint: str) -> float | None:
        """Take a token from the global and the ``endpoint`` bucket; return the seconds to wait.

        0.0 means go now. None means the wait would exceed ``max_wait``: nothing is taken. A
        positive wait is a reservation: the caller waits that long, then sends without asking
        again; later callers queue behind it.
        """
        if not self._enabled:
            return 0.0
        now = self._clock()
        g, e = self._global, self._endpoint(endpoint, now)
        wait, g_tokens, e_tokens = self._wait(now, g, e)
        if wait is None:
            return None
        g.tokens = g_tokens
        g.last = now
        e.tokens = e_tokens
        e.last = now
        return wait

    def peek(self, endpoint: str) -> float | None:
        """What :meth:`reserve` would answer now, without taking anything."""
        if not self._enabled:
            return 0.0
        now = self._clock()
        return self._wait(now, self._global, self._endpoint(endpoint, now))[0]

    def _endpoint(self, endpoint: str, now: float) -> _Bucket:
        e = self._endpoints.get(endpoint)
        if e is None:
            e = self._endpoints[endpoint] = _Bucket(
                self.settings.endpoint_rate, self.settings.endpoint_burst, now, self._share
            )
        return e

    def _wait(self, now: float, g: _Bucket, e: _Bucket) -> tuple[float | None, float, float]:
        """Seconds until both buckets have a token, and their tokens after taking one."""
        if g.recovering:
            g.sync(now)
        if e.recovering:
            e.sync(now)
        g_tokens = g.tokens + (now - g.last) * g.rate
        if g_tokens > g.burst:
            g_tokens = g.burst
        g_tokens -= 1.0
        e_tokens = e.tokens + (now - e.last) * e.rate
        if e_tokens > e.burst:
            e_tokens = e.burst
        e_tokens -= 1.0
        if g_tokens >= 0.0 and e_tokens >= 0.0:
            return 0.0, g_tokens, e_tokens
        g_wait = -g_tokens / g.rate if g_tokens < 0.0 else 0.0
        e_wait = -e_tokens / e.rate if e_tokens < 0.0 else 0.0
        wait = g_wait if g_wait > e_wait else e_wait
        return (None if wait > self._max_wait else wait), g_tokens, e_tokens

    def set_endpoint_limit(self, endpoint: str, rate: float, burst: float) -> None:
        """Give ``endpoint`` its own rate and burst (e.g. Stripe's 20/s for Files and Search)."""
        if rate <= 0 or burst < 1:
            raise ValueError("an endpoint's rate must be positive and its burst at least 1")
        self._endpoints[endpoint] = _Bucket(rate, burst, self._clock(), self._share)

    def on_rate_limited(self, endpoint: str, reason: str | None) -> None:
        """Slow down the scope a 429's ``Stripe-Rate-Limited-Reason`` names.

        ``global-rate``/``global-concurrency`` slow the account bucket; ``endpoint-rate``,
        ``endpoint-concurrency`` (and any reason not known yet) slow the ``endpoint`` bucket.
        None (a lock timeout) and ``resource-specific`` (a limit on one object, such as updates
        to one PaymentIntent, not on the endpoint) change nothing: backoff handles them.
        """
        if reason is None or not self._enabled:
            return
        reason = reason.strip().lower()
        if not reason or reason == "resource-specific":
            return
        now = self._clock()
        if reason in _GLOBAL_REASONS:
            self._global.decrease(now, self.settings)
            return
        bucket = self._endpoints.get(endpoint)
        if bucket is None:
            bucket = self._endpoints[endpoint] = _Bucket(
                self.settings.endpoint_rate, self.settings.endpoint_burst, now, self._share
            )
        bucket.decrease(now, self.settings)

    def rates(self) -> dict[str, float]:
        """Current effective rate (requests/s) per scope: ``"global"`` and each endpoint seen."""
        now = self._clock()
        result = {GLOBAL_SCOPE: self._global.current_rate(now)}
        for endpoint, bucket in self._endpoints.items():
            result[endpoint] = bucket.current_rate(now)
        return result
