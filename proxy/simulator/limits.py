"""Stripe's request-rate limiters: a token bucket per API key, and optionally per endpoint.

Pure: the clock is an argument. Stripe counts requests per account (100/s live, 25/s in a
sandbox by default) and per endpoint; an exhausted bucket answers ``429`` with
``Stripe-Rate-Limited-Reason: global-rate`` or ``endpoint-rate``. Off unless a rate is set.
"""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        tokens = self.tokens + (now - self.last) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class AccountLimits:
    """The account-wide (per API key) and per-endpoint buckets of one simulator."""

    def __init__(
        self,
        *,
        account_rate: float | None,
        account_burst: float | None,
        endpoint_rate: float | None,
        endpoint_burst: float | None,
        clock: Callable[[], float],
    ) -> None:
        self._account = (account_rate, account_burst or account_rate)
        self._endpoint = (endpoint_rate, endpoint_burst or endpoint_rate)
        self._clock = clock
        self._buckets: dict[tuple[str, str | None], TokenBucket] = {}
        self.enabled = account_rate is not None or endpoint_rate is not None

    def check(self, key: str, operation: str | None) -> str | None:
        """Count one request by ``key``; the ``Stripe-Rate-Limited-Reason`` if it is refused.

        The account bucket is asked first; a request it refuses takes no endpoint token.
        """
        now = self._clock()
        rate, burst = self._account
        if (
            rate is not None
            and burst is not None
            and not self._bucket((key, None), rate, burst, now).take(now)
        ):
            return "global-rate"
        rate, burst = self._endpoint
        if (
            rate is not None
            and burst is not None
            and operation is not None
            and not self._bucket((key, operation), rate, burst, now).take(now)
        ):
            return "endpoint-rate"
        return None

    def _bucket(
        self, name: tuple[str, str | None], rate: float, burst: float, now: float
    ) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(rate, max(1.0, burst), now)
        return bucket
