"""Circuit breaker: fail fast while Stripe (an operation, or the whole host) is failing.

Pure: the clock is an argument (monotonic seconds), nothing sleeps or logs; state changes are
reported through ``on_transition``. One instance per operation template and one for the whole
host; the host one sets ``min_failing_operations`` so one broken endpoint cannot open it.

States::

    CLOSED --(failure rate / consecutive failures / slow calls)--> OPEN
    OPEN --(open time passed; seen by state, try_acquire)--> HALF_OPEN
    HALF_OPEN --(half_open_probes successes)--> CLOSED (window cleared)
    HALF_OPEN --(any probe failure)--> OPEN (open time doubled up to open_duration_max)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from proxy.window import SecondBuckets

__all__ = ["BreakerSettings", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    """Where a breaker is; the value is the metric/log label."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens, how long it stays open, and how it probes its way back."""

    enabled: bool = True
    window: float = 10.0  # sliding time window (seconds), bucketed per second
    min_calls: int = 20  # failure-rate rule needs this many calls in the window
    failure_rate: float = 0.5  # open when failures/calls >= this
    consecutive_failures: int = 10  # or on this many failures in a row (0 = rule off)
    slow_call_duration: float = 5.0  # a success slower than this is "slow"
    slow_call_rate: float = 1.0  # open when slow/calls >= this (> 1.0 = rule off)
    open_duration: float = 5.0
    open_duration_max: float = 5.0  # if > open_duration, each consecutive trip doubles the time
    half_open_probes: int = 3  # probes let through in half-open; all must succeed to close
    min_failing_operations: int = 1  # host breaker: failures must span this many operations
    # A half-open permit neither recorded nor released within this long is presumed lost (a caller
    # cancelled without release()); its slot comes back so the breaker cannot stick half-open.
    probe_timeout: float = 60.0


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN

# Doubling past this many consecutive trips cannot matter against any sane cap.
_MAX_GROWTH_EXPONENT = 30


class CircuitBreaker:
    """A sliding-window circuit breaker with consecutive-failure and slow-call rules.

    Use: ``try_acquire()`` before a call (False = fail fast), then ``record()`` its result, or
    ``release()`` if the call is not made after all. Results recorded while OPEN (late answers
    from calls started before the trip) are ignored.
    """

    __slots__ = (
        "_calls",
        "_clock",
        "_consecutive",
        "_consecutive_limit",
        "_enabled",
        "_fail_ops",
        "_failures",
        "_last_probe_at",
        "_on_transition",
        "_open_until",
        "_probe_limit",
        "_probe_successes",
        "_probes_inflight",
        "_probes_issued",
        "_reopens",
        "_slow",
        "_slow_after",
        "_slow_ops",
        "_state",
        "_track_operations",
        "_window",
        "closed",
        "settings",
        "trips",
    )

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float],
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if settings.window <= 0:
            raise ValueError(f"breaker window must be positive, not {settings.window!r}")
        self.settings = settings
        self.trips = 0  # how many times it opened
        self._clock = clock
        self._on_transition = on_transition
        self._enabled = settings.enabled
        self._state = _CLOSED
        # True while CLOSED, where try_acquire grants at once: the pipeline reads this instead
        # of making the call (a read instead of a Python call per breaker per request).
        self.closed = True
        self._slow_after = settings.slow_call_duration
        self._consecutive_limit = (
            settings.consecutive_failures if settings.consecutive_failures > 0 else math.inf
        )
        self._track_operations = settings.min_failing_operations > 1
        self._probe_limit = max(1, settings.half_open_probes)
        self._window = SecondBuckets(settings.window, 3, clock())
        self._calls, self._failures, self._slow = self._window.rings
        self._consecutive = 0
        # operation -> clock time of its latest failure / slow call (host breaker only)
        self._fail_ops: dict[str | None, float] = {}
        self._slow_ops: dict[str | None, float] = {}
        self._open_until = 0.0
        self._reopens = 0  # trips since the breaker last closed
        self._probes_issued = 0
        self._probes_inflight = 0
        self._probe_successes = 0
        self._last_probe_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose open time has passed becomes HALF_OPEN."""
        if self._state is _OPEN and self._clock() >= self._open_until:
            self._half_open()
        return self._state

    def try_acquire(self) -> bool:
        """Whether a call may be made now; in HALF_OPEN at most ``half_open_probes`` get one."""
        state = self._state
        if state is _CLOSED:
            return True
        now = self._clock()
        if state is _OPEN:
            if now < self._open_until:
                return False
            self._half_open()
        if self._probes_issued >= self._probe_limit:
            if (
                self._probes_inflight == 0
                or now - self._last_probe_at < self.settings.probe_timeout
            ):
                return False
            # Every outstanding probe is overdue: presume them lost and hand their slots out again.
            self._probes_issued -= self._probes_inflight
            self._probes_inflight = 0
        self._probes_issued += 1
        self._probes_inflight += 1
        self._last_probe_at = now
        return True

    def would_admit(self) -> bool:
        """Whether :meth:`try_acquire` would give a permit now; takes nothing, changes nothing."""
        state = self._state
        if state is _CLOSED:
            return True
        now = self._clock()
        if state is _OPEN:
            return now >= self._open_until  # it would turn half-open with every probe slot free
        return self._probes_issued < self._probe_limit or (
            self._probes_inflight > 0 and now - self._last_probe_at >= self.settings.probe_timeout
        )

    def release(self) -> None:
        """Give back a permit whose call was never made (a half-open probe slot comes back)."""
        if self._state is _HALF_OPEN and self._probes_inflight > 0:
            self._probes_inflight -= 1
            self._probes_issued -= 1

    def record(
        self,
        failure: bool,
        duration: float,
        operation: str | None = None,
        now: float | None = None,
    ) -> None:
        """Record one call's result: ``failure`` is ``Verdict.upstream_failure``.

        ``duration`` (seconds) marks a success slow when above ``slow_call_duration``;
        ``operation`` names the operation, used by a host breaker's ``min_failing_operations``;
        ``now`` is the clock's time if the caller has just read it (one read fewer).
        """
        if self._state is not _CLOSED:
            if self._state is _HALF_OPEN:
                self._record_probe(failure)
            return
        if not self._enabled:
            return
        if now is None:
            now = self._clock()
        window = self._window
        if now >= window.edge:
            window.advance(now)
        idx = window.idx
        self._calls[idx] += 1
        if failure:
            self._failures[idx] += 1
            self._consecutive += 1
            self._after_failure(now, operation)
            return
        self._consecutive = 0
        if duration > self._slow_after:
            self._slow[idx] += 1
            self._after_slow(now, operation)

    def retry_after(self) -> float:
        """Seconds until the breaker lets probes through (0.0 if it is not open)."""
        if self._state is not _OPEN:
            return 0.0
        remaining = self._open_until - self._clock()
        return remaining if remaining > 0.0 else 0.0

    def window_counts(self) -> tuple[int, int, int]:
        """``(calls, failures, slow)`` in the current window, for metrics and the status page."""
        now = self._clock()
        if now >= self._window.edge:
            self._window.advance(now)
        return sum(self._calls), sum(self._failures), sum(self._slow)

    # -- rules ---------------------------------------------------------------------------------

    def _after_failure(self, now: float, operation: str | None) -> None:
        settings = self.settings
        if self._track_operations:
            self._fail_ops[operation] = now
        tripped = self._consecutive >= self._consecutive_limit
        if not tripped:
            calls = sum(self._calls)
            tripped = (
                calls >= settings.min_calls and sum(self._failures) / calls >= settings.failure_rate
            )
        if tripped and self._spans_operations(self._fail_ops, now):
            self._trip(now)

    def _after_slow(self, now: float, operation: str | None) -> None:
        settings = self.settings
        if self._track_operations:
            self._slow_ops[operation] = now
        calls = sum(self._calls)
        if (
            calls >= settings.min_calls
            and sum(self._slow) / calls >= settings.slow_call_rate
            and self._spans_operations(self._slow_ops, now)
        ):
            self._trip(now)

    def _spans_operations(self, seen: dict[str | None, float], now: float) -> bool:
        if not self._track_operations:
            return True
        cutoff = now - self.settings.window
        for operation in [op for op, at in seen.items() if at <= cutoff]:
            del seen[operation]
        return len(seen) >= self.settings.min_failing_operations

    def _record_probe(self, failure: bool) -> None:
        if self._probes_inflight <= 0:
            return  # not a probe: a late answer from a call started before the trip
        self._probes_inflight -= 1
        if failure:
            self._trip(self._clock())
            return
        self._probe_successes += 1
        if self._probe_successes >= self._probe_limit:
            self._close()

    # -- transitions ---------------------------------------------------------------------------

    def _trip(self, now: float) -> None:
        settings = self.settings
        duration = settings.open_duration
        if self._reopens and settings.open_duration_max > duration:
            growth = duration * (1 << min(self._reopens, _MAX_GROWTH_EXPONENT))
            duration = min(settings.open_duration_max, growth)
        self._open_until = now + duration
        self._reopens += 1
        self.trips += 1
        self._set_state(_OPEN)

    def _half_open(self) -> None:
        self._probes_issued = 0
        self._probes_inflight = 0
        self._probe_successes = 0
        self._set_state(_HALF_OPEN)

    def _close(self) -> None:
        self._reset_window()
        self._reopens = 0
        self._set_state(_CLOSED)

    def _set_state(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self.closed = new is _CLOSED
        if self._on_transition is not None:
            self._on_transition(old, new)

    # -- window --------------------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._window.clear()
        self._consecutive = 0
        self._fail_ops.clear()
        self._slow_ops.clear()
