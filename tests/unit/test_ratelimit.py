"""The adaptive limiter: dormant, activated at the accepted rate, cut once, cubic, dormant again."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from fakeclock import FakeClock

from proxy.ratelimit import RateLimiter, RateLimitSettings, wait_for_slot

OP = "POST /v1/charges"


def make(**settings: object) -> tuple[RateLimiter, FakeClock]:
    """A limiter on a fake clock that acts on every 429 (unless the noise filter is given)."""
    clock = FakeClock()
    settings = {"min_429s": 1, "min_429_share": 0.0, **settings}
    return RateLimiter(RateLimitSettings(**settings), clock), clock  # type: ignore[arg-type]


def waits(limiter: RateLimiter, endpoint: str, n: int) -> list[float | None]:
    """n reservations in a row, rounded to the microsecond."""
    return [None if (w := limiter.reserve(endpoint)) is None else round(w, 6) for _ in range(n)]


def send_at(limiter: RateLimiter, clock: FakeClock, rate: float, seconds: float) -> int:
    """Reserve ``rate`` requests/s for ``seconds`` without waiting; return how many went."""
    sent = 0
    for _ in range(round(rate * seconds)):
        clock.advance(1.0 / rate)
        if limiter.reserve(OP) == 0.0:
            sent += 1
    return sent


def test_dormant_limiter_never_waits_and_reports_nothing() -> None:
    """With no 429 and no ceiling, thousands of requests at once go without waiting."""
    limiter, _ = make()
    assert set(waits(limiter, OP, 5000)) == {0.0}
    assert limiter.rates() == {}
    assert limiter.state() == {}


def test_global_429_activates_at_the_measured_rate_cut_by_the_factor() -> None:
    """A global-rate 429 after 1 s at 100/s starts the account bucket at 70/s."""
    limiter, clock = make()
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    rates = limiter.rates()
    assert list(rates) == ["global"]
    assert rates["global"] == pytest.approx(70.0, rel=0.05)
    assert limiter.state()["global"]["adaptive"] is True


def test_base_is_what_stripe_accepted_since_its_429s_began() -> None:
    """The base counts from one slice before the first 429: a burst Stripe absorbed earlier is left out."""
    limiter, clock = make(min_429s=50)
    send_at(limiter, clock, 100.0, 0.5)  # all accepted (Stripe's saved-up burst)
    for _ in range(50):  # then every request rate limited; the 50th activates
        clock.advance(0.01)
        limiter.reserve(OP)
        limiter.on_rate_limited(OP, "global-rate")
    w_max = limiter.state()["global"]["rate_cubic"]["w_max"]
    # from 0.375 s: 62.5 sent, 50 limited, over 0.625 s (the whole second would say 50/s)
    assert w_max == pytest.approx(12.5 / 0.625, rel=0.15)


def test_active_bucket_starts_empty_and_paces_at_its_rate() -> None:
    """Right after activation requests are spaced one token interval apart, FIFO."""
    limiter, clock = make(max_wait=10.0)
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    rate = limiter.rates()["global"]
    go = [clock.now + w for w in waits(limiter, OP, 5) if w is not None]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(go)]
    assert gaps == [round(1.0 / rate, 6)] * 4


def test_wait_past_max_wait_is_refused_and_takes_nothing() -> None:
    """A reservation beyond max_wait returns None and leaves the bucket as it was."""
    limiter, clock = make(max_wait=0.05)
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")  # 70/s: one token each 1/70 s
    got = waits(limiter, OP, 6)
    assert got[-1] is None
    first_refusal = got.index(None)
    assert all(w is not None and w <= 0.05 for w in got[:first_refusal])
    assert waits(limiter, OP, 1) == [None]  # still refused: the refusal took no token


def test_peek_answers_like_reserve_without_taking() -> None:
    """peek says what reserve would (0 while dormant, the wait or None when limiting) and takes nothing."""
    limiter, clock = make(max_wait=0.05)
    assert limiter.peek(OP) == 0.0
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    for _ in range(3):
        peeked = limiter.peek(OP)
        assert peeked == limiter.reserve(OP)
    assert limiter.peek(OP) == limiter.peek(OP)


def test_burst_of_429s_decreases_once() -> None:
    """Twenty 429s in the same moment cut the rate once; one after the hold cuts again."""
    limiter, clock = make(decrease_interval=0.5)
    send_at(limiter, clock, 100.0, 1.0)
    for _ in range(20):
        limiter.on_rate_limited(OP, "global-rate")
    first = limiter.rates()["global"]
    assert first == pytest.approx(70.0, rel=0.05)
    clock.advance(0.5)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.rates()["global"] < first * 0.75


def test_no_second_cut_while_old_reservations_drain() -> None:
    """429s for requests scheduled before a cut (at the old rate) do not cut again."""
    limiter, clock = make(decrease_interval=0.1, max_wait=2.0)
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    waits(limiter, OP, 70)  # about one second of reservations queued at 70/s
    clock.advance(0.2)
    limiter.on_rate_limited(OP, "global-rate")  # second cut: 0.7 * min(accepted, 70)
    second = limiter.rates()["global"]
    clock.advance(0.2)  # past decrease_interval, but the queue made at 70/s is still going
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.rates()["global"] >= second


def test_a_cut_keeps_the_schedule_of_requests_already_queued() -> None:
    """After a cut, the next request goes right behind those already scheduled, at the new rate."""
    limiter, clock = make(max_wait=3.0, decrease_interval=0.1)
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    queued = [w for w in waits(limiter, OP, 120) if w is not None]
    last_go = clock.now + queued[-1]
    clock.advance(0.5)
    limiter.on_rate_limited(OP, "global-rate")
    new_rate = limiter.rates()["global"]
    wait = limiter.reserve(OP)
    assert wait is not None
    assert clock.now + wait == pytest.approx(last_go + 1.0 / new_rate, abs=0.02)


def test_rate_probes_back_up_along_the_cubic() -> None:
    """After a cut the rate regains the base in K = cbrt(W(1-beta)/C) seconds, then goes past."""
    limiter, clock = make(quiet_period=100.0)
    send_at(limiter, clock, 50.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    w_max = limiter.state()["global"]["rate_cubic"]["w_max"]
    k = (w_max * 0.3 / 0.4) ** (1 / 3)
    clock.advance(k / 2)
    middle = limiter.rates()["global"]
    clock.advance(k / 2)
    assert 0.7 * w_max < middle < w_max
    assert limiter.rates()["global"] == pytest.approx(w_max)
    clock.advance(2.0)
    assert limiter.rates()["global"] == pytest.approx(w_max + 0.4 * 8)


def test_quiet_period_returns_the_scope_to_dormant() -> None:
    """quiet_period after the last 429 naming it, a scope stops limiting altogether."""
    limiter, clock = make(quiet_period=5.0)
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    clock.advance(4.9)
    assert "global" in limiter.rates()
    clock.advance(0.2)
    assert set(waits(limiter, OP, 500)) == {0.0}
    assert limiter.rates() == {}


def test_stray_429s_are_noise_until_enough_of_the_last_second() -> None:
    """Defaults: one 429, or 2 of 100 requests, leave the scope dormant; 5 of 100 activate it."""
    limiter, clock = make(min_429s=2, min_429_share=0.05)
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.state() == {}
    for _ in range(3):
        limiter.on_rate_limited(OP, "global-rate")
    assert list(limiter.rates()) == ["global"]


def test_a_straggler_after_the_hold_does_not_cut_again() -> None:
    """Once active, one late 429 is not enough: min_429s new ones after the hold are."""
    limiter, clock = make(min_429s=2, min_429_share=0.05, decrease_interval=0.5)
    send_at(limiter, clock, 100.0, 1.0)
    for _ in range(5):
        limiter.on_rate_limited(OP, "global-rate")
    first = limiter.rates()["global"]
    clock.advance(0.6)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.rates()["global"] >= first
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.rates()["global"] < first


def test_endpoint_reason_limits_that_operation_only() -> None:
    """endpoint-rate activates the named operation's bucket; others and the account stay dormant."""
    limiter, clock = make()
    send_at(limiter, clock, 40.0, 1.0)
    limiter.reserve("GET /v1/balance")
    limiter.on_rate_limited(OP, "endpoint-rate")
    assert list(limiter.rates()) == [OP]
    assert set(waits(limiter, "GET /v1/balance", 100)) == {0.0}


@pytest.mark.parametrize("reason", [None, "", "resource-specific", "Resource-Specific "])
def test_lock_timeouts_and_resource_limits_change_nothing(reason: str | None) -> None:
    """No reason (a lock timeout) or resource-specific (one object) leaves every scope dormant."""
    limiter, clock = make()
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, reason)
    assert limiter.rates() == {}
    assert limiter.state() == {}


def test_reason_is_matched_case_insensitively() -> None:
    """'Global-Rate ' names the account like 'global-rate'."""
    limiter, clock = make()
    send_at(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "Global-Rate ")
    assert list(limiter.rates()) == ["global"]


def test_decrease_stops_at_min_rate() -> None:
    """Repeated cuts never go below min_rate."""
    limiter, clock = make(min_rate=4.0, scale_constant=0.0001)
    send_at(limiter, clock, 10.0, 1.0)
    for _ in range(30):
        limiter.on_rate_limited(OP, "global-rate")
        clock.advance(1.0)
    assert limiter.rates()["global"] == pytest.approx(4.0, abs=0.01)


def test_ceiling_limits_while_dormant_and_caps_the_cubic() -> None:
    """A configured global_rate paces from the start and the adaptive rate never exceeds it."""
    limiter, clock = make(global_rate=10.0, global_burst=2.0, quiet_period=1000.0)
    assert waits(limiter, OP, 4) == [0.0, 0.0, 0.1, 0.2]
    assert limiter.rates() == {"global": 10.0}
    clock.advance(5.0)
    send_at(limiter, clock, 10.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.rates()["global"] < 10.0
    clock.advance(60.0)
    assert limiter.rates()["global"] == 10.0


def test_operation_ceiling_applies_to_that_operation() -> None:
    """set_endpoint_limit gives one operation a ceiling; another stays unlimited."""
    limiter, _ = make()
    limiter.set_endpoint_limit("POST /v1/files", 20.0, 1.0)
    assert waits(limiter, "POST /v1/files", 3) == [0.0, 0.05, 0.1]
    assert set(waits(limiter, OP, 100)) == {0.0}


def test_concurrency_429_bounds_requests_in_flight() -> None:
    """global-concurrency with 10 in flight bounds the account at 7 in flight until quiet."""
    limiter, clock = make(quiet_period=5.0)
    assert all(limiter.acquire(OP) for _ in range(10))
    limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.rates() == {}  # the rate is untouched
    assert limiter.state()["global"]["max_in_flight"] == pytest.approx(7.0)
    for _ in range(10):
        limiter.release(OP)
    taken = sum(limiter.acquire(OP) for _ in range(10))
    assert taken == 7
    clock.advance(5.1)
    assert limiter.acquire(OP)
    assert limiter.state() == {}


def test_concurrency_bound_probes_back_up() -> None:
    """The in-flight bound regrows along the cubic: back at the old count after K seconds."""
    limiter, clock = make(quiet_period=100.0)
    for _ in range(20):
        limiter.acquire(OP)
    limiter.on_rate_limited(OP, "endpoint-concurrency")
    assert limiter.state()[OP]["max_in_flight"] == pytest.approx(14.0)
    clock.advance((20 * 0.3 / 0.4) ** (1 / 3))
    assert limiter.state()[OP]["max_in_flight"] == pytest.approx(20.0)


def test_try_enter_is_reserve_and_acquire_while_nothing_limits() -> None:
    """try_enter counts a request sent and in flight while dormant; with a scope limiting it takes nothing."""
    limiter, clock = make(quiet_period=5.0)
    assert limiter.try_enter(OP) is False  # an operation not seen yet: its scope is made by reserve
    assert limiter.reserve(OP) == 0.0 and limiter.acquire(OP)
    assert all(limiter.try_enter(OP) for _ in range(9))
    twin, _ = make()
    assert all(twin.reserve(OP) == 0.0 and twin.acquire(OP) for _ in range(10))
    assert limiter.demand(OP) == twin.demand(OP) > 0  # counted as sent, like reserve
    limiter.on_rate_limited(OP, "global-concurrency")  # 10 in flight: bound 7
    for _ in range(10):
        limiter.release(OP)
    assert limiter.try_enter(OP) is False  # a bound applies: nothing counted
    assert sum(limiter.acquire(OP) for _ in range(10)) == 7  # the full bound is still free
    clock.advance(5.1)
    for _ in range(7):
        limiter.release(OP)
    limiter.state()  # the quiet period passed: dormant again
    assert limiter.try_enter(OP)
    limiter.on_rate_limited(OP, "endpoint-rate")
    limiter.on_rate_limited(OP, "endpoint-rate")
    assert limiter.try_enter(OP) is False  # a rate applies: reserve decides the wait


def test_wait_for_slot_gets_a_released_slot_and_gives_up_after_max_wait() -> None:
    """A waiter takes a slot freed while it polls; with none freed it gives up after max_wait."""
    limiter, _ = make(max_wait=0.2)
    limiter.acquire(OP)
    limiter.acquire(OP)
    limiter.on_rate_limited(OP, "global-concurrency")  # bound 1.4: one in flight at most
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            limiter.release(OP)
            limiter.release(OP)

    assert asyncio.run(wait_for_slot(limiter, OP, sleep))
    assert len(slept) == 3
    slept.clear()

    async def never(seconds: float) -> None:
        slept.append(seconds)

    assert not asyncio.run(wait_for_slot(limiter, OP, never))
    assert sum(slept) == pytest.approx(0.2)


def test_disabled_limiter_does_nothing() -> None:
    """enabled=False: no waits, no bounds, 429s change nothing."""
    limiter, _ = make(enabled=False, global_rate=1.0)
    assert set(waits(limiter, OP, 100)) == {0.0}
    limiter.on_rate_limited(OP, "global-rate")
    assert all(limiter.acquire(OP) for _ in range(100))


def test_bad_settings_rejected() -> None:
    """Non-positive ceilings, bursts below one and factors outside (0, 1) are programming errors."""
    for bad in ({"global_rate": 0.0}, {"endpoint_burst": 0.5}, {"decrease_factor": 1.0}):
        with pytest.raises(ValueError):
            make(**bad)
