"""Client-side rate limiter: bursts, reservations, max_wait, AIMD on Stripe's 429s."""

from __future__ import annotations

import itertools

import pytest
from fakeclock import FakeClock

from proxy.ratelimit import RateLimiter, RateLimitSettings


def make(**settings: object) -> tuple[RateLimiter, FakeClock]:
    """A limiter on a fake clock."""
    clock = FakeClock()
    return RateLimiter(RateLimitSettings(**settings), clock), clock  # type: ignore[arg-type]


def waits(limiter: RateLimiter, endpoint: str, n: int) -> list[float | None]:
    """n reservations in a row, rounded to the microsecond."""
    return [None if (w := limiter.reserve(endpoint)) is None else round(w, 6) for _ in range(n)]


def test_burst_then_waits() -> None:
    """The endpoint burst goes at once; then each request waits one more token interval."""
    limiter, _ = make(endpoint_rate=10.0, endpoint_burst=3.0)
    assert waits(limiter, "POST /v1/charges", 6) == [0.0, 0.0, 0.0, 0.1, 0.2, 0.3]


def test_global_bucket_is_shared_across_endpoints() -> None:
    """The account-wide bucket limits the sum over endpoints."""
    limiter, _ = make(global_rate=2.0, global_burst=2.0)
    assert limiter.reserve("a") == 0.0
    assert limiter.reserve("b") == 0.0
    assert limiter.reserve("c") == 0.5
    assert limiter.reserve("a") == 1.0


def test_tokens_refill_over_time() -> None:
    """Waiting one interval per token brings tokens back, never above the burst."""
    limiter, clock = make(endpoint_rate=10.0, endpoint_burst=2.0)
    assert waits(limiter, "e", 2) == [0.0, 0.0]
    clock.advance(0.1)
    assert waits(limiter, "e", 2) == [0.0, 0.1]
    clock.advance(60.0)
    assert waits(limiter, "e", 3) == [0.0, 0.0, 0.1]


def test_max_wait_refusal_takes_nothing() -> None:
    """A reservation waiting past max_wait returns None and leaves the buckets as they were."""
    limiter, clock = make(endpoint_rate=10.0, endpoint_burst=1.0, max_wait=0.25)
    assert waits(limiter, "e", 5) == [0.0, 0.1, 0.2, None, None]
    clock.advance(0.1)
    assert waits(limiter, "e", 2) == [0.2, None]  # a refusal that took a token would give 0.4
    assert limiter.reserve("other") == 0.0  # nor did it take from the global bucket


def test_reservations_are_served_in_order() -> None:
    """Each later reservation is scheduled no earlier than every one before it (FIFO)."""
    limiter, clock = make(endpoint_rate=5.0, endpoint_burst=1.0, max_wait=10.0)
    go_times = []
    for step in (0.0, 0.01, 0.0, 0.05, 0.02, 0.0, 0.3):
        clock.advance(step)
        wait = limiter.reserve("e")
        assert wait is not None
        go_times.append(clock.now + wait)
    assert go_times == sorted(go_times)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(go_times)]
    assert gaps == [0.2] * 6  # queued requests leave one token interval apart


def test_disabled_limiter_never_waits() -> None:
    """enabled=False: every reservation is 0.0 and 429s change nothing."""
    limiter, _ = make(enabled=False, endpoint_rate=1.0, endpoint_burst=1.0)
    assert waits(limiter, "e", 100) == [0.0] * 100
    limiter.on_rate_limited("e", "global-rate")
    assert limiter.rates() == {"global": 100.0}


@pytest.mark.parametrize("reason", ["global-rate", "global-concurrency", "Global-Rate "])
def test_global_reasons_decrease_the_global_rate(reason: str) -> None:
    """A global-* reason halves the account rate and leaves the endpoint's alone."""
    limiter, _ = make()
    limiter.reserve("e")
    limiter.on_rate_limited("e", reason)
    assert limiter.rates() == {"global": 50.0, "e": 25.0}


@pytest.mark.parametrize(
    "reason", ["endpoint-rate", "endpoint-concurrency", "something-new"]
)
def test_endpoint_reasons_decrease_that_endpoint(reason: str) -> None:
    """An endpoint-scoped reason halves that endpoint's rate only."""
    limiter, _ = make()
    limiter.reserve("e")
    limiter.reserve("f")
    limiter.on_rate_limited("e", reason)
    assert limiter.rates() == {"global": 100.0, "e": 12.5, "f": 25.0}


def test_no_reason_or_resource_specific_changes_nothing() -> None:
    """A lock timeout (no reason) or a one-object limit (resource-specific) leaves rates alone."""
    limiter, _ = make()
    limiter.reserve("e")
    limiter.on_rate_limited("e", None)
    limiter.on_rate_limited("e", "")
    limiter.on_rate_limited("e", "resource-specific")
    assert limiter.rates() == {"global": 100.0, "e": 25.0}


def test_decrease_applies_to_reservations_and_shrinks_burst() -> None:
    """After a decrease the bucket paces at the new rate with a proportionally smaller burst."""
    limiter, _ = make(endpoint_rate=10.0, endpoint_burst=10.0, recover_share_per_second=0.0)
    limiter.on_rate_limited("e", "endpoint-rate")
    assert waits(limiter, "e", 7) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.4]


def test_one_burst_of_429s_decreases_once() -> None:
    """429s arriving together within decrease_interval cut the rate only once."""
    limiter, clock = make(decrease_interval=0.5, recover_share_per_second=0.0)
    for _ in range(10):
        limiter.on_rate_limited("e", "global-rate")
    assert limiter.rates()["global"] == 50.0
    clock.advance(0.5)
    limiter.on_rate_limited("e", "global-rate")
    assert limiter.rates()["global"] == 25.0


def test_decrease_stops_at_min_rate() -> None:
    """Repeated decreases never go below min_rate."""
    limiter, clock = make(min_rate=4.0, recover_share_per_second=0.0)
    for _ in range(10):
        limiter.on_rate_limited("e", "global-rate")
        clock.advance(1.0)
    assert limiter.rates()["global"] == 4.0


def test_additive_recovery_up_to_configured_rate() -> None:
    """A decreased rate regains its share of the configured rate per second, up to that rate."""
    limiter, clock = make(recover_share_per_second=0.05)  # 5/s of 100/s
    limiter.on_rate_limited("e", "global-concurrency")
    assert limiter.rates()["global"] == 50.0
    clock.advance(4.0)
    assert limiter.rates()["global"] == 70.0
    limiter.reserve("e")  # syncing the bucket does not change the answer
    assert limiter.rates()["global"] == 70.0
    clock.advance(100.0)
    assert limiter.rates()["global"] == 100.0
    limiter.reserve("e")
    assert limiter.rates()["global"] == 100.0


def test_recovering_bucket_refills_by_the_integral_of_its_rate() -> None:
    """Tokens gained while the rate climbs follow the rising rate (trapezoid), capped at burst."""
    limiter, clock = make(endpoint_rate=10.0, endpoint_burst=10.0, recover_share_per_second=0.5)
    limiter.on_rate_limited("e", "endpoint-rate")  # rate 5, burst 5, tokens 5
    assert waits(limiter, "e", 5) == [0.0] * 5
    clock.advance(1.0)  # rate 5 -> 10: 7.5 tokens
    assert waits(limiter, "e", 8) == [0.0] * 7 + [0.05]


def test_partly_recovered_rate_refills_by_the_trapezoid() -> None:
    """Half-way up the recovery ramp the tokens gained are the mean rate times the time."""
    limiter, clock = make(endpoint_rate=10.0, endpoint_burst=10.0, recover_share_per_second=0.5)
    limiter.on_rate_limited("e", "endpoint-rate")  # rate 5, burst 5, tokens 5
    assert waits(limiter, "e", 5) == [0.0] * 5
    clock.advance(0.5)  # rate 5 -> 7.5: 0.5 * 6.25 = 3.125 tokens
    assert waits(limiter, "e", 4) == [0.0, 0.0, 0.0, 0.116667]  # 0.875 short at 7.5/s
    assert limiter.rates()["e"] == 7.5


def test_endpoint_buckets_are_created_lazily() -> None:
    """rates() lists only the endpoints seen so far."""
    limiter, _ = make()
    assert limiter.rates() == {"global": 100.0}
    limiter.reserve("GET /v1/customers/{customer}")
    assert limiter.rates() == {"global": 100.0, "GET /v1/customers/{customer}": 25.0}


def test_bad_settings_rejected() -> None:
    """Non-positive rates or bursts below one are programming errors."""
    with pytest.raises(ValueError):
        make(global_rate=0.0)
    with pytest.raises(ValueError):
        make(endpoint_burst=0.5)
