"""Circuit breaker: tripping rules, open time, half-open probes, host-wide mode."""

from __future__ import annotations

import pytest
from fakeclock import FakeClock

from proxy.breaker import BreakerSettings, BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(
    clock: FakeClock | None = None, **settings: object
) -> tuple[CircuitBreaker, FakeClock, list[tuple[BreakerState, BreakerState]]]:
    """A breaker on a fake clock that logs its transitions; rate rule off unless asked for."""
    clock = clock or FakeClock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    defaults: dict[str, object] = {"consecutive_failures": 0}
    defaults.update(settings)
    breaker = CircuitBreaker(
        BreakerSettings(**defaults),  # type: ignore[arg-type]
        clock,
        lambda old, new: transitions.append((old, new)),
    )
    return breaker, clock, transitions


def call(breaker: CircuitBreaker, failure: bool, duration: float = 0.01, op: str = "a") -> None:
    """One acquired call with the given result."""
    assert breaker.try_acquire()
    breaker.record(failure, duration, op)


def trip(breaker: CircuitBreaker) -> None:
    """Open a breaker configured with min_calls=1 (or consecutive_failures=1)."""
    call(breaker, True)
    assert breaker.state is OPEN


# -- tripping ---------------------------------------------------------------------------------


def test_failure_rate_needs_min_calls() -> None:
    """All-failing traffic below min_calls stays closed; the min_calls-th call opens it."""
    breaker, _, _ = make(min_calls=20, failure_rate=0.5)
    for _ in range(19):
        call(breaker, True)
    assert breaker.state is CLOSED
    call(breaker, True)
    assert breaker.state is OPEN
    assert breaker.trips == 1


def test_failure_rate_threshold_is_inclusive() -> None:
    """Opens exactly when failures/calls reaches failure_rate, not before."""
    breaker, _, _ = make(min_calls=10, failure_rate=0.5)
    for _ in range(6):
        call(breaker, False)
    for _ in range(5):
        call(breaker, True)
    assert breaker.state is CLOSED  # 5/11 < 0.5
    call(breaker, True)
    assert breaker.state is OPEN  # 6/12 == 0.5


def test_failures_outside_the_window_do_not_count() -> None:
    """Failures older than the window drop out of the rate."""
    breaker, clock, _ = make(min_calls=4, failure_rate=0.5, window=10.0)
    for _ in range(3):
        call(breaker, True)
    clock.advance(10.0)
    call(breaker, True)  # window: 1 call, 1 failure
    assert breaker.state is CLOSED
    assert breaker.window_counts() == (1, 1, 0)


def test_window_slides_second_by_second() -> None:
    """Each second's calls leave the window exactly `window` seconds later, one bucket at a time."""
    breaker, clock, _ = make(min_calls=1000, window=10.0)
    call(breaker, True)
    call(breaker, False, duration=9.0)
    clock.advance(5.0)
    call(breaker, True)
    assert breaker.window_counts() == (3, 2, 1)
    clock.advance(5.0)  # the first second's calls leave
    assert breaker.window_counts() == (1, 1, 0)
    clock.advance(3.0)
    assert breaker.window_counts() == (1, 1, 0)
    clock.advance(2.0)
    assert breaker.window_counts() == (0, 0, 0)


def test_consecutive_failures_open_despite_healthy_window() -> None:
    """N failures in a row open the breaker even when the window's rate is low."""
    breaker, _, _ = make(consecutive_failures=5, min_calls=1, failure_rate=0.9)
    for _ in range(100):
        call(breaker, False)
    for _ in range(4):
        call(breaker, True)
    assert breaker.state is CLOSED
    call(breaker, True)
    assert breaker.state is OPEN


def test_a_success_resets_the_consecutive_count() -> None:
    """Failures broken by a success are not consecutive."""
    breaker, _, _ = make(consecutive_failures=3, min_calls=1000)
    for _ in range(10):
        call(breaker, True)
        call(breaker, True)
        call(breaker, False)
    assert breaker.state is CLOSED


def test_non_failures_never_open() -> None:
    """Fast successes (4xx, 402 and such are recorded as non-failures) never open it."""
    breaker, _, transitions = make(min_calls=1, failure_rate=0.01, consecutive_failures=1)
    for _ in range(1000):
        call(breaker, False)
    assert breaker.state is CLOSED
    assert transitions == []


def test_slow_calls_open_when_all_are_slow() -> None:
    """With slow_call_rate 1.0 the breaker opens once min_calls calls are all slow."""
    breaker, _, _ = make(min_calls=5, slow_call_duration=2.0, slow_call_rate=1.0)
    for _ in range(4):
        call(breaker, False, duration=3.0)
    assert breaker.state is CLOSED
    call(breaker, False, duration=3.0)
    assert breaker.state is OPEN


def test_slow_rate_below_threshold_stays_closed() -> None:
    """One fast call among slow ones keeps a 1.0 slow rate from being reached."""
    breaker, _, _ = make(min_calls=5, slow_call_duration=2.0, slow_call_rate=1.0)
    call(breaker, False, duration=0.1)
    for _ in range(20):
        call(breaker, False, duration=2.5)
    assert breaker.state is CLOSED
    call(breaker, False, duration=2.0)  # exactly the limit is not slow
    assert breaker.window_counts() == (22, 0, 20)


def test_slow_rate_fraction() -> None:
    """A lower slow_call_rate opens at that share of slow calls."""
    breaker, _, _ = make(min_calls=4, slow_call_duration=1.0, slow_call_rate=0.5)
    call(breaker, False, duration=0.1)
    call(breaker, False, duration=0.1)
    call(breaker, False, duration=1.5)
    assert breaker.state is CLOSED  # below min_calls
    call(breaker, False, duration=1.5)
    assert breaker.state is OPEN


def test_disabled_breaker_never_opens() -> None:
    """enabled=False: always admits, never trips."""
    breaker, _, _ = make(enabled=False, min_calls=1, consecutive_failures=1)
    for _ in range(50):
        call(breaker, True)
    assert breaker.state is CLOSED and breaker.trips == 0


# -- open and half-open -----------------------------------------------------------------------


def test_open_fails_fast_until_open_duration() -> None:
    """While open, try_acquire is False and retry_after counts down to half-open."""
    breaker, clock, _ = make(min_calls=1, open_duration=5.0)
    trip(breaker)
    assert not breaker.try_acquire()
    assert breaker.retry_after() == 5.0
    clock.advance(4.0)
    assert not breaker.try_acquire()
    assert breaker.retry_after() == 1.0
    clock.advance(1.0)
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0


def test_results_while_open_are_ignored() -> None:
    """Late answers recorded while open neither close nor extend it."""
    breaker, clock, _ = make(min_calls=1, open_duration=5.0, half_open_probes=1)
    trip(breaker)
    for _ in range(10):
        breaker.record(False, 0.01, "a")
        breaker.record(True, 0.01, "a")
    assert breaker.state is OPEN and breaker.trips == 1
    assert breaker.retry_after() == 5.0
    clock.advance(5.0)
    assert breaker.state is HALF_OPEN


def test_half_open_admits_exactly_n_probes() -> None:
    """In half-open exactly half_open_probes permits are handed out."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=3)
    trip(breaker)
    clock.advance(5.0)
    assert [breaker.try_acquire() for _ in range(5)] == [True, True, True, False, False]


def test_half_open_closes_after_n_probe_successes_and_clears_window() -> None:
    """N successful probes close it with an empty window (one failure does not reopen)."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=3)
    trip(breaker)
    clock.advance(5.0)
    for _ in range(3):
        assert breaker.try_acquire()
    breaker.record(False, 0.01)
    breaker.record(False, 0.01)
    assert breaker.state is HALF_OPEN
    breaker.record(False, 0.01)
    assert breaker.state is CLOSED
    assert breaker.window_counts() == (0, 0, 0)
    assert breaker.try_acquire()


def test_probe_failure_reopens() -> None:
    """Any failed probe reopens the breaker at once."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=3)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.try_acquire() and breaker.try_acquire()
    breaker.record(False, 0.01)
    breaker.record(True, 0.01)
    assert breaker.state is OPEN
    assert breaker.trips == 2
    assert not breaker.try_acquire()


def test_record_without_probe_in_half_open_is_ignored() -> None:
    """A result with no probe outstanding (a late answer) does not decide half-open."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=1)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.state is HALF_OPEN
    breaker.record(True, 0.01)
    breaker.record(False, 0.01)
    assert breaker.state is HALF_OPEN


def test_release_returns_a_probe_slot() -> None:
    """A released permit lets another probe through; it does not count as a success."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=1)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    breaker.release()
    assert breaker.state is HALF_OPEN
    assert breaker.try_acquire()
    breaker.record(False, 0.01)
    assert breaker.state is CLOSED


def test_lost_probes_come_back_after_probe_timeout() -> None:
    """Probes never recorded nor released are presumed lost after probe_timeout, not forever."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=2, probe_timeout=30.0)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.try_acquire()
    breaker.record(False, 0.01)  # one probe succeeded
    clock.advance(1.0)
    assert breaker.try_acquire()  # this one is lost
    clock.advance(29.0)
    assert not breaker.try_acquire()
    clock.advance(1.0)
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    breaker.record(False, 0.01)
    assert breaker.state is CLOSED


def test_release_when_closed_is_harmless() -> None:
    """release() in the closed state changes nothing."""
    breaker, _, transitions = make(min_calls=1)
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.state is CLOSED and transitions == []


def test_open_time_doubles_per_consecutive_trip_up_to_max() -> None:
    """Each reopen without closing doubles the open time, capped; closing resets it."""
    breaker, clock, _ = make(
        min_calls=1, open_duration=5.0, open_duration_max=30.0, half_open_probes=1
    )
    trip(breaker)
    opens = [breaker.retry_after()]
    for _ in range(4):
        clock.advance(opens[-1])
        call(breaker, True)  # failed probe
        opens.append(breaker.retry_after())
    assert opens == [5.0, 10.0, 20.0, 30.0, 30.0]
    clock.advance(30.0)
    call(breaker, False)  # successful probe closes
    assert breaker.state is CLOSED
    trip(breaker)
    assert breaker.retry_after() == 5.0


def test_open_time_constant_without_max() -> None:
    """With open_duration_max == open_duration the open time never grows."""
    breaker, clock, _ = make(min_calls=1, open_duration=5.0, half_open_probes=1)
    trip(breaker)
    for _ in range(3):
        clock.advance(5.0)
        call(breaker, True)
        assert breaker.retry_after() == 5.0


def test_on_transition_sees_every_change() -> None:
    """on_transition is called with (old, new) for each state change, in order."""
    breaker, clock, transitions = make(min_calls=1, half_open_probes=1)
    trip(breaker)
    clock.advance(5.0)
    call(breaker, True)
    clock.advance(5.0)
    call(breaker, False)
    assert transitions == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


# -- host breaker -----------------------------------------------------------------------------


def test_host_breaker_ignores_one_bad_operation() -> None:
    """With min_failing_operations=3, failures of a single operation never open it."""
    breaker, _, _ = make(min_calls=5, consecutive_failures=5, min_failing_operations=3)
    for _ in range(100):
        call(breaker, True, op="POST /v1/charges")
    assert breaker.state is CLOSED


def test_host_breaker_opens_when_failures_span_operations() -> None:
    """Failures across min_failing_operations distinct operations open it."""
    breaker, _, _ = make(min_calls=6, min_failing_operations=3)
    for op in ("a", "a", "b", "b", "a"):
        call(breaker, True, op=op)
    assert breaker.state is CLOSED
    call(breaker, True, op="c")
    assert breaker.state is OPEN


def test_host_breaker_forgets_operations_outside_the_window() -> None:
    """An operation that failed longer than the window ago no longer counts as failing."""
    breaker, clock, _ = make(
        min_calls=3, consecutive_failures=3, min_failing_operations=2, window=10.0
    )
    call(breaker, True, op="a")
    clock.advance(11.0)
    call(breaker, True, op="b")
    call(breaker, True, op="b")
    call(breaker, True, op="b")
    assert breaker.state is CLOSED
    call(breaker, True, op="a")
    assert breaker.state is OPEN


def test_host_breaker_consecutive_rule_across_operations() -> None:
    """The consecutive rule opens a host breaker when the run spans enough operations."""
    breaker, _, _ = make(min_calls=1000, consecutive_failures=4, min_failing_operations=2)
    for _ in range(50):
        call(breaker, False, op="a")
    for op in ("a", "a", "a", "b"):
        call(breaker, True, op=op)
    assert breaker.state is OPEN


@pytest.mark.parametrize("window", [0.0, -1.0])
def test_bad_window_rejected(window: float) -> None:
    """A non-positive window is a programming error."""
    with pytest.raises(ValueError):
        make(window=window)


def test_one_second_window_is_valid_and_the_refusal_names_the_window() -> None:
    """A one-second window works; a zero window is refused with a message naming it."""
    CircuitBreaker(BreakerSettings(window=1.0), FakeClock())
    with pytest.raises(ValueError, match="breaker window must be positive, not 0"):
        CircuitBreaker(BreakerSettings(window=0), FakeClock())


def test_overdue_probes_give_back_exactly_their_slots() -> None:
    """Of three probes one succeeded and two were lost: after probe_timeout two new ones go out."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=3, probe_timeout=60.0)
    trip(breaker)
    clock.advance(5.0)
    assert [breaker.try_acquire() for _ in range(3)] == [True, True, True]
    breaker.record(False, 0.01)
    clock.advance(60.0)
    assert [breaker.try_acquire() for _ in range(3)] == [True, True, False]


def test_late_answer_of_a_presumed_lost_probe_decides_nothing() -> None:
    """Once lost probes were handed out again, a late failure from one of them is ignored."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=2, probe_timeout=60.0)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.try_acquire() and breaker.try_acquire()
    clock.advance(60.0)
    assert breaker.try_acquire()  # the two are presumed lost: a new probe
    breaker.record(False, 0.01)  # the new probe succeeds
    breaker.record(True, 0.01)  # a lost probe's late failure
    assert breaker.state is HALF_OPEN


def test_release_of_a_permit_taken_while_closed_adds_no_probe() -> None:
    """A permit taken before the trip and released in half-open does not widen the probe count."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=1)
    assert breaker.try_acquire()  # a call admitted while closed...
    trip(breaker)
    clock.advance(5.0)
    assert breaker.state is HALF_OPEN
    breaker.release()  # ...gives its permit back after the breaker went half-open
    assert [breaker.try_acquire(), breaker.try_acquire()] == [True, False]


def test_released_probe_slot_is_counted_exactly_once() -> None:
    """Of three probes one is released: one more goes out, and three successes close."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=3)
    trip(breaker)
    clock.advance(5.0)
    assert [breaker.try_acquire() for _ in range(3)] == [True, True, True]
    breaker.release()
    assert [breaker.try_acquire(), breaker.try_acquire()] == [True, False]
    for _ in range(3):
        breaker.record(False, 0.01)
    assert breaker.state is CLOSED


def test_released_then_lost_probe_comes_back_once() -> None:
    """A released probe slot then a lost probe: after probe_timeout exactly one new probe."""
    breaker, clock, _ = make(min_calls=1, half_open_probes=1, probe_timeout=60.0)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.try_acquire()  # then lost
    clock.advance(60.0)
    assert [breaker.try_acquire(), breaker.try_acquire()] == [True, False]


def test_a_failure_on_a_whole_second_counts_in_that_second() -> None:
    """A failure recorded exactly at a whole second stays in a 10 s window 9 s later, not 10."""
    breaker, clock, _ = make(FakeClock(1000.0), min_calls=1000)
    clock.now = 1001.0
    breaker.record(True, 0.01, "a")
    clock.now = 1010.0
    assert breaker.window_counts() == (1, 1, 0)
    clock.now = 1011.0
    assert breaker.window_counts() == (0, 0, 0)


def test_host_breaker_opens_on_slow_calls_spanning_operations() -> None:
    """Slow calls across min_failing_operations operations open a host breaker; of one, never."""
    breaker, _, _ = make(min_calls=3, slow_call_duration=1.0, slow_call_rate=1.0, min_failing_operations=2)
    for _ in range(5):
        call(breaker, False, duration=2.0, op="a")
    assert breaker.state is CLOSED
    call(breaker, False, duration=2.0, op="b")
    assert breaker.state is OPEN


def test_host_breaker_forgets_an_operation_exactly_one_window_old() -> None:
    """A failure exactly `window` seconds old no longer counts towards spanning operations."""
    breaker, clock, _ = make(FakeClock(1000.0), consecutive_failures=2, min_calls=1000, min_failing_operations=2, window=10.0)
    call(breaker, True, op="a")
    clock.now = 1010.0
    call(breaker, True, op="b")
    assert breaker.state is CLOSED
    call(breaker, True, op="a")
    assert breaker.state is OPEN


def test_retry_after_is_zero_once_the_open_time_has_passed() -> None:
    """retry_after() never goes negative nor invents a wait once the open time is over."""
    breaker, clock, _ = make(min_calls=1, open_duration=5.0)
    trip(breaker)
    clock.advance(7.0)
    assert breaker.retry_after() == 0.0


def test_closing_resets_the_consecutive_count() -> None:
    """After the breaker closes, consecutive_failures counts from zero again."""
    breaker, clock, _ = make(consecutive_failures=3, min_calls=1000, half_open_probes=1)
    for _ in range(3):
        call(breaker, True)
    assert breaker.state is OPEN
    clock.advance(5.0)
    call(breaker, False)
    assert breaker.state is CLOSED
    call(breaker, True)
    call(breaker, True)
    assert breaker.state is CLOSED


def test_closed_flag_follows_the_state() -> None:
    """``closed`` is True exactly while the breaker is CLOSED (the pipeline reads it instead of try_acquire)."""
    breaker, clock, _ = make(min_calls=1, open_duration=5.0, half_open_probes=1)
    assert breaker.closed
    trip(breaker)
    assert not breaker.closed
    clock.advance(5.0)
    assert breaker.state is HALF_OPEN and not breaker.closed
    call(breaker, False)
    assert breaker.state is CLOSED and breaker.closed
