"""Retry policy: what follows an attempt, how long to wait, and the retry budget.

Pure: the clock and the random source are arguments, nothing sleeps. After every attempt the
pipeline reads the shared state a retry would need into :class:`Gates` (without taking anything)
and asks :func:`next_step`, which returns either a retry after a delay or the reason the answer
just received is the final one. Only then does the pipeline take the budget, breaker and limiter
permits the retry needs.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import NamedTuple

from proxy.classify import Outcome, Verdict
from proxy.window import SecondBuckets

__all__ = [
    "REPEATABLE_METHODS",
    "Gates",
    "GiveUp",
    "RetryBudget",
    "RetrySettings",
    "Step",
    "backoff_delay",
    "next_step",
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


# Methods that may be repeated without an idempotency key: keys have no effect on GET, DELETE is
# idempotent in Stripe, and HEAD and OPTIONS are safe (RFC 9110 9.2.1). Everything else (POST,
# PATCH, ...) needs the same key on every attempt. The one definition the pipeline uses too.
REPEATABLE_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})

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
    return has_idempotency_key or not verdict.sent or method in REPEATABLE_METHODS


class GiveUp(enum.StrEnum):
    """Why the answer an attempt got is the final one; the value is the log and record label."""

    ANSWERED = "answered"  # a success, or an answer that repeating cannot change
    NOT_SAFE = "not_safe"  # retries off, or a request that may not be repeated (POST, no key)
    BODY_GONE = "body_gone"  # the request body was streamed, or the answer already streams
    ATTEMPTS = "attempts"  # max_attempts reached
    DEADLINE = "deadline"  # the overall deadline has passed, or would during the backoff
    CLIENT_GONE = "client_gone"  # nobody is waiting for the answer any more
    BUDGET = "budget"  # the retry budget is spent
    RATE_LIMITED = "rate_limited"  # the limiter would make the retry wait too long
    BREAKER_OPEN = "breaker_open"  # a breaker opened since the attempt started
    KEYS_EXHAUSTED = "keys_exhausted"  # a 401 after switching keys once already


@dataclass(frozen=True, slots=True)
class Gates:
    """The shared state a retry needs, read just before deciding (nothing is taken yet)."""

    client_connected: bool = True
    budget_available: bool = True
    breakers_admit: bool = True
    limiter_wait: float = 0.0  # seconds until the limiter lets this operation send
    limiter_max_wait: float = 0.0  # how much longer than the backoff a retry may wait for it
    # The sidecar holds another key, checked on the same account, to try after a 401.
    next_key_available: bool = False


_OPEN_GATES = Gates()


class Step(NamedTuple):
    """What follows an attempt: a retry after ``delay`` (``give_up`` None), or the answer."""

    give_up: GiveUp | None
    delay: float
    # The final answer tells SDKs not to retry on top (``Stripe-Should-Retry: false``): the
    # sidecar retried, or could have and chose not to.
    settled: bool
    # The retry goes at once with the next held key (Stripe answered 401 to the active one).
    switch_key: bool = False


def next_step(
    verdict: Verdict,
    *,
    attempt: int,
    elapsed: float,
    method: str,
    has_idempotency_key: bool,
    body_held: bool,
    answer_held: bool,
    retry_after: float | None,
    settings: RetrySettings,
    gates: Gates = _OPEN_GATES,
    rand: Callable[[], float],
    switched_key: bool = False,
) -> Step:
    """Decide what follows attempt number ``attempt`` (1 = the first).

    ``elapsed`` is the time since the request arrived; ``body_held`` says the request body is
    held (not streamed) so it can be sent again; ``answer_held`` that the answer was read whole
    (not handed over for streaming); ``retry_after`` is Stripe's ``Retry-After`` in seconds.
    Checks, in order: the verdict, the request's safety to repeat, attempts and deadline left,
    then the shared gates (client, budget, limiter), the deadline after the backoff, and the
    breakers. A 401 with another good key held goes again at once with it (:func:`_key_step`).
    """
    if not verdict.retryable:
        if verdict.outcome is Outcome.AUTHENTICATION and gates.next_key_available:
            return _key_step(switched_key, body_held and answer_held, gates, elapsed, settings)
        return Step(GiveUp.ANSWERED, 0.0, False)
    if switched_key:
        attempt -= 1  # the failover's attempt is one extra
    could = settings.enabled and body_held and (
        has_idempotency_key or method in REPEATABLE_METHODS
    )
    settled = attempt > 1 or could
    if not (
        settings.enabled
        and (has_idempotency_key or not verdict.sent or method in REPEATABLE_METHODS)
    ):
        return Step(GiveUp.NOT_SAFE, 0.0, settled)
    if not (body_held and answer_held):
        return Step(GiveUp.BODY_GONE, 0.0, settled)
    if attempt >= settings.max_attempts:
        return Step(GiveUp.ATTEMPTS, 0.0, settled)
    if elapsed >= settings.deadline:
        return Step(GiveUp.DEADLINE, 0.0, settled)
    if not gates.client_connected:
        return Step(GiveUp.CLIENT_GONE, 0.0, True)
    if not gates.budget_available:
        return Step(GiveUp.BUDGET, 0.0, True)
    delay = retry_delay(verdict, attempt, retry_after, settings, rand)
    wait = gates.limiter_wait
    if wait > delay + gates.limiter_max_wait:
        return Step(GiveUp.RATE_LIMITED, 0.0, True)
    if wait > delay:
        delay = wait
    if elapsed + delay >= settings.deadline:
        return Step(GiveUp.DEADLINE, 0.0, True)
    if not gates.breakers_admit:
        return Step(GiveUp.BREAKER_OPEN, 0.0, True)
    return Step(None, delay, True)


_SWITCH_KEY = Step(None, 0.0, True, True)


def _key_step(
    switched: bool, held: bool, gates: Gates, elapsed: float, settings: RetrySettings
) -> Step:
    """After a 401 with another good key held: switch keys at once, or why not.

    Stripe performed nothing on a 401, so any method may go again, once per request
    (``switched``: it did already); the switch takes no budget and its attempt is one extra
    beyond ``max_attempts`` (``next_step`` counts one fewer after it).
    """
    if switched:
        return Step(GiveUp.KEYS_EXHAUSTED, 0.0, False)  # the next key was rejected too
    if not held:
        return Step(GiveUp.BODY_GONE, 0.0, False)
    if not gates.client_connected:
        return Step(GiveUp.CLIENT_GONE, 0.0, False)
    if elapsed >= settings.deadline:
        return Step(GiveUp.DEADLINE, 0.0, False)
    return _SWITCH_KEY


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

    def record_request(self, now: float | None = None) -> None:
        """Count one client request (call once per request, not per attempt).

        ``now``: the clock's time if the caller has just read it (one read fewer).
        """
        if now is None:
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

    def available(self) -> bool:
        """Whether :meth:`try_acquire` would allow a retry now; takes nothing."""
        now = self._clock()
        window = self._window
        if now >= window.edge:
            window.advance(now)
        return sum(self._retries) < self._ratio * sum(self._requests) + self._floor

    def counts(self) -> tuple[int, int]:
        """``(requests, retries)`` in the current window, for metrics and the status page."""
        now = self._clock()
        if now >= self._window.edge:
            self._window.advance(now)
        return sum(self._requests), sum(self._retries)
