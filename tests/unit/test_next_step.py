"""What follows an attempt (retry.next_step), the peeks it reads, and each give-up reason."""

from __future__ import annotations

from typing import Any

import pytest
from fakeclock import FakeClock

from proxy.breaker import BreakerSettings, CircuitBreaker
from proxy.classify import TransportError, classify_response, classify_transport_error
from proxy.retry import Gates, GiveUp, RetryBudget, RetrySettings, Step, next_step

SUCCESS = classify_response(200, None, None, None)
DECLINED = classify_response(402, None, None, None)
SAVED_500 = classify_response(500, "false", None, None)
GATEWAY = classify_response(502, None, None, None)
LOCK = classify_response(429, None, None, None)
NOT_SENT = classify_transport_error(TransportError.CONNECT)
RESET = classify_transport_error(TransportError.RESET)
SETTINGS = RetrySettings(max_attempts=4, base_delay=0.1, max_delay=1.0, deadline=20.0)


def decide(verdict: Any = GATEWAY, **overrides: Any) -> Step:
    """next_step for a keyed POST's first attempt, pinned jitter 0.5, with ``overrides``."""
    arguments: dict[str, Any] = {
        "attempt": 1,
        "elapsed": 0.0,
        "method": "POST",
        "has_idempotency_key": True,
        "body_held": True,
        "answer_held": True,
        "retry_after": None,
        "settings": SETTINGS,
        "gates": Gates(),
        "rand": lambda: 0.5,
    }
    arguments.update(overrides)
    return next_step(verdict, **arguments)


def test_retryable_failure_retries_after_the_jittered_backoff() -> None:
    """A gateway error on a keyed POST is retried after base * 2^0 * 0.5."""
    assert decide() == Step(None, 0.05, True)
    assert decide(attempt=3) == Step(None, 0.2, True)


@pytest.mark.parametrize("verdict", [SUCCESS, DECLINED, SAVED_500])
def test_final_answers_are_answered_and_left_to_the_sdk(verdict: Any) -> None:
    """Success, 402 and a saved 500 end the request; the answer is not marked settled."""
    assert decide(verdict) == Step(GiveUp.ANSWERED, 0.0, False)


def test_post_without_key_is_not_safe_unless_never_sent() -> None:
    """A POST without a key is not repeated after a reset, but is after a refused connect."""
    assert decide(RESET, has_idempotency_key=False) == Step(GiveUp.NOT_SAFE, 0.0, False)
    assert decide(NOT_SENT, has_idempotency_key=False).give_up is None


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_repeatable_methods_need_no_key(method: str) -> None:
    """Safe and idempotent methods are retried without a key and the answer is settled."""
    assert decide(RESET, method=method, has_idempotency_key=False) == Step(None, 0.05, True)


def test_retries_switched_off_give_up_unsettled() -> None:
    """With retries off nothing is retried and SDKs may retry themselves."""
    off = RetrySettings(enabled=False)
    assert decide(settings=off) == Step(GiveUp.NOT_SAFE, 0.0, False)


def test_streamed_body_or_answer_cannot_be_sent_again() -> None:
    """A streamed request body or an answer already streaming ends the request."""
    assert decide(body_held=False) == Step(GiveUp.BODY_GONE, 0.0, False)
    assert decide(answer_held=False) == Step(GiveUp.BODY_GONE, 0.0, True)
    assert decide(answer_held=False, attempt=2, body_held=False).settled


def test_attempts_run_out_at_max_attempts() -> None:
    """The fourth attempt is the last; the third may still be followed by one."""
    assert decide(attempt=4) == Step(GiveUp.ATTEMPTS, 0.0, True)
    assert decide(attempt=3).give_up is None


def test_deadline_passed_or_reached_during_backoff() -> None:
    """No retry once the deadline has passed, nor when the backoff would cross it."""
    assert decide(elapsed=20.0) == Step(GiveUp.DEADLINE, 0.0, True)
    assert decide(elapsed=19.96) == Step(GiveUp.DEADLINE, 0.0, True)
    assert decide(elapsed=19.9).give_up is None


def test_each_gate_refuses_with_its_reason() -> None:
    """Client gone, budget spent, limiter refusing and a reopened breaker each end the retries."""
    assert decide(gates=Gates(client_connected=False)).give_up is GiveUp.CLIENT_GONE
    assert decide(gates=Gates(budget_available=False)).give_up is GiveUp.BUDGET
    assert decide(gates=Gates(limiter_wait=5.0, limiter_max_wait=0.5)).give_up is GiveUp.RATE_LIMITED
    assert decide(gates=Gates(breakers_admit=False)).give_up is GiveUp.BREAKER_OPEN
    assert all(
        decide(gates=gates).settled
        for gates in (Gates(client_connected=False), Gates(breakers_admit=False))
    )


def test_limiter_wait_lengthens_the_delay_and_counts_against_the_deadline() -> None:
    """A rate-token wait longer than the backoff becomes the delay, and may cross the deadline."""
    gates = Gates(limiter_wait=0.7, limiter_max_wait=1.0)
    assert decide(gates=gates) == Step(None, 0.7, True)
    assert decide(gates=gates, elapsed=19.5).give_up is GiveUp.DEADLINE


def test_the_limiter_may_exceed_max_wait_by_the_backoff_the_retry_waits_anyway() -> None:
    """A rate-token wait within the backoff plus max_wait is taken; one beyond it gives up."""
    covered = Gates(limiter_wait=1.4, limiter_max_wait=0.5)
    assert decide(LOCK, retry_after=1.0, gates=covered) == Step(None, 1.4, True)
    assert decide(LOCK, retry_after=0.8, gates=covered).give_up is GiveUp.RATE_LIMITED


def test_retry_after_is_honoured_up_to_its_cap() -> None:
    """Stripe's Retry-After sets the delay, capped by retry_after_cap."""
    assert decide(LOCK, retry_after=1.5).delay == 1.5
    assert decide(LOCK, retry_after=60.0).delay == SETTINGS.retry_after_cap


def test_budget_available_peeks_without_taking() -> None:
    """available() answers like try_acquire() but counts nothing."""
    clock = FakeClock()
    budget = RetryBudget(0.0, 0.2, 10.0, clock)  # a floor of two retries in the window
    assert budget.available() and budget.available() and budget.available()
    assert budget.try_acquire() and budget.try_acquire()
    assert not budget.available()
    assert not budget.try_acquire()


def test_breaker_would_admit_matches_try_acquire_in_every_state() -> None:
    """would_admit() predicts try_acquire() when closed, open, due and half-open, taking nothing."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        BreakerSettings(consecutive_failures=1, open_duration=5.0, half_open_probes=1), clock
    )
    assert breaker.would_admit()
    assert breaker.try_acquire()
    breaker.record(True, 0.1)
    assert not breaker.would_admit()
    clock.advance(5.0)
    assert breaker.would_admit() and breaker.would_admit()
    assert breaker.try_acquire()  # the one probe slot
    assert not breaker.would_admit()
    assert not breaker.try_acquire()
    clock.advance(breaker.settings.probe_timeout)
    assert breaker.would_admit()  # the lost probe's slot is handed out again


def test_each_gate_gives_up_exactly_settled_with_no_delay() -> None:
    """A refusing gate ends the request at once (no delay) and marks the answer settled."""
    assert decide(gates=Gates(client_connected=False)) == Step(GiveUp.CLIENT_GONE, 0.0, True)
    assert decide(gates=Gates(budget_available=False)) == Step(GiveUp.BUDGET, 0.0, True)
    assert decide(gates=Gates(limiter_wait=5.0, limiter_max_wait=0.5)) == Step(GiveUp.RATE_LIMITED, 0.0, True)
    assert decide(gates=Gates(breakers_admit=False)) == Step(GiveUp.BREAKER_OPEN, 0.0, True)


def test_deadline_is_checked_before_the_gates_and_at_its_exact_end() -> None:
    """At exactly the deadline the answer is DEADLINE (not a gate's reason, and unsettled for an
    unsent POST); a backoff ending exactly at the deadline is not waited for."""
    unsent = decide(NOT_SENT, has_idempotency_key=False, elapsed=20.0, gates=Gates(budget_available=False))
    assert unsent == Step(GiveUp.DEADLINE, 0.0, False)
    assert decide(elapsed=19.95) == Step(GiveUp.DEADLINE, 0.0, True)  # 19.95 + 0.05 == 20.0


def test_a_limiter_wait_of_exactly_backoff_plus_max_wait_is_waited_for() -> None:
    """A rate-token wait equal to the backoff plus limiter_max_wait is still accepted."""
    settings = RetrySettings(max_attempts=4, base_delay=1.0, max_delay=1.0, deadline=20.0)
    gates = Gates(limiter_wait=0.75, limiter_max_wait=0.25)  # backoff 0.5 (jitter 0.5)
    assert decide(settings=settings, gates=gates) == Step(None, 0.75, True)


UNAUTHORIZED = classify_response(401, None, None, b'{"error":{"type":"invalid_request_error"}}')
KEY_HELD = Gates(next_key_available=True)


def test_401_with_another_key_held_switches_keys_at_once() -> None:
    """A 401 with a good key held is retried at once with it, even a POST without a key."""
    step = decide(UNAUTHORIZED, gates=KEY_HELD, has_idempotency_key=False)
    assert step == Step(None, 0.0, True, True)
    assert step.switch_key


def test_401_without_another_key_is_the_answer() -> None:
    """No held key to switch to: the 401 goes to the app as it is."""
    assert decide(UNAUTHORIZED) == Step(GiveUp.ANSWERED, 0.0, False)


def test_key_switch_ignores_attempts_and_budget_but_not_the_deadline() -> None:
    """The switch is taken past max_attempts and with the budget spent, never past the deadline."""
    spent = Gates(next_key_available=True, budget_available=False)
    assert decide(UNAUTHORIZED, gates=spent, attempt=4).switch_key
    assert decide(UNAUTHORIZED, gates=KEY_HELD, elapsed=20.0) == Step(GiveUp.DEADLINE, 0.0, False)


def test_key_switch_happens_once_per_request() -> None:
    """A second 401 after switching keys is final (keys_exhausted)."""
    step = decide(UNAUTHORIZED, gates=KEY_HELD, attempt=2, switched_key=True)
    assert step == Step(GiveUp.KEYS_EXHAUSTED, 0.0, False)


def test_key_switch_needs_the_body_and_the_client() -> None:
    """A streamed body or a client gone ends the request with the 401, unsettled (nothing was retried)."""
    assert decide(UNAUTHORIZED, gates=KEY_HELD, body_held=False) == Step(GiveUp.BODY_GONE, 0.0, False)
    gone = Gates(next_key_available=True, client_connected=False)
    assert decide(UNAUTHORIZED, gates=gone) == Step(GiveUp.CLIENT_GONE, 0.0, False)


def test_attempt_after_a_key_switch_is_one_extra() -> None:
    """After a switch the request still has max_attempts for other failures (one extra)."""
    assert decide(GATEWAY, attempt=4, switched_key=True).give_up is None
    assert decide(GATEWAY, attempt=5, switched_key=True).give_up is GiveUp.ATTEMPTS
    assert decide(GATEWAY, attempt=4).give_up is GiveUp.ATTEMPTS
