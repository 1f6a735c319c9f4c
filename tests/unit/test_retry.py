"""Retry policy: backoff, Retry-After, delays, the should-retry rules and the retry budget."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

import pytest
from fakeclock import FakeClock

from proxy.classify import TransportError, Verdict, classify_response
from proxy.classify import classify_transport_error as transport
from proxy.retry import (
    RetryBudget,
    RetrySettings,
    backoff_delay,
    parse_retry_after,
    retry_delay,
    should_retry,
)


def sequence(values: Iterable[float]) -> Callable[[], float]:
    """A pinned random source returning ``values`` in turn."""
    iterator = iter(values)
    return lambda: next(iterator)


def half() -> float:
    """A pinned random source: always 0.5."""
    return 0.5


SERVER_ERROR = classify_response(500, None, None, None)
GATEWAY = classify_response(502, None, None, None)
LOCK = classify_response(429, None, None, None)
RATE_LIMITED = classify_response(429, None, "global-rate", None)
VALIDATION = classify_response(400, None, None, None)


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_sequence_full_jitter_doubling_to_cap() -> None:
    """Delays double from base per retry, capped, times rand()."""
    delays = [backoff_delay(n, 0.05, 1.0, half) for n in range(1, 8)]
    assert delays == [0.025, 0.05, 0.1, 0.2, 0.4, 0.5, 0.5]


def test_backoff_uses_rand_as_the_jitter_factor() -> None:
    """The random value scales the ceiling: 0 gives 0, values near 1 give nearly the ceiling."""
    rand = sequence([0.0, 0.25, 0.999])
    delays = [backoff_delay(n, 0.1, 10.0, rand) for n in (1, 2, 3)]
    assert delays == [0.0, 0.05, pytest.approx(0.3996)]


def test_backoff_huge_retry_number_stays_at_cap() -> None:
    """A huge retry number gives the cap rather than overflowing."""
    assert backoff_delay(10_000, 0.05, 1.0, lambda: 1.0) == 1.0
    assert backoff_delay(0, 0.05, 1.0, lambda: 1.0) == 0.05


# -- Retry-After ------------------------------------------------------------------------------

NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("3", 3.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:05 GMT", 5.0),
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
        ("Wed, 21 Oct 2015 07:28:05 -0000", 5.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: go now
        (None, None),
        ("", None),
        ("-1", None),
        ("+3", None),
        ("1_0", None),
        ("soon", None),
        ("inf", None),
        ("nan", None),
        ("Wed, 99 Foo 2015 07:28:05 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After is read as delta-seconds or an HTTP-date; anything else is None."""
    assert parse_retry_after(value, NOW) == expected


def test_zoneless_date_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A "-0000" HTTP-date is read as GMT even when the machine's zone is not UTC."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 -0000", NOW) == 5.0
    finally:
        monkeypatch.undo()
        time.tzset()


# -- retry_delay ------------------------------------------------------------------------------


def test_retry_delay_sequence_collected_tenacity_style() -> None:
    """Successive retries of a server error wait base * 2**n * rand, capped at max_delay."""
    settings = RetrySettings(base_delay=0.1, max_delay=0.5)
    delays = [retry_delay(SERVER_ERROR, n, None, settings, half) for n in range(1, 6)]
    assert delays == [0.05, 0.1, 0.2, 0.25, 0.25]


def test_lock_timeout_uses_its_own_short_base() -> None:
    """A lock timeout backs off from lock_timeout_delay, not base_delay."""
    settings = RetrySettings(base_delay=1.0, lock_timeout_delay=0.01, max_delay=5.0)
    lock = [retry_delay(LOCK, n, None, settings, half) for n in (1, 2, 3)]
    other = [retry_delay(RATE_LIMITED, n, None, settings, half) for n in (1, 2, 3)]
    assert lock == [0.005, 0.01, 0.02]
    assert other == [0.5, 1.0, 2.0]


def test_retry_after_is_honoured_when_longer_than_backoff() -> None:
    """A server-given Retry-After longer than the backoff is the delay."""
    settings = RetrySettings(base_delay=0.05, retry_after_cap=2.0)
    assert retry_delay(RATE_LIMITED, 1, 1.5, settings, half) == 1.5


def test_retry_after_is_capped() -> None:
    """Retry-After beyond retry_after_cap waits only the cap."""
    settings = RetrySettings(retry_after_cap=2.0)
    assert retry_delay(RATE_LIMITED, 1, 30.0, settings, half) == 2.0


def test_backoff_wins_over_shorter_retry_after() -> None:
    """The delay is the larger of backoff and Retry-After."""
    settings = RetrySettings(base_delay=1.0, max_delay=4.0)
    assert retry_delay(GATEWAY, 3, 0.5, settings, half) == 2.0


# -- should_retry -----------------------------------------------------------------------------


def ask(verdict: Verdict, **overrides: object) -> bool:
    """should_retry with defaults for a safe second attempt of a keyed POST."""
    arguments: dict[str, object] = {
        "attempt": 1,
        "settings": RetrySettings(),
        "elapsed": 0.1,
        "has_idempotency_key": True,
        "method": "POST",
        "body_replayable": True,
    }
    arguments.update(overrides)
    return should_retry(verdict, **arguments)  # type: ignore[arg-type]


def test_should_retry_keyed_post_on_retryable_verdicts() -> None:
    """A keyed POST is retried for every retryable outcome, a non-retryable one never."""
    assert ask(SERVER_ERROR) and ask(GATEWAY) and ask(LOCK) and ask(RATE_LIMITED)
    assert ask(transport(TransportError.TIMEOUT))
    assert not ask(VALIDATION)
    assert not ask(classify_response(402, None, None, None))
    assert not ask(classify_response(500, "false", None, None))


def test_should_retry_respects_switch_attempts_deadline_and_body() -> None:
    """Disabled retries, no attempts left, the deadline passed or an unbuffered body: no retry."""
    assert not ask(GATEWAY, settings=RetrySettings(enabled=False))
    last = RetrySettings().max_attempts
    assert ask(GATEWAY, attempt=last - 1)
    assert not ask(GATEWAY, attempt=last)
    assert not ask(GATEWAY, elapsed=20.0)
    assert ask(GATEWAY, elapsed=19.9)
    assert not ask(GATEWAY, body_replayable=False)


@pytest.mark.parametrize(
    ("method", "key", "expected"),
    [
        ("GET", False, True),
        ("HEAD", False, True),
        ("DELETE", False, True),
        ("POST", False, False),
        ("PATCH", False, False),
        ("POST", True, True),
        ("PATCH", True, True),
    ],
)
def test_should_retry_needs_a_key_for_non_idempotent_methods(
    method: str, key: bool, expected: bool
) -> None:
    """GET/HEAD/DELETE repeat without a key; POST/PATCH need one (a 500 could be executed)."""
    assert ask(SERVER_ERROR, method=method, has_idempotency_key=key) is expected


def test_unsent_request_retries_without_key() -> None:
    """A connect failure never reached Stripe, so even a keyless POST is repeated."""
    assert ask(transport(TransportError.CONNECT), has_idempotency_key=False)
    assert not ask(transport(TransportError.RESET), has_idempotency_key=False)
    assert not ask(transport(TransportError.CONNECT), body_replayable=False)


# -- budget -----------------------------------------------------------------------------------


def acquire_all(budget: RetryBudget, limit: int = 10_000) -> int:
    """How many retries the budget grants right now."""
    return sum(1 for _ in itertools.takewhile(lambda _: budget.try_acquire(), range(limit)))


def test_budget_floor_without_requests() -> None:
    """With no requests, exactly min_per_second * window retries are allowed."""
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0, clock=FakeClock())
    assert acquire_all(budget) == 5
    assert not budget.try_acquire()


def test_budget_ratio_of_requests_plus_floor() -> None:
    """Retries are capped at ratio * requests + floor over the window."""
    budget = RetryBudget(ratio=0.2, min_per_second=0.1, window=10.0, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert acquire_all(budget) == 21  # 0.2 * 100 + 0.1 * 10
    assert budget.counts() == (100, 21)


def test_budget_refills_as_the_window_slides() -> None:
    """Retries older than the window stop counting; so do the requests they were allowed by."""
    clock = FakeClock(1000.0)
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert acquire_all(budget) == 5
    clock.advance(5.0)
    for _ in range(4):
        budget.record_request()
    assert acquire_all(budget) == 2  # 0.5 * 14 = 7, 5 used
    clock.advance(5.0)  # t=1010: the first second (10 requests, 5 retries) has left the window
    assert budget.counts() == (4, 2)
    assert acquire_all(budget) == 0  # 0.5 * 4 = 2, 2 used
    clock.advance(5.0)  # everything gone
    assert budget.counts() == (0, 0)
    assert acquire_all(budget) == 0  # no floor, no requests: nothing


def test_budget_long_idle_clears_everything() -> None:
    """After more than a window of silence the whole floor is available again."""
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=3.0, clock=clock)
    assert acquire_all(budget) == 3
    clock.advance(2.0)
    assert acquire_all(budget) == 0
    clock.advance(1.0)  # the first second's retries leave the 3-second window
    assert acquire_all(budget) == 3
    clock.advance(3600.0)
    assert acquire_all(budget) == 3


def test_budget_rejects_bad_window() -> None:
    """A non-positive window is a programming error."""
    with pytest.raises(ValueError):
        RetryBudget(0.2, 5.0, 0.0, FakeClock())


def test_retry_after_too_large_for_a_float_is_ignored() -> None:
    """Delta-seconds that overflow a float (400 digits) are unusable: None, not infinity."""
    assert parse_retry_after("9" * 400, NOW) is None


def test_retry_after_date_under_a_second_ahead_is_waited_for() -> None:
    """An HTTP-date half a second ahead of the wall clock means a 0.5 s wait, not 0."""
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW - 0.5) == 0.5


def test_budget_window_of_one_second_is_valid_and_zero_is_refused() -> None:
    """A one-second budget window works; a zero window is refused with a message naming it."""
    RetryBudget(0.0, 1.0, 1.0, FakeClock())
    with pytest.raises(ValueError, match="retry budget window must be positive, not 0"):
        RetryBudget(0.0, 1.0, 0, FakeClock())


def test_budget_counts_a_request_made_on_a_second_boundary_in_the_new_second() -> None:
    """A request made exactly at a whole second belongs to that second: it is still in a 10 s
    window 9 s later, and available()/counts() move the window on."""
    clock = FakeClock(1000.0)
    budget = RetryBudget(1.0, 0.0, 10.0, clock)  # one retry per request, no floor
    clock.now = 1001.0
    budget.record_request()
    clock.now = 1010.0
    assert budget.counts() == (1, 0)
    assert budget.available()
    clock.now = 1011.0
    assert not budget.available()  # first to look at 1011.0: it must move the window itself
    clock.now = 1012.0
    assert budget.counts() == (0, 0)


def test_budget_counts_moves_the_window_on_at_a_whole_second() -> None:
    """counts() at exactly the end of a request's window no longer includes it."""
    clock = FakeClock(1000.0)
    budget = RetryBudget(1.0, 0.0, 1.0, clock)
    budget.record_request()
    clock.now = 1001.0
    assert budget.counts() == (0, 0)


def test_budget_available_moves_the_window_on() -> None:
    """available() alone forgets requests that left the window."""
    clock = FakeClock(1000.0)
    budget = RetryBudget(1.0, 0.0, 2.0, clock)
    budget.record_request()
    assert budget.available()
    clock.now = 1005.0
    assert not budget.available()
