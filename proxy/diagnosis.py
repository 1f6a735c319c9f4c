"""The diagnosis engine: names what is wrong with the Stripe integration, from outcome records.

Three parts, each with one job:

- :class:`DiagnosisRecorder` is an observer of outcome records (``proxy.records``). Recording is
  O(1): a few integer increments into the operation's per-second window (``SecondBuckets``), a
  latency histogram bucket, and for failures a Request-Id into a bounded ring.
- ``proxy.rules`` holds the pure rules that turn a window :class:`~proxy.rules.Snapshot` into a
  finding per kind.
- :class:`DiagnosisEngine` evaluates the rules on a timer (the app calls :meth:`evaluate` once a
  ``diagnosis.interval``), applies hysteresis (raise after a condition held ``raise_after``
  seconds, clear after it was gone ``clear_after`` seconds), keeps the active and recent
  diagnoses and the healing actions, and tells subscribers about each raise and clear.

Nothing here does I/O or reads a clock it was not given; logging, metrics, the
``Sidecar-Diagnosis`` header and notifications subscribe to the engine (``proxy.app``).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from proxy.records import AttemptRecord, RequestRecord
from proxy.rules import (
    KINDS,
    LATENCY_BOUNDS,
    Check,
    Counts,
    DiagnosisSettings,
    Severity,
    Snapshot,
    StoreStatus,
    evaluate,
    quantile,
)
from proxy.window import SecondBuckets

__all__ = [
    "KINDS",
    "Diagnosis",
    "DiagnosisEngine",
    "DiagnosisEvent",
    "DiagnosisRecorder",
    "DiagnosisSettings",
    "HealingAction",
    "StoreStatus",
    "iso",
    "redact_url",
]

# Series of an operation's window, in order. Each attempt is counted once, in one series: a
# success by its latency bucket alone, "ok" holds the other answers that are no failure
# (card_declined), "other" the attempts of no category; each request is either "requests_ok" or
# "requests_bad". The totals (attempts, ok, requests) are summed when read: one count per record.
_SERIES = ("ok", "outage", "network", "auth", "perm", "rate", "lock", "bad", "idem", "other",
           "requests_bad", "requests_ok")  # fmt: skip
_OK, _OUTAGE, _NETWORK, _AUTH, _PERM, _RATE, _LOCK, _BAD, _IDEM, _OTHER, _REQ_BAD, _REQ_OK = range(
    len(_SERIES)
)
_COUNTED = ("outage", "network", "auth", "perm", "rate", "lock", "bad", "idem")  # as they are
_LAT0 = len(_SERIES)  # then one series per latency bucket
_CATEGORY_NAME = {
    _OUTAGE: "outage",
    _NETWORK: "network",
    _AUTH: "auth",
    _PERM: "auth",
    _RATE: "rate",
    _LOCK: "rate",
    _BAD: "bad",
    _IDEM: "idem",
}
# Outcome value -> series (connection errors are sorted by their transport below).
_BY_OUTCOME = {
    "card_declined": _OK,
    "authentication": _AUTH,
    "permission": _PERM,
    "idempotency_mismatch": _IDEM,
    "lock_timeout": _LOCK,
    "rate_limited": _RATE,
    "server_error": _OUTAGE,
    "gateway_error": _OUTAGE,
    "timeout": _OUTAGE,
}
_STEPS = ("dns", "connect", "tls")
_REASONS = ("global-rate", "global-concurrency", "endpoint-rate", "endpoint-concurrency",
            "resource-specific", "other")  # fmt: skip
_MAX_OPERATIONS = 512  # operation names are already bounded by the router; this is a backstop
_MAX_TEXT = 64  # error codes and params longer than this are cut (they come from upstream)


def iso(wall: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC (None stays None)."""
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def redact_url(url: str) -> str:
    """``url`` with any user name and password removed (``redis://:pw@host:6379/0`` -> host)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class _OpWindow:
    """One operation's window, and its recent 400 error codes."""

    __slots__ = ("buckets", "codes")

    def __init__(self, window: float, now: float) -> None:
        self.buckets = SecondBuckets(window, _LAT0 + len(LATENCY_BOUNDS) + 1, now)
        self.codes: deque[tuple[float, str, str]] = deque(maxlen=64)  # (at, code, param), latest


class DiagnosisRecorder:
    """Counts outcome records into per-operation and host-wide windows; cheap and O(1)."""

    __slots__ = ("_auth_codes", "_clock", "_examples", "_host", "_ops", "window")

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self.window = window
        self._clock = clock
        self._ops: dict[str, _OpWindow] = {}
        # Host-wide: network failures by step, then rate-limit 429s by reason.
        self._host = SecondBuckets(window, len(_STEPS) + len(_REASONS), clock())
        self._examples: dict[str, deque[tuple[float, str]]] = {
            name: deque(maxlen=5) for name in _CATEGORY_NAME.values()
        }
        self._auth_codes: deque[tuple[float, str]] = deque(maxlen=32)

    def _op(self, name: str, now: float) -> _OpWindow:
        op = self._ops.get(name)
        if op is None:
            if len(self._ops) >= _MAX_OPERATIONS:
                name = "other"
                op = self._ops.get(name)
            if op is None:
                op = self._ops[name] = _OpWindow(self.window, now)
        return op

    # -- Observer ---------------------------------------------------------------------------------
    def attempt(self, record: AttemptRecord, _bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        """Count one send to Stripe."""
        now = self._clock()
        op = self._ops.get(record.operation) or self._op(record.operation, now)
        b = op.buckets
        if now >= b.edge:
            b.advance(now)
        if record.outcome == "success":  # an attempt, ok, and its latency: one count
            b.rings[_LAT0 + bisect_left(_bounds, record.duration)][b.idx] += 1
            return
        self._failure(op, record, now)

    def _failure(self, op: _OpWindow, record: AttemptRecord, now: float) -> None:
        rings, i = op.buckets.rings, op.buckets.idx
        outcome = record.outcome
        series = _BY_OUTCOME.get(outcome)
        if outcome == "connection_error":
            series = _NETWORK if record.transport == "connect" else _OUTAGE
        elif outcome == "validation" and record.status == 400:
            series = _BAD
            code = (record.error_code or "")[:_MAX_TEXT]
            op.codes.append((now, code, (record.error_param or "")[:_MAX_TEXT]))
        if series is None:
            rings[_OTHER][i] += 1
            return
        rings[series][i] += 1
        if series == _OK:
            return
        host = self._host
        if now >= host.edge:
            host.advance(now)
        if series == _NETWORK:
            step = record.transport_step
            host.rings[_STEPS.index(step) if step in _STEPS else 1][host.idx] += 1
        elif series == _RATE:
            reason = record.rate_limited_reason
            k = _REASONS.index(reason) if reason in _REASONS else len(_REASONS) - 1
            host.rings[len(_STEPS) + k][host.idx] += 1
        elif series == _AUTH:
            self._auth_codes.append((now, (record.error_code or "invalid_api_key")[:_MAX_TEXT]))
        if record.request_id is not None:
            self._examples[_CATEGORY_NAME[series]].append((now, record.request_id))

    def request(self, record: RequestRecord) -> None:
        """Count one answered client request.

        A request that reached Stripe is counted in the second its last attempt was (that
        attempt's record has just moved the window on): one clock read per request saved.
        """
        op = self._ops.get(record.operation)
        if op is None or not record.attempts:
            now = self._clock()
            op = op or self._op(record.operation, now)
            if now >= op.buckets.edge:
                op.buckets.advance(now)
        b = op.buckets
        status = record.status
        b.rings[_REQ_OK if status < 400 or status == 402 else _REQ_BAD][b.idx] += 1

    # -- reading --------------------------------------------------------------------------------
    def snapshot(self, *, idle: bool = False) -> Snapshot:
        """Sum every window up to now (once per evaluation, not per request).

        Operations without traffic in the window are left out unless ``idle``.
        """
        now = self._clock()
        since = now - self.window
        ops: dict[str, Counts] = {}
        for name, op in self._ops.items():
            b = op.buckets
            if now >= b.edge:
                b.advance(now)
            sums = [sum(ring) for ring in b.rings]
            latency = sums[_LAT0:]
            successes = sum(latency)
            c = Counts()
            c.attempts = sum(sums[:_REQ_BAD]) + successes
            c.requests_ok = sums[_REQ_OK]
            c.requests = sums[_REQ_BAD] + c.requests_ok
            if not c.attempts and not c.requests and not idle:
                continue
            c.ok = sums[_OK] + successes
            for attr in _COUNTED:
                setattr(c, attr, sums[_SERIES.index(attr)])
            c.latency = latency
            c.bad_codes = Counter((code, param) for at, code, param in op.codes if at >= since)
            ops[name] = c
        host = self._host
        if now >= host.edge:
            host.advance(now)
        sums = [sum(ring) for ring in host.rings]
        snap = Snapshot(self.window, ops)
        snap.steps = Counter({s: n for s, n in zip(_STEPS, sums, strict=False) if n})
        rates = sums[len(_STEPS) :]
        snap.reasons = Counter({r: n for r, n in zip(_REASONS, rates, strict=True) if n})
        snap.auth_codes = Counter(code for at, code in self._auth_codes if at >= since)
        snap.examples = {
            name: [rid for at, rid in reversed(ring) if at >= since]
            for name, ring in self._examples.items()
        }
        return snap

    def history(self, name: str) -> dict[str, list[Any]]:
        """Per-second requests, successes and p99 (ms) of one operation, oldest first."""
        op = self._ops.get(name)
        if op is None:
            return {"requests": [], "ok": [], "p99_ms": []}
        b = op.buckets
        now = self._clock()
        if now >= b.edge:
            b.advance(now)
        n = len(b.rings[0])
        order = [(b.idx + 1 + k) % n for k in range(n)]
        lat = b.rings[_LAT0:]
        p99 = []
        for i in order:
            q = quantile([ring[i] for ring in lat], 0.99)
            p99.append(None if q is None else round(q * 1000, 1))
        return {
            "requests": [b.rings[_REQ_OK][i] + b.rings[_REQ_BAD][i] for i in order],
            "ok": [b.rings[_REQ_OK][i] for i in order],
            "p99_ms": p99,
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """One named problem: what, how bad, in plain words, the evidence, and what to do."""

    kind: str
    severity: Severity
    summary: str
    evidence: Mapping[str, Any]
    action: str
    raised_at: float  # wall clock, seconds since the epoch
    cleared_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form served by /diagnosis (times as ISO 8601 UTC)."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "summary": self.summary,
            "evidence": dict(self.evidence),
            "action": self.action,
            "raised_at": iso(self.raised_at),
            "cleared_at": iso(self.cleared_at),
        }


class DiagnosisEvent(NamedTuple):
    """A diagnosis was raised or cleared."""

    type: Literal["raised", "cleared"]
    diagnosis: Diagnosis


@dataclass(frozen=True, slots=True)
class HealingAction:
    """Something the sidecar did (or undid) about a diagnosis."""

    kind: str  # e.g. "key_failover", "pool_reset", "concurrency_tightened"
    diagnosis: str  # the diagnosis kind that caused it
    reason: str  # one plain sentence
    result: str  # "ok", "failed", "skipped", "undone"
    at: float  # wall clock
    before: str | None = None
    after: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form served by /diagnosis."""
        return {
            "kind": self.kind,
            "diagnosis": self.diagnosis,
            "reason": self.reason,
            "result": self.result,
            "at": iso(self.at),
            "before": self.before,
            "after": self.after,
        }


class _Track:
    """Hysteresis for one kind: since when its condition held, since when it was gone."""

    __slots__ = ("gone_since", "held_since")

    def __init__(self) -> None:
        self.held_since: float | None = None
        self.gone_since: float | None = None


def hysteresis(
    track: _Track, holds: bool | None, active: bool, now: float, settings: DiagnosisSettings
) -> Literal["raise", "clear"] | None:
    """Move one kind's hysteresis on by one evaluation; say whether to raise or clear it.

    ``holds`` None (cannot tell) neither confirms nor clears: an outage behind open breakers
    sends few calls, and must not clear for want of evidence.
    """
    if holds is True:
        track.gone_since = None
        if track.held_since is None:
            track.held_since = now
        if not active and now - track.held_since >= settings.raise_after:
            return "raise"
    elif holds is False:
        track.held_since = None
        if active:
            if track.gone_since is None:
                track.gone_since = now
            if now - track.gone_since >= settings.clear_after:
                track.gone_since = None
                return "clear"
    else:
        track.held_since = None if not active else track.held_since
    return None


class DiagnosisEngine:
    """Evaluates the rules, raises and clears diagnoses with hysteresis, tells subscribers."""

    def __init__(
        self,
        settings: DiagnosisSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall = wall
        self.recorder = DiagnosisRecorder(settings.window, clock)
        self.active: dict[str, Diagnosis] = {}
        self.recent: deque[Diagnosis] = deque(maxlen=settings.recent)
        self.actions: deque[HealingAction] = deque(maxlen=settings.recent)
        self._tracks = {kind: _Track() for kind in KINDS}
        self._baselines: dict[str, float] = {}
        self._last_eval: float | None = None
        self._subscribers: list[Callable[[DiagnosisEvent], None]] = []
        self._action_subscribers: list[Callable[[HealingAction], None]] = []
        self._stores: dict[str, StoreStatus] = {}

    # -- subscriptions --------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[DiagnosisEvent], None]) -> Callable[[], None]:
        """Call ``callback`` on every raise and clear (quick, on the event loop); returns undo."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def subscribe_actions(self, callback: Callable[[HealingAction], None]) -> Callable[[], None]:
        """Call ``callback`` on every recorded healing action; returns undo."""
        self._action_subscribers.append(callback)
        return lambda: self._action_subscribers.remove(callback)

    def record_action(
        self,
        kind: str,
        diagnosis: str,
        reason: str,
        result: str,
        *,
        before: str | None = None,
        after: str | None = None,
    ) -> HealingAction:
        """Record a healing action (shown on /diagnosis, counted, logged by subscribers)."""
        action = HealingAction(kind, diagnosis, reason, result, self._wall(), before, after)
        self.actions.append(action)
        for callback in tuple(self._action_subscribers):
            callback(action)
        return action

    def raise_now(self, kind: str, check: Check) -> DiagnosisEvent | None:
        """Raise ``kind`` at once, as an action saw it happen (a failover after one 401).

        No hysteresis on the way up: the action is the evidence. It clears like any other,
        once its rule finds the condition gone for ``clear_after``. None if already active.
        """
        if kind in self.active:
            return None
        track = self._tracks[kind]
        track.held_since, track.gone_since = self._clock(), None
        raised = Diagnosis(
            kind, check.severity, check.summary, check.evidence, check.action, self._wall()
        )
        self.active[kind] = raised
        self.recent.appendleft(raised)
        event = DiagnosisEvent("raised", raised)
        for callback in tuple(self._subscribers):
            callback(event)
        return event

    def report_store(
        self,
        name: str,
        url: str,
        error: str | None,
        *,
        effect: str = "",
        severity: Severity = "warning",
    ) -> None:
        """Say whether the store ``name`` (``outbox.store``, ``ratelimit.shared``) answers.

        ``error`` None: it answers. Otherwise ``store_unreachable`` is raised once the failure
        has lasted ``raise_after`` (and cleared ``clear_after`` after the store answers again);
        ``effect`` says what the sidecar does meanwhile. The URL is shown without a password.
        """
        if error is None:
            self._stores.pop(name, None)
            return
        known = self._stores.get(name)
        since = known.since if known is not None else self._wall()
        self._stores[name] = StoreStatus(redact_url(url), error, since, effect, severity)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> list[DiagnosisEvent]:
        """Run every rule on the window as of now; raise and clear; return (and publish) events."""
        now = self._clock()
        snapshot = self.recorder.snapshot()
        snapshot.baselines = self._baselines
        snapshot.stores = dict(self._stores)
        checks = evaluate(snapshot, self.settings)
        events: list[DiagnosisEvent] = []
        for kind, check in checks.items():
            event = self._apply(kind, check, now)
            if event is not None:
                events.append(event)
        self._learn_baselines(snapshot, now)
        for event in events:
            for callback in tuple(self._subscribers):
                callback(event)
        return events

    def _apply(self, kind: str, check: Check, now: float) -> DiagnosisEvent | None:
        current = self.active.get(kind)
        track = self._tracks[kind]
        verdict = hysteresis(track, check.holds, current is not None, now, self.settings)
        if verdict == "raise":
            raised = Diagnosis(
                kind, check.severity, check.summary, check.evidence, check.action, self._wall()
            )
            self.active[kind] = raised
            self.recent.appendleft(raised)
            return DiagnosisEvent("raised", raised)
        if verdict == "clear" and current is not None:
            del self.active[kind]
            cleared = replace(current, cleared_at=self._wall())
            self.recent.appendleft(cleared)
            return DiagnosisEvent("cleared", cleared)
        if current is not None and check.holds:
            # Still active: keep the evidence current (same raised_at, so no new event).
            self.active[kind] = replace(
                current,
                severity=check.severity,
                summary=check.summary,
                evidence=check.evidence,
                action=check.action,
            )
        return None

    def _learn_baselines(self, snapshot: Snapshot, now: float) -> None:
        """Move each operation's usual share of 400s towards the current one (not mid-spike)."""
        elapsed = 0.0 if self._last_eval is None else now - self._last_eval
        self._last_eval = now
        if "client_errors_spike" in self.active or elapsed <= 0:
            return
        half_life = self.settings.client_errors_spike.baseline_half_life
        alpha = 1.0 - math.pow(0.5, elapsed / half_life)
        for op, c in snapshot.ops.items():
            if c.attempts:
                usual = self._baselines.get(op, 0.0)
                self._baselines[op] = usual + alpha * (c.bad / c.attempts - usual)

    # -- reading --------------------------------------------------------------------------------
    def critical_kinds(self) -> tuple[str, ...]:
        """The kinds of the active critical diagnoses, in the order of ``KINDS``."""
        return tuple(k for k in KINDS if k in self.active and self.active[k].severity == "critical")

    def operations(self, breakers: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per operation over the window: success ratio, p50/p99, breaker state, history."""
        snapshot = self.recorder.snapshot(idle=True)
        out: dict[str, dict[str, Any]] = {}
        for name, c in sorted(snapshot.ops.items()):
            p50, p99 = quantile(c.latency, 0.5), quantile(c.latency, 0.99)
            out[name] = {
                "requests": c.requests,
                "attempts": c.attempts,
                "success_ratio": round(c.requests_ok / c.requests, 4) if c.requests else None,
                "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "breaker": breakers.get(name, "closed"),
                "window_seconds": snapshot.window,
                "history": self.recorder.history(name),
            }
        return out

    def report(self, breakers: Mapping[str, str]) -> dict[str, Any]:
        """The /diagnosis document."""
        return {
            "active": [self.active[k].as_dict() for k in KINDS if k in self.active],
            "recent": [d.as_dict() for d in self.recent],
            "actions": [a.as_dict() for a in reversed(self.actions)],
            "operations": self.operations(breakers),
        }
