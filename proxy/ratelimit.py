"""Client-side rate limiter: dormant until Stripe throttles, then adaptive, then dormant again.

Pure: the clock is an argument (monotonic seconds), nothing sleeps or does I/O.

A healthy app is never slowed: while a scope (the account, ``"global"``, or one operation) is
dormant, :meth:`RateLimiter.reserve` only counts the request in that scope's send-rate meter
and returns 0. A ``429`` whose ``Stripe-Rate-Limited-Reason`` names a scope activates it:

- ``global-rate`` / ``endpoint-rate``: the scope gets a token bucket whose rate starts at the
  rate Stripe accepted just before (sent minus rate limited, over the last second), cut by
  ``decrease_factor``, then probes back up along a cubic curve;
- ``global-concurrency`` / ``endpoint-concurrency``: the scope gets a bound on requests in
  flight, from the number in flight at the 429, cut and probed back up the same way;
- ``resource-specific`` (one object, such as a PaymentIntent) or no reason (a lock timeout):
  nothing changes; backoff handles them.

A stray 429 is noise (a scope reacts only once ``min_429s`` of its requests, and at least
``min_429_share`` of them, were rate limited within the last second). A scope goes dormant
again once ``quiet_period`` passes without such 429s. Configured
rates (``global_rate``, ``endpoint_rate``) are optional ceilings that always apply.

The anchor is the AWS SDKs' *adaptive* retry mode (botocore ``retries/adaptive.py``
``ClientRateLimiter`` and ``RateClocker``, ``retries/throttling.py`` ``CubicCalculator``,
``retries/bucket.py`` ``TokenBucket``): a client-side token bucket enabled only after the first
throttling answer, its rate set from the measured send rate, cut by beta = 0.7 and regrown as
``C * (t - K)**3 + W_max`` with C = 0.4 and ``K = cbrt(W_max * (1 - beta) / C)``. Where we
differ, and why: one bucket per scope Stripe names (not one per client); the base is the rate
Stripe *accepted* (a dormant client that overshoots learns the limit in one step); a scope
decreases at most once per ``decrease_interval`` and not again until the requests already
scheduled at the old rate have gone (a burst of in-flight 429s cuts once); reservations are
scheduled ahead like Go's ``rate.Limiter.Reserve`` instead of blocking; and a quiet scope goes
dormant instead of staying enabled for the life of the process.

All state per scope is a handful of numbers (:meth:`RateLimiter.state`). A fleet shares it
through ``proxy.sharedlimit``: each cut is reported (``on_throttle``), and the fleet's cubic for
a scope comes back (:meth:`RateLimiter.apply_shared`) with this sidecar's ``weight``, its
fraction of the fleet's rate. The cubic is then kept in fleet units (requests/s of the whole
fleet) and the scope's rate is ``weight`` times it; alone, ``weight`` is 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["GLOBAL_SCOPE", "RateLimitSettings", "RateLimiter", "SharedState", "wait_for_slot"]

GLOBAL_SCOPE = "global"

_INF = float("inf")
_SLICES = 8  # the send-rate meter: 8 slices of 0.125 s, a sliding window of one second
_SLICE = 0.125
# An active bucket holds at most this many seconds of its rate: short bursts pass, but
# nothing right after a throttle can go much faster than the learned rate.
_BURST_SECONDS = 0.1
_SLOT_POLLS = 20  # a request waiting for an in-flight slot looks this many times in max_wait


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """How the limiter adapts to Stripe's 429s; optional ceilings (None: no static cap)."""

    enabled: bool = True
    max_wait: float = 0.5  # a request waits at most this long for a token or a slot
    decrease_factor: float = 0.7  # beta: on a 429 naming a scope its rate becomes base * beta
    scale_constant: float = 0.4  # C: how fast the cubic regrows (requests/s per s^3)
    min_rate: float = 1.0
    # A scope is cut at most once per this many seconds (and not before the requests already
    # scheduled at the old rate have gone), so one overload cuts once, not to min_rate.
    decrease_interval: float = 0.5
    quiet_period: float = 30.0  # a scope with no 429 for this long goes dormant again
    # A scope reacts only when, over the last second, at least min_429s of its requests (and
    # at least min_429_share of them) were rate limited: a stray 429 is noise that retries
    # handle, while a limit really reached answers many at once.
    min_429s: int = 2
    min_429_share: float = 0.05
    # Optional static ceilings for users who know their account's limits (off: None).
    global_rate: float | None = None
    global_burst: float | None = None  # None: one second of global_rate
    endpoint_rate: float | None = None
    endpoint_burst: float | None = None  # None: one second of endpoint_rate
    # Fleet: a redis:// URL where every sidecar of the account shares the adaptive state
    # (proxy.sharedlimit), and how often each one syncs with it (seconds). None: alone.
    shared: str | None = None
    shared_interval: float = 0.25


@dataclass(frozen=True, slots=True)
class SharedState:
    """A scope's cubic as the fleet shares it, on this sidecar's clock, and this one's weight.

    ``w_max``, ``k`` and ``start`` are the fleet's cubic (fleet units: requests/s of every
    sidecar together); ``weight`` is this sidecar's fraction of it, in (0, 1].
    """

    w_max: float
    k: float
    start: float
    hold_until: float
    last_throttle: float
    weight: float


_GLOBAL_REASONS = frozenset({"global-rate", "global-concurrency"})
_CONCURRENCY_REASONS = frozenset({"global-concurrency", "endpoint-concurrency"})


class _Cubic:
    """A CUBIC window: cut to ``beta * base`` at a throttle, then ``C*(t-K)^3 + base``."""

    __slots__ = ("active", "fresh", "fresh_since", "hold_until", "k", "last_throttle", "start",
                 "w_max")

    def __init__(self) -> None:
        self.active = False
        # 429s counted since the hold ended, within about a second: those alone can cut again.
        self.fresh = 0
        self.fresh_since = -_INF
        self.w_max = 0.0
        self.k = 0.0
        self.start = 0.0
        self.hold_until = -_INF
        self.last_throttle = -_INF

    def value(self, now: float, c: float) -> float:
        d = now - self.start - self.k
        return c * d * d * d + self.w_max

    def count(self, now: float) -> int:
        """Count a 429 that may move this window; how many such 429s came lately."""
        if now < self.hold_until:
            return 0
        if now - self.fresh_since > _SLICES * _SLICE:
            self.fresh = 0
            self.fresh_since = now
        self.fresh += 1
        return self.fresh

    def cut(self, base: float, now: float, beta: float, c: float) -> None:
        self.fresh = 0
        self.w_max = base
        self.k = (base * (1.0 - beta) / c) ** (1.0 / 3.0)
        self.start = now
        self.active = True

    def snapshot(self) -> dict[str, float]:
        return {"w_max": self.w_max, "k": self.k, "since": self.start}


class _Scope:
    """One scope's meter, token bucket and in-flight bound."""

    __slots__ = (
        "bound",
        "burst",
        "ceiling",
        "ceiling_burst",
        "concurrency",
        "edge",
        "first",
        "idx",
        "in_flight",
        "last",
        "limited",
        "limiting",
        "pending",
        "rate",
        "rate_cubic",
        "refused",
        "sent",
        "tokens",
        "weight",
    )

    def __init__(self, now: float, ceiling: float | None, ceiling_burst: float | None) -> None:
        sl = int(now // _SLICE)
        self.sent = [0] * _SLICES
        self.limited = [0] * _SLICES
        self.refused = [0] * _SLICES  # reservations refused (would wait over max_wait)
        self.weight = 1.0  # this sidecar's fraction of a fleet-shared rate (1: not shared)
        self.idx = sl % _SLICES
        self.edge = (sl + 1) * _SLICE
        self.first = now
        # Send times of reservations still waiting: counted as sent when they go, so the
        # meter sees what Stripe saw, not what the app asked for.
        self.pending: deque[float] = deque()
        self.rate_cubic = _Cubic()
        self.concurrency = _Cubic()
        self.in_flight = 0
        self.bound = _INF
        self.ceiling = ceiling
        self.ceiling_burst = (
            max(1.0, ceiling if ceiling_burst is None else ceiling_burst)
            if ceiling is not None
            else 1.0
        )
        self.limiting = ceiling is not None
        self.rate = ceiling if ceiling is not None else _INF
        self.burst = self.ceiling_burst
        self.tokens = self.burst
        self.last = now

    def advance(self, now: float) -> None:
        """Move the meter to the slice holding ``now``, zeroing the slices passed."""
        sl = int(now // _SLICE)
        steps = sl - int(self.edge // _SLICE) + 1
        for k in range(1, min(steps, _SLICES) + 1):
            i = (self.idx + k) % _SLICES
            self.sent[i] = 0
            self.limited[i] = 0
            self.refused[i] = 0
        self.idx = sl % _SLICES
        self.edge = (sl + 1) * _SLICE

    def catch_up(self, now: float) -> None:
        """Advance the meter to ``now`` and count the reservations that have gone by then."""
        if now >= self.edge:
            self.advance(now)
        pending = self.pending
        while pending and pending[0] <= now:
            pending.popleft()
            self.sent[self.idx] += 1

    def demand(self, now: float) -> float:
        """Requests/s the app asked of this scope over the last second (sent, queued, refused)."""
        self.catch_up(now)
        asked = sum(self.sent) + len(self.pending) + sum(self.refused)
        span = min(_SLICES * _SLICE, now - self.first)
        return asked / (span if span > _SLICE else _SLICE)

    def share_limited(self) -> float:
        """Share of the last second's requests that were rate limited (``catch_up`` first)."""
        sent = sum(self.sent)
        return sum(self.limited) / sent if sent > 0 else 1.0

    def accepted_rate(self, now: float) -> float:
        """Requests/s Stripe accepted (sent minus rate limited) over the last second.

        Counted from one slice before the first 429 in that second: from then on Stripe's
        bucket was empty, so what it accepted is its rate, not a burst it had saved up while
        we sent less (which would make the estimate, and the next cut, too high).
        """
        self.catch_up(now)
        order = [(self.idx + 1 + k) % _SLICES for k in range(_SLICES)]  # oldest first
        first = next((k for k, i in enumerate(order) if self.limited[i]), 0)
        first = max(0, first - 1)
        kept = order[first:]
        span = (_SLICES - 1 - first) * _SLICE + (now - (self.edge - _SLICE))
        span = min(span, now - self.first)
        if span < _SLICE:
            span = _SLICE  # a handful of requests in a few ms is not a rate of thousands
        accepted = sum(self.sent[i] for i in kept) - sum(self.limited[i] for i in kept)
        return max(0.0, accepted) / span


class RateLimiter:
    """Per-scope adaptive limits: the account (``"global"``) and each operation."""

    __slots__ = (
        "_beta",
        "_c",
        "_clock",
        "_enabled",
        "_global",
        "_max_wait",
        "_scopes",
        "on_throttle",
        "settings",
    )

    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float]) -> None:
        for name in ("global_rate", "endpoint_rate"):
            value = getattr(settings, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("global_burst", "endpoint_burst"):
            value = getattr(settings, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < settings.decrease_factor < 1 or settings.scale_constant <= 0:
            raise ValueError("decrease_factor must be in (0, 1) and scale_constant positive")
        self.settings = settings
        self._clock = clock
        self._enabled = settings.enabled
        self._max_wait = settings.max_wait
        self._beta = settings.decrease_factor
        self._c = settings.scale_constant
        self._global = _Scope(clock(), settings.global_rate, settings.global_burst)
        self._scopes: dict[str, _Scope] = {}
        # Told of every cut of a scope's rate: (scope, the rate Stripe accepted from this
        # sidecar just before, requests/s). A fleet reports it to the shared state.
        self.on_throttle: Callable[[str, float], None] | None = None

    def _scope(self, endpoint: str, now: float) -> _Scope:
        found = self._scopes.get(endpoint)
        if found is None:
            s = self.settings
            found = self._scopes[endpoint] = _Scope(now, s.endpoint_rate, s.endpoint_burst)
        return found

    def set_endpoint_limit(self, endpoint: str, rate: float, burst: float | None = None) -> None:
        """Give ``endpoint`` its own ceiling (e.g. Stripe's 20/s for Files and Search)."""
        if rate <= 0 or (burst is not None and burst < 1):
            raise ValueError("an endpoint's rate must be positive and its burst at least 1")
        now = self._clock()
        self._scopes[endpoint] = _Scope(now, rate, burst)

    # -- rate ------------------------------------------------------------------------------
    def reserve(self, endpoint: str, waiting_anyway: float = 0.0) -> float | None:
        """Count one request to ``endpoint``; return the seconds it must wait before sending.

        0.0 means go now (always, while both its scopes are dormant and have no ceiling).
        None means the wait would exceed ``max_wait`` beyond ``waiting_anyway`` (a retry's
        backoff, which it waits in any case): nothing is taken and the request is not counted
        as sent. A positive wait is a reservation: the caller waits, then sends without asking
        again; later callers queue behind it.
        """
        if not self._enabled:
            return 0.0
        now = self._clock()
        g = self._global
        e = self._scopes.get(endpoint) or self._scope(endpoint, now)
        if not g.limiting and not e.limiting:  # counted as try_enter counts it, inline
            if now >= g.edge:
                g.advance(now)
            g.sent[g.idx] += 1
            if now >= e.edge:
                e.advance(now)
            e.sent[e.idx] += 1
            return 0.0
        return self._reserve_limited(g, e, now, waiting_anyway)

    def try_enter(self, endpoint: str, now: float | None = None) -> bool:
        """:meth:`reserve` then :meth:`acquire` in one call, while nothing limits ``endpoint``.

        True: counted as sent and in flight (give it back with :meth:`release`). False: nothing
        was taken, as a scope limits its rate or its in-flight count; use the two calls then.
        The dormant case, every request's path until Stripe throttles, pays one call. ``now``:
        the clock's time if the caller has just read it (one read fewer).
        """
        if not self._enabled:
            return True
        g = self._global
        e = self._scopes.get(endpoint)
        if (
            e is None
            or g.limiting
            or e.limiting
            or g.concurrency.active
            or e.concurrency.active
        ):
            return False
        if now is None:
            now = self._clock()
        if now >= g.edge:
            g.advance(now)
        g.sent[g.idx] += 1
        if now >= e.edge:
            e.advance(now)
        e.sent[e.idx] += 1
        g.in_flight += 1
        e.in_flight += 1
        return True

    def peek(self, endpoint: str) -> float:
        """Seconds until ``endpoint`` could send, without taking or counting anything."""
        if not self._enabled:
            return 0.0
        g = self._global
        e = self._scopes.get(endpoint)
        if not g.limiting and (e is None or not e.limiting):
            return 0.0
        return self._wait(g, e, self._clock())

    def _wait(self, g: _Scope, e: _Scope | None, now: float) -> float:
        """Seconds until every limiting scope has a token (after bringing them up to now)."""
        wait = 0.0
        for s in (g, e):
            if s is None:
                continue
            s.catch_up(now)
            if s.limiting:
                self._sync(s, now)
            if s.limiting and s.tokens < 1.0:
                w = (1.0 - s.tokens) / s.rate
                if w > wait:
                    wait = w
        return wait

    def _reserve_limited(
        self, g: _Scope, e: _Scope, now: float, waiting_anyway: float
    ) -> float | None:
        wait = self._wait(g, e, now)
        if wait > self._max_wait + waiting_anyway:
            g.refused[g.idx] += 1
            e.refused[e.idx] += 1
            return None
        for s in (g, e):
            if s.limiting:
                s.tokens -= 1.0
            if wait > 0.0:
                s.pending.append(now + wait)
            else:
                s.sent[s.idx] += 1
        return wait

    def _sync(self, s: _Scope, now: float) -> None:
        """Refill ``s`` up to ``now``, then move its rate along the cubic (or back to dormant)."""
        elapsed = now - s.last
        if elapsed > 0.0:
            tokens = s.tokens + elapsed * s.rate
            s.tokens = tokens if tokens < s.burst else s.burst
            s.last = now
        cubic = s.rate_cubic
        if not cubic.active:
            return
        if now - cubic.last_throttle >= self.settings.quiet_period:
            cubic.active = False
            s.weight = 1.0
            s.limiting = s.ceiling is not None
            s.rate = s.ceiling if s.ceiling is not None else _INF
            s.burst = s.ceiling_burst
            if s.tokens > s.burst:  # a ceiling's own burst applies again at once
                s.tokens = s.burst
            return
        self._set_rate(s, cubic.value(now, self._c) * s.weight)

    def _set_rate(self, s: _Scope, rate: float) -> None:
        floor = self.settings.min_rate
        if rate < floor:
            rate = floor
        if s.ceiling is not None and rate > s.ceiling:
            rate = s.ceiling
        s.rate = rate
        burst = rate * _BURST_SECONDS
        s.burst = burst if burst > 1.0 else 1.0
        if s.tokens > s.burst:
            s.tokens = s.burst

    def _throttle_rate(self, s: _Scope, now: float) -> float | None:
        """Cut ``s``'s rate; the rate Stripe accepted just before, or None (held: no cut)."""
        cubic = s.rate_cubic
        cubic.last_throttle = now
        if now < cubic.hold_until:
            return None
        accepted = base = s.accepted_rate(now)
        paced = s.rate  # the rate the queued requests were scheduled at
        if s.limiting:
            self._sync(s, now)
            if s.rate < base:  # the adaptive rate, or a ceiling below what was measured
                base = s.rate
        else:
            s.tokens = 0.0  # nothing goes out faster than the learned rate right after a 429
            s.last = now
        if base < self.settings.min_rate:
            base = self.settings.min_rate
        # Requests already scheduled (negative tokens) keep their schedule: the debt is kept in
        # seconds, so new ones queue right behind them at the new rate, with no gap. Their 429s
        # say nothing about the new rate: no further cut until they have gone.
        debt = -s.tokens / paced if s.tokens < 0.0 and s.limiting else 0.0
        cubic.cut(base / s.weight, now, self._beta, self._c)  # the cubic is in fleet units
        s.limiting = True
        self._set_rate(s, base * self._beta)
        if debt:
            s.tokens = -debt * s.rate
        cubic.hold_until = now + max(self.settings.decrease_interval, debt)
        return accepted

    # -- concurrency -----------------------------------------------------------------------
    def acquire(self, endpoint: str) -> bool:
        """Count one request to ``endpoint`` as in flight; False (nothing taken) if bounded."""
        if not self._enabled:
            return True
        g = self._global
        e = self._scopes.get(endpoint) or self._scope(endpoint, self._clock())
        if g.concurrency.active or e.concurrency.active:
            now = self._clock()
            for s in (g, e):
                self._sync_bound(s, now)
                if s.in_flight + 1 > s.bound:
                    return False
        g.in_flight += 1
        e.in_flight += 1
        return True

    def release(self, endpoint: str) -> None:
        """A request counted by :meth:`acquire` has its answer."""
        if not self._enabled:
            return
        self._global.in_flight -= 1
        e = self._scopes.get(endpoint)
        if e is not None:
            e.in_flight -= 1

    def _sync_bound(self, s: _Scope, now: float) -> None:
        cubic = s.concurrency
        if not cubic.active:
            return
        if now - cubic.last_throttle >= self.settings.quiet_period:
            cubic.active = False
            s.bound = _INF
            return
        bound = cubic.value(now, self._c)
        s.bound = bound if bound > 1.0 else 1.0

    def _throttle_concurrency(self, s: _Scope, now: float) -> None:
        cubic = s.concurrency
        cubic.last_throttle = now
        if now < cubic.hold_until:
            return
        base = float(max(1, s.in_flight))
        if cubic.active:
            self._sync_bound(s, now)
            base = min(base, s.bound)
        cubic.cut(base, now, self._beta, self._c)  # the bound follows in _sync_bound
        cubic.hold_until = now + self.settings.decrease_interval

    # -- Stripe's answers ------------------------------------------------------------------
    def on_rate_limited(
        self, endpoint: str, reason: str | None, sent_at: float | None = None
    ) -> None:
        """Activate (or cut again) the scope a 429's ``Stripe-Rate-Limited-Reason`` names.

        ``global-*`` names the account, ``endpoint-*`` (and any reason not known yet) the
        ``endpoint``; ``*-concurrency`` adapts the in-flight bound, the others the rate. None
        (a lock timeout) and ``resource-specific`` (one object's limit) change nothing.
        ``sent_at`` is when the limited request went out (default: now): a 429 for a request
        sent before the scope's last rate cut says nothing about the new rate (a slow round
        trip, not the rate, made it arrive after the cut), so it cuts nothing.
        """
        if reason is None or not self._enabled:
            return
        reason = reason.strip().lower()
        if not reason or reason == "resource-specific":
            return
        now = self._clock()
        s = self._global if reason in _GLOBAL_REASONS else self._scope(endpoint, now)
        s.catch_up(now)
        s.limited[s.idx] += 1
        concurrency = reason in _CONCURRENCY_REASONS
        cubic = s.concurrency if concurrency else s.rate_cubic
        if not concurrency and sent_at is not None and cubic.active and sent_at < cubic.start:
            cubic.last_throttle = now  # still throttled: the scope stays active
            return
        st = self.settings
        if cubic.count(now) < st.min_429s or s.share_limited() < st.min_429_share:
            return  # noise, or an answer to a request scheduled before the last cut
        if concurrency:
            self._throttle_concurrency(s, now)
            return
        accepted = self._throttle_rate(s, now)
        if accepted is not None and self.on_throttle is not None:
            self.on_throttle(GLOBAL_SCOPE if s is self._global else endpoint, accepted)

    # -- a fleet's shared state ------------------------------------------------------------
    def apply_shared(self, scope: str, shared: SharedState) -> None:
        """Take the fleet's cubic for ``scope`` (the account or an operation) and this weight.

        The scope limits from now on at ``weight`` times the fleet's rate; it still goes
        dormant once ``quiet_period`` passes with no 429 anywhere in the fleet.
        """
        if not self._enabled:
            return
        now = self._clock()
        s = self._global if scope == GLOBAL_SCOPE else self._scope(scope, now)
        paced = 0.0
        if s.limiting:
            self._sync(s, now)  # refill at the old rate up to now
            paced = s.rate
        else:
            s.last = now
        cubic = s.rate_cubic
        cubic.w_max, cubic.k, cubic.start = shared.w_max, shared.k, shared.start
        cubic.active = True
        cubic.hold_until = max(cubic.hold_until, shared.hold_until)
        cubic.last_throttle = max(cubic.last_throttle, shared.last_throttle)
        s.weight = shared.weight
        s.limiting = True
        self._sync(s, now)
        if s.tokens < 0.0 and paced:
            # Requests already scheduled keep their schedule: the debt is kept in seconds.
            s.tokens = s.tokens / paced * s.rate

    def accepted(self, scope: str) -> float:
        """Requests/s Stripe accepted from this sidecar in ``scope`` over the last second."""
        now = self._clock()
        s = self._global if scope == GLOBAL_SCOPE else self._scopes.get(scope)
        return s.accepted_rate(now) if s is not None else 0.0

    def weight(self, scope: str) -> float:
        """This sidecar's fraction of the fleet's rate in ``scope`` (1 when not shared)."""
        s = self._global if scope == GLOBAL_SCOPE else self._scopes.get(scope)
        return s.weight if s is not None else 1.0

    def demand(self, scope: str) -> float:
        """Requests/s the app asked of ``scope`` over the last second (refused ones too)."""
        now = self._clock()
        s = self._global if scope == GLOBAL_SCOPE else self._scopes.get(scope)
        return s.demand(now) if s is not None else 0.0

    def adaptive_scopes(self) -> list[str]:
        """The scopes whose rate adapts to 429s now (the ones a fleet shares)."""
        now = self._clock()
        out = []
        for name, s in self._all():
            if s.rate_cubic.active:
                self._sync(s, now)
                if s.rate_cubic.active:
                    out.append(name)
        return out

    # -- reporting -------------------------------------------------------------------------
    def _all(self) -> list[tuple[str, _Scope]]:
        return [(GLOBAL_SCOPE, self._global), *self._scopes.items()]

    def rates(self) -> dict[str, float]:
        """Current rate (requests/s) of every scope that limits now (active or with a ceiling)."""
        now = self._clock()
        out = {}
        for name, s in self._all():
            if s.limiting:
                self._sync(s, now)
            if s.limiting:
                out[name] = s.rate
        return out

    def state(self) -> dict[str, dict[str, Any]]:
        """Every non-dormant scope: its mode, rate, in-flight bound and cubic parameters."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for name, s in self._all():
            if s.limiting:
                self._sync(s, now)
            self._sync_bound(s, now)
            if not (s.limiting or s.concurrency.active):
                continue
            entry: dict[str, Any] = {"adaptive": s.rate_cubic.active, "ceiling": s.ceiling}
            if s.weight != 1.0:
                entry["fleet_weight"] = round(s.weight, 4)
            if s.limiting:
                entry["rate"] = round(s.rate, 3)
                entry["tokens"] = round(s.tokens, 3)
            if s.rate_cubic.active:
                entry["rate_cubic"] = s.rate_cubic.snapshot()
            if s.concurrency.active:
                entry["max_in_flight"] = round(s.bound, 3)
                entry["concurrency_cubic"] = s.concurrency.snapshot()
            out[name] = entry
        return out


async def wait_for_slot(
    limiter: RateLimiter, endpoint: str, sleep: Callable[[float], Awaitable[None]]
) -> bool:
    """Wait up to ``max_wait`` for an in-flight slot under an adaptive concurrency bound.

    Polls (a fixed number of times, so an injected sleep that returns at once cannot spin):
    the bound is active only after Stripe answered ``*-concurrency``, so this path is rare.
    """
    step = limiter.settings.max_wait / _SLOT_POLLS
    for _ in range(_SLOT_POLLS):
        await sleep(step)
        if limiter.acquire(endpoint):
            return True
    return False
