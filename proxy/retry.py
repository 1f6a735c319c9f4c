"""Retry policy: whether to repeat an attempt, how long to wait, and the retry budget.

Pure: the clock and the random source are arguments, nothing sleeps. The I/O layer asks
:func:`should_retry`, then :meth:`RetryBudget.try_acquire`, then waits :func:`retry_delay`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from proxy.classify import Outcome, Verdict
from proxy.window import SecondBuckets

__all__ = [
    "RetryBudget",
    "RetrySettings",
    "backoff_delay",
    "parse_retry_after",
    "retry_delay",
    "should_retry",
]


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How the sidecar repeats attempts that failed in a retryable way."""

    enabled: bool = True
    max_attempts: int = 4  # total attempts including the first
    base_delay: float = 0.05  # seconds; full-jitter exponential backoff
    max_delay: float = 1.0
    attempt_timeout: float = 10.0  # per attempt (the I/O layer enforces it)
    deadline: float = 20.0  # overall per request, well under the SDKs' 80 s timeout
    retry_after_cap: float = 2.0  # Retry-After honoured up to this
    lock_timeout_delay: float = 0.05  # base for lock_timeout retries (short)
    max_replay_body: int = 1 << 20  # request bodies above this are not buffered, so not retried
    budget_ratio: float = 0.2  # retries at most this share of requests in the window ...
    budget_min_per_second: float = 5.0  # ... plus this floor
    budget_window: float = 10.0


# Methods Stripe lets us repeat without an idempotency key (keys have no effect on GET; DELETE is
# idempotent in Stripe). Everything else (POST, PATCH, ...) needs the same key on every attempt.
_REPEATABLE_METHODS = frozenset({"GET", "HEAD", "DELETE"})

# 2 ** 62 times any sane base is far past any cap; beyond that the float maths would overflow.
_MAX_EXPONENT = 62

_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def backoff_delay(retry_number: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Full-jitter exponential backoff: ``rand() * min(cap, base * 2 ** (retry_number - 1))``.

    ``retry_number`` starts at 1 (the first retry); ``rand`` returns a float in [0, 1).
    """
    exponent = retry_number - 1
    if exponent < 0:
        exponent = 0
    elif exponent > _MAX_EXPONENT:
        exponent = _MAX_EXPONENT
    ceiling = base * (1 << exponent)
    if ceiling > cap:
        ceiling = cap
    return rand() * ceiling


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date.

    ``now`` is the wall clock (epoch seconds) for the date form; a date in the past means 0.0.
    Absent, negative or unparsable values give None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    try:
        delta = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return delta if delta > 0.0 else 0.0


def retry_delay(
    verdict: Verdict,
    retry_number: int,
    retry_after: float | None,
    settings: RetrySettings,
    rand: Callable[[], float],
) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 = the first retry).

    Lock timeouts back off from the short ``lock_timeout_delay``; everything else from
    ``base_delay``. A server-given ``retry_after`` is honoured up to ``retry_after_cap``: the delay
    is the larger of the backoff and the capped ``retry_after``.
    """
    base = (
        settings.lock_timeout_delay
        if verdict.outcome is Outcome.LOCK_TIMEOUT
        else settings.base_delay
    )
    delay = backoff_delay(retry_number, base, settings.max_delay, rand)
    if retry_after is not None:
        hinted = retry_after if retry_after < settings.retry_after_cap else settings.retry_after_cap
        if hinted > delay:
            delay = hinted
    return delay


def should_retry(
    verdict: Verdict,
    *,
    attempt: int,
    settings: RetrySettings,
    elapsed: float,
    has_idempotency_key: bool,
    method: str,
    body_replayable: bool,
) -> bool:
    """Whether another attempt may follow attempt number ``attempt`` (1 = the first).

    Requires retries enabled, a retryable verdict, attempts and the overall deadline left, a body
    that can be sent again, and a request that is safe to repeat: GET/HEAD/DELETE always; other
    methods only with an idempotency key (the same key on every attempt, so a saved 500 is
    replayed, never re-executed), unless the request certainly never reached Stripe.
    The retry budget is separate: ask :meth:`RetryBudget.try_acquire` after this says yes.
    """
    if not (verdict.retryable and settings.enabled):
        return False
    if attempt >= settings.max_attempts or elapsed >= settings.deadline:
        return False
    if not body_replayable:
        return False
    return has_idempotency_key or not verdict.sent or method in _REPEATABLE_METHODS


class RetryBudget:
    """Caps retries to a share of recent requests plus a floor, over a sliding window.

    A retry is allowed while ``retries < ratio * requests + min_per_second * window``, both counted
    over the last ``window`` seconds in a ring of one-second buckets (the current, partial second
    included). The clock is monotonic seconds.
    """

    __slots__ = ("_clock", "_floor", "_ratio", "_requests", "_retries", "_window")

    def __init__(
        self, ratio: float, min_per_second: float, window: float, clock: Callable[[], float]
    ) -> None:
        if window <= 0:
            raise ValueError(f"retry budget window must be positive, not {window!r}")
        self._clock = clock
        self._ratio = ratio
        self._floor = min_per_second * window
        self._window = SecondBuckets(window, 2, clock())
        self._requests, self._retries = self._window.rings

    def record_request(self) -> None:
        """Count one client request (call once per request, not per attempt)."""
        now = self._clock()
        window = self._window
        if now >= window.edge:
            window.advance(now)
        self._requests[window.idx] += 1

    def try_acquire(self) -> bool:
        """Whether a retry may be made now; if so it is counted. False = budget exhausted."""
        now = self._clock()
        window = self._window
        if now >= window.edge:
            window.advance(now)
        if sum(self._retries) < self._ratio * sum(self._requests) + self._floor:
            self._retries[window.idx] += 1
            return True
        return False

    def counts(self) -> tuple[int, int]:
        """``(requests, retries)`` in the current window, for metrics and the status page."""
        now = self._clock()
        if now >= self._window.edge:
            self._window.advance(now)
        return sum(self._requests), sum(self._retries)
