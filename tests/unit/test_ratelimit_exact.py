"""The adaptive limiter to the exact number: learned rates, waits, thresholds, bounds, dormancy."""

from __future__ import annotations

import asyncio

import pytest
from fakeclock import FakeClock

from proxy.ratelimit import RateLimiter, RateLimitSettings, wait_for_slot

OP = "POST /v1/charges"


def make(now: float = 1000.0, **settings: object) -> tuple[RateLimiter, FakeClock]:
    """A limiter on a fake clock at ``now`` that acts on every 429 unless told otherwise."""
    clock = FakeClock(now)
    settings = {"min_429s": 1, "min_429_share": 0.0, **settings}
    return RateLimiter(RateLimitSettings(**settings), clock), clock  # type: ignore[arg-type]


def send(limiter: RateLimiter, clock: FakeClock, rate: float, seconds: float, endpoint: str = OP) -> None:
    """Reserve ``rate`` requests/s for ``seconds``, one per 1/rate, each right after the clock moves."""
    for _ in range(round(rate * seconds)):
        clock.advance(1.0 / rate)
        limiter.reserve(endpoint)


def waits(limiter: RateLimiter, n: int, endpoint: str = OP) -> list[float | None]:
    """n reservations in a row, rounded to the microsecond."""
    return [None if (w := limiter.reserve(endpoint)) is None else round(w, 6) for _ in range(n)]


def cubic_k(w_max: float) -> float:
    """K = cbrt(W_max * (1 - beta) / C) with the defaults beta = 0.7, C = 0.4."""
    return float((w_max * 0.3 / 0.4) ** (1.0 / 3.0))


# -- the learned base: what Stripe accepted -------------------------------------------------


def test_learned_rate_counts_the_whole_second_from_the_slice_before_the_first_429() -> None:
    """64/s steady, a 429 at 1002.0 and one at 1002.875: 57 sent - 2 limited over 0.875 s."""
    limiter, clock = make(min_429s=2)
    send(limiter, clock, 64.0, 2.0)  # 8 per 0.125 s slice, one right on each slice boundary
    limiter.on_rate_limited(OP, "global-rate")  # at 1002.0: noise on its own (min_429s=2)
    assert limiter.state() == {}
    send(limiter, clock, 64.0, 0.875)
    limiter.on_rate_limited(OP, "global-rate")  # at 1002.875, on a slice boundary
    w_max = 55 / 0.875
    assert limiter.state() == {
        "global": {
            "adaptive": True,
            "ceiling": None,
            "rate": 44.0,
            "tokens": 0.0,
            "rate_cubic": {"w_max": pytest.approx(w_max), "k": pytest.approx(cubic_k(w_max)), "since": 1002.875},
        }
    }


def test_learned_rate_of_a_young_scope_is_over_its_age() -> None:
    """An operation first seen 0.25 s ago: 26 sent - 2 limited over 0.25 s, not over a longer span."""
    limiter, clock = make(min_429s=2)
    clock.advance(0.05)
    limiter.reserve("A")
    limiter.on_rate_limited("A", "endpoint-rate")
    send(limiter, clock, 100.0, 0.25, "A")
    limiter.on_rate_limited("A", "endpoint-rate")
    assert limiter.state()["A"]["rate_cubic"]["w_max"] == pytest.approx(24 / 0.25)


def test_learned_rate_is_over_at_least_one_slice() -> None:
    """Ten requests and two 429s within 10 ms of a scope's start are 8 per 0.125 s, not 800/s."""
    limiter, clock = make(min_429s=2, now=1000.01)
    for _ in range(10):
        limiter.reserve("A")
    limiter.on_rate_limited("A", "endpoint-rate")
    clock.advance(0.01)
    limiter.on_rate_limited("A", "endpoint-rate")
    assert limiter.state()["A"]["rate_cubic"]["w_max"] == pytest.approx(8 / 0.125)


def test_requests_older_than_a_second_do_not_count() -> None:
    """A burst 1 s before, on the same meter slice, is gone: the base is min_rate, not the burst."""
    limiter, clock = make()
    for _ in range(50):
        limiter.reserve(OP)  # at 1000.0
    clock.advance(1.0)  # the same slice of the meter's ring, one second later
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.state()["global"]["rate_cubic"]["w_max"] == 1.0


def test_a_quiet_slice_in_between_is_zeroed() -> None:
    """Counts left in a slice the meter skipped over are cleared, whichever slice it is."""
    for gap in range(1, 9):
        limiter, clock = make()
        for _ in range(8):
            clock.advance(0.125)
            for _ in range(10):
                limiter.reserve(OP)  # 10 per slice, from 1000.125 to 1001.0
        clock.advance(0.125 * gap)
        limiter.on_rate_limited(OP, "global-rate")
        # from one slice before the 429's slice to now: the slice before it if still in the window
        expected = 10 * (gap <= 1) - 1
        assert limiter.state()["global"]["rate_cubic"]["w_max"] == max(1.0, expected / 0.125), gap


def test_reservations_count_as_sent_once_they_have_gone() -> None:
    """Queued requests count in the meter once their send time has come (inclusive), not before."""
    limiter, clock = make(global_rate=20.0, global_burst=1.0, max_wait=5.0, min_429s=3)
    assert waits(limiter, 6) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    clock.advance(0.2)
    for _ in range(3):
        limiter.on_rate_limited(OP, "global-rate")  # the third acts
    # from 1000.0 to 1000.2: the one sent at once and the four due by now, minus three 429s
    assert limiter.state()["global"]["rate_cubic"]["w_max"] == pytest.approx((5 - 3) / 0.2)


def test_requests_sent_at_once_count_in_their_own_slice() -> None:
    """Under a ceiling, a request that needs no wait counts in the slice it went in."""
    limiter, clock = make(global_rate=100.0, global_burst=100.0)
    assert set(waits(limiter, 30)) == {0.0}  # at 1000.0
    clock.advance(0.3)
    assert set(waits(limiter, 10)) == {0.0}  # at 1000.3
    limiter.on_rate_limited(OP, "global-rate")
    # from 1000.125 to 1000.3: 10 sent, 1 limited, over 0.175 s (the 30 at 1000.0 are before)
    assert limiter.state()["global"]["rate_cubic"]["w_max"] == pytest.approx(9 / 0.175)


def test_operation_meter_counts_its_own_requests() -> None:
    """An operation's base counts its own requests: 8 + 1 sent in the last two slices, 1 limited."""
    limiter, clock = make()
    send(limiter, clock, 64.0, 0.25, "A")
    limiter.reserve("B")
    limiter.on_rate_limited("A", "endpoint-rate")
    assert limiter.state()["A"]["rate_cubic"]["w_max"] == pytest.approx((9 - 1) / 0.125)


# -- noise filter ---------------------------------------------------------------------------


# -- answers that come back a round trip later ---------------------------------------------


def test_a_429_sent_before_the_last_cut_does_not_cut_again() -> None:
    """After a cut, a 429 for a request sent before it leaves the rate alone but keeps the scope active."""
    limiter, clock = make(quiet_period=1.0)
    send(limiter, clock, 64.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")  # the cut, at 1001.0
    cut = limiter.state()["global"]["rate_cubic"]
    clock.advance(0.6)  # past the hold
    limiter.on_rate_limited(OP, "global-rate", sent_at=1000.95)  # its round trip was 0.65 s
    assert limiter.state()["global"]["rate_cubic"] == cut
    clock.advance(0.9)  # 1.5 s after the cut, 0.9 s after the late 429
    assert "global" in limiter.rates()
    limiter.on_rate_limited(OP, "global-rate", sent_at=clock.now - 0.05)  # sent after the cut
    assert limiter.state()["global"]["rate_cubic"]["since"] == clock.now


def test_one_429_is_noise_when_two_are_needed() -> None:
    """min_429s=2: the first 429 of a scope never acts, whatever the share."""
    limiter, clock = make(min_429s=2)
    send(limiter, clock, 10.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.state() == {}


def test_429s_more_than_a_second_apart_are_separate_strays() -> None:
    """Two 429s 1.5 s apart never add up to min_429s=2; two exactly 1 s apart do."""
    limiter, clock = make(min_429s=2)
    limiter.reserve(OP)
    limiter.on_rate_limited(OP, "global-rate")
    clock.advance(1.5)
    limiter.reserve(OP)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.state() == {}
    clock.advance(1.0)
    limiter.reserve(OP)
    limiter.on_rate_limited(OP, "global-rate")
    assert list(limiter.state()) == ["global"]


def test_rate_and_concurrency_429s_are_counted_apart() -> None:
    """One global-rate and one global-concurrency 429 are one of each, not two of either."""
    limiter, clock = make(min_429s=2)
    send(limiter, clock, 10.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.state() == {}


def test_share_filter_needs_enough_of_the_last_seconds_requests() -> None:
    """With min_429_share 0.05: 1 limited of 100 sent is noise, 5 of 100 act."""
    limiter, clock = make(min_429_share=0.05)
    send(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.state() == {}
    for _ in range(4):
        limiter.on_rate_limited(OP, "global-rate")
    assert list(limiter.state()) == ["global"]


def test_429s_held_off_after_a_cut_do_not_prolong_the_adaptive_period() -> None:
    """429s within decrease_interval of a cut change nothing: dormancy counts from the cut."""
    limiter, clock = make(quiet_period=5.0, decrease_interval=0.5)
    send(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    clock.advance(0.4)
    limiter.on_rate_limited(OP, "global-rate")
    clock.advance(4.6)
    assert limiter.rates() == {}


# -- pacing ----------------------------------------------------------------------------------


def test_first_request_after_activation_waits_one_interval() -> None:
    """The bucket starts empty at activation: the first request waits exactly 1/rate."""
    limiter, clock = make()
    send(limiter, clock, 64.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    rate = limiter.rates()["global"]
    assert limiter.reserve(OP) == pytest.approx(1.0 / rate)


def test_a_wait_of_exactly_max_wait_is_taken() -> None:
    """max_wait is inclusive: 10/s with burst 1 and max_wait 0.1 gives 0, 0.1, then a refusal."""
    limiter, _ = make(global_rate=10.0, global_burst=1.0, max_wait=0.1)
    assert waits(limiter, 3) == [0.0, 0.1, None]


def test_waiting_anyway_extends_the_acceptable_wait() -> None:
    """A retry that waits 0.2 s for its backoff anyway accepts a 0.3 s wait with max_wait 0.1."""
    limiter, _ = make(global_rate=10.0, global_burst=1.0, max_wait=0.1)
    assert waits(limiter, 2) == [0.0, 0.1]
    assert limiter.reserve(OP, waiting_anyway=0.2) == pytest.approx(0.2)
    assert limiter.reserve(OP, waiting_anyway=0.2) == pytest.approx(0.3)
    assert limiter.reserve(OP, waiting_anyway=0.15) is None


def test_an_idle_ceiling_bucket_holds_at_most_its_burst() -> None:
    """After a long idle time a 10/s ceiling with burst 2 lets exactly 2 go at once."""
    limiter, clock = make(global_rate=10.0, global_burst=2.0)
    clock.advance(100.0)
    assert waits(limiter, 3) == [0.0, 0.0, 0.1]


def test_endpoint_ceiling_and_burst_from_settings_apply_to_every_operation() -> None:
    """endpoint_rate 10/s with endpoint_burst 3: three go at once, then one per 0.1 s."""
    limiter, _ = make(endpoint_rate=10.0, endpoint_burst=3.0)
    assert waits(limiter, 5) == [0.0, 0.0, 0.0, 0.1, 0.2]
    assert waits(limiter, 1, "B") == [0.0]


def assert_burst_of_a_tenth_of_the_rate(limiter: RateLimiter, clock: FakeClock) -> None:
    """After an idle moment, R/10 tokens (at least 1) go at once; the next waits for the rest."""
    clock.advance(1.0)
    rate = limiter.rates()["global"]
    burst = max(1.0, rate / 10)
    at_once = int(burst)
    got = waits(limiter, at_once + 1)
    assert got[:at_once] == [0.0] * at_once
    assert got[at_once] == pytest.approx((1.0 - (burst - at_once)) / rate, abs=1e-5)


@pytest.mark.parametrize("sent_per_second", [128.0, 24.0, 8.0])
def test_adaptive_burst_is_a_tenth_of_a_second_of_the_rate(sent_per_second: float) -> None:
    """An adaptive rate R holds max(1, R/10) tokens: 8.96 at 89.6/s, 1.4 at 14/s, 1 at 5.6/s."""
    limiter, clock = make(scale_constant=1e-18, quiet_period=1000.0, max_wait=10.0)
    send(limiter, clock, sent_per_second, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    assert_burst_of_a_tenth_of_the_rate(limiter, clock)


def test_a_cut_under_a_ceiling_keeps_at_most_the_new_burst() -> None:
    """A full 100/s ceiling bucket cut to 44/s holds 4.4 tokens at once, not its old 100."""
    limiter, clock = make(global_rate=100.0, global_burst=100.0, scale_constant=1e-18, quiet_period=1000.0)
    send(limiter, clock, 64.0, 1.0)  # below the ceiling: the bucket stays full
    limiter.on_rate_limited(OP, "global-rate")
    rate = limiter.rates()["global"]
    assert rate == pytest.approx(44.8)  # (8 + 1 - 1) / 0.125 = 64 accepted, cut by 0.7
    got = waits(limiter, 5)
    assert got[:4] == [0.0] * 4 and got[4] == pytest.approx((1.0 - 0.48) / rate, abs=1e-6)
    assert_burst_of_a_tenth_of_the_rate(limiter, clock)


def test_a_cut_under_a_ceiling_keeps_a_partly_filled_token() -> None:
    """Half a token left in a ceiling bucket at a cut stays half a token: the next request waits 0.5/R."""
    limiter, clock = make(global_rate=100.0, global_burst=1.0, scale_constant=1e-18, quiet_period=1000.0)
    send(limiter, clock, 64.0, 1.0)  # each request takes the one token there is
    clock.advance(0.005)  # half a token back at 100/s
    limiter.on_rate_limited(OP, "global-rate")
    rate = limiter.rates()["global"]
    assert limiter.reserve(OP) == pytest.approx(0.5 / rate, abs=1e-6)


def test_a_ceiling_scope_back_to_dormant_keeps_its_own_burst() -> None:
    """Back at its ceiling after the quiet period, a scope with burst 1 lets one go, not an adaptive burst."""
    limiter, clock = make(global_rate=100.0, global_burst=1.0, quiet_period=5.0)
    send(limiter, clock, 64.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    clock.advance(5.0)
    assert waits(limiter, 3) == [0.0, 0.01, 0.02]


def test_peek_sees_an_operation_ceiling_and_a_disabled_limiter_says_go() -> None:
    """peek reports the wait an operation's own ceiling imposes; disabled, it is always 0."""
    limiter, _ = make()
    limiter.set_endpoint_limit("A", 10.0)
    assert waits(limiter, 10, "A") == [0.0] * 10
    assert limiter.peek("A") == pytest.approx(0.1)
    assert limiter.peek(OP) == 0.0
    disabled, _ = make(enabled=False)
    assert disabled.peek(OP) == 0.0


# -- dormancy --------------------------------------------------------------------------------


def test_scope_goes_dormant_exactly_quiet_period_after_its_last_429() -> None:
    """quiet_period is inclusive: at exactly 5 s after the last acting 429 the scope is dormant."""
    limiter, clock = make(quiet_period=5.0)
    send(limiter, clock, 100.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    clock.advance(5.0)
    assert limiter.rates() == {}
    assert limiter.reserve(OP) == 0.0


def test_a_ceiling_scope_returns_to_its_ceiling_after_the_quiet_period() -> None:
    """Dormant again, a scope with a ceiling paces at the ceiling with its own burst, not adaptively."""
    limiter, clock = make(global_rate=10.0, global_burst=2.0, quiet_period=5.0)
    clock.advance(1.0)
    send(limiter, clock, 10.0, 1.0)
    limiter.on_rate_limited(OP, "global-rate")
    assert limiter.state()["global"]["adaptive"] is True
    clock.advance(30.0)
    state = limiter.state()["global"]
    assert (state["adaptive"], state["ceiling"], state["rate"]) == (False, 10.0, 10.0)
    assert set(state) == {"adaptive", "ceiling", "rate", "tokens"}
    assert limiter.rates() == {"global": 10.0}
    clock.advance(1.0)
    assert waits(limiter, 3) == [0.0, 0.0, 0.1]


def test_state_reports_every_number_to_three_decimals() -> None:
    """state() shows rate, tokens and the in-flight bound rounded to 3 decimals, and both cubics."""
    limiter, clock = make(quiet_period=100.0)
    send(limiter, clock, 64.0, 1.0)
    for _ in range(3):
        limiter.acquire(OP)
    limiter.on_rate_limited(OP, "global-rate")
    limiter.on_rate_limited(OP, "global-concurrency")
    limiter.reserve(OP)
    clock.advance(0.0137)
    state = limiter.state()["global"]
    assert set(state) == {"adaptive", "ceiling", "rate", "tokens", "rate_cubic", "max_in_flight", "concurrency_cubic"}
    for key in ("rate", "tokens", "max_in_flight"):
        assert state[key] == round(state[key], 3) and state[key] != round(state[key], 2), key
    assert set(state["rate_cubic"]) == {"w_max", "k", "since"}
    assert state["concurrency_cubic"] == {"w_max": 3.0, "k": pytest.approx(cubic_k(3.0)), "since": 1001.0}
    assert state["max_in_flight"] == round(0.4 * (0.0137 - cubic_k(3.0)) ** 3 + 3.0, 3)


# -- concurrency -----------------------------------------------------------------------------


def test_one_in_flight_at_a_concurrency_429_still_lets_one_go() -> None:
    """The bound never drops below one request in flight (0.7 of one is still one)."""
    limiter, _ = make()
    limiter.acquire(OP)
    limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.state()["global"]["max_in_flight"] == 1.0
    assert not limiter.acquire(OP)
    limiter.release(OP)
    assert limiter.acquire(OP)
    assert not limiter.acquire(OP)


def test_no_request_in_flight_at_a_concurrency_429_counts_as_one() -> None:
    """A concurrency 429 with nothing counted in flight bounds at 1 with W_max 1."""
    limiter, _ = make()
    limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.state()["global"]["concurrency_cubic"]["w_max"] == 1.0
    limiter2, _ = make()
    limiter2.acquire(OP)
    limiter2.acquire(OP)
    limiter2.on_rate_limited(OP, "global-concurrency")
    assert limiter2.state()["global"]["max_in_flight"] == pytest.approx(1.4)


def test_a_burst_of_concurrency_429s_cuts_once_and_the_next_cut_starts_from_the_bound() -> None:
    """Concurrency 429s cut once per decrease_interval (inclusive), the second from the bound then."""
    limiter, clock = make(decrease_interval=0.5, quiet_period=100.0)
    for _ in range(10):
        limiter.acquire(OP)
    for _ in range(5):
        limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.state()["global"]["max_in_flight"] == pytest.approx(7.0)
    clock.advance(0.5)
    bound = 0.4 * (0.5 - cubic_k(10.0)) ** 3 + 10.0
    limiter.on_rate_limited(OP, "global-concurrency")
    assert limiter.state()["global"]["concurrency_cubic"]["w_max"] == pytest.approx(bound)
    assert limiter.state()["global"]["max_in_flight"] == pytest.approx(0.7 * bound, abs=1e-3)


def test_concurrency_bound_ends_exactly_quiet_period_after_the_last_429() -> None:
    """At exactly quiet_period after the concurrency 429 the bound is gone."""
    limiter, clock = make(quiet_period=5.0)
    limiter.acquire(OP)
    limiter.acquire(OP)
    limiter.on_rate_limited(OP, "global-concurrency")
    clock.advance(5.0)
    assert limiter.acquire(OP)
    assert limiter.state() == {}


def test_operation_in_flight_count_goes_down_on_release() -> None:
    """An operation bounded at 1 in flight takes a new request once its one request is answered."""
    limiter, _ = make()
    limiter.acquire("A")
    limiter.on_rate_limited("A", "endpoint-concurrency")
    assert not limiter.acquire("A")
    limiter.release("A")
    assert limiter.acquire("A")
    assert not limiter.acquire("A")  # one in flight again: exactly one was counted down
    limiter.release("A")
    limiter.release("B")  # an operation never seen: nothing to count down, no error
    assert limiter.acquire("A")
    assert not limiter.acquire("A")


def test_a_429_for_an_operation_never_seen_activates_it() -> None:
    """An endpoint-rate 429 for an operation with no request counted yet creates its scope at min_rate."""
    limiter, _ = make()
    limiter.on_rate_limited("A", "endpoint-rate")
    assert limiter.rates() == {"A": 1.0}


def test_wait_for_slot_waits_for_the_operations_own_bound() -> None:
    """A waiter for an operation bounded in flight gives up when no slot of that operation frees."""
    limiter, _ = make(max_wait=0.2)
    limiter.acquire("A")
    limiter.on_rate_limited("A", "endpoint-concurrency")

    async def sleep(seconds: float) -> None:
        pass

    assert not asyncio.run(wait_for_slot(limiter, "A", sleep))


# -- settings ----------------------------------------------------------------------------------


def test_settings_errors_name_the_setting() -> None:
    """Each invalid setting is refused with a message naming it; the edges of the valid range pass."""
    with pytest.raises(ValueError, match=r"^global_rate must be positive$"):
        make(global_rate=0.0)
    with pytest.raises(ValueError, match=r"^endpoint_burst must be at least 1$"):
        make(endpoint_burst=0.5)
    for bad in ({"decrease_factor": 0.0}, {"decrease_factor": 1.0}, {"scale_constant": 0.0}):
        with pytest.raises(ValueError, match=r"^decrease_factor must be in \(0, 1\) and scale_constant positive$"):
            make(**bad)
    make(global_burst=1.0, endpoint_burst=1.5, decrease_factor=0.01, scale_constant=0.001)


def test_set_endpoint_limit_validates_rate_and_burst() -> None:
    """An operation's ceiling must be positive (fractions allowed) and its burst at least 1."""
    limiter, _ = make()
    message = r"^an endpoint's rate must be positive and its burst at least 1$"
    for rate, burst in ((0.0, None), (-1.0, 2.0), (5.0, 0.5)):
        with pytest.raises(ValueError, match=message):
            limiter.set_endpoint_limit("A", rate, burst)
    limiter.set_endpoint_limit("A", 0.5)
    limiter.set_endpoint_limit("B", 5.0)
    assert waits(limiter, 1, "A") == [0.0]
    assert limiter.peek("A") == pytest.approx(2.0)
