"""Diagnosis rules: pure functions from a window of counts to a finding, and their settings.

Each rule reads a :class:`Snapshot` (what the recorder counted over the last ``window`` seconds)
and returns a :class:`Check`: whether its condition ``holds`` (True), is clearly gone (False), or
cannot be told from the traffic seen (None: too few calls, or the breakers are holding calls
back), and when it holds, the plain-words summary, evidence and advice. Raising after a
condition held for a while and clearing after it has been gone for a while is the engine's job
(``proxy.diagnosis``), not the rules'. No I/O, no clock.

Thresholds come in pairs: a condition is raised at its threshold and counts as gone only below
``clear_ratio`` times it, so a level hovering at the threshold cannot flap.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "KINDS",
    "LATENCY_BOUNDS",
    "Check",
    "Counts",
    "DiagnosisSettings",
    "Severity",
    "Snapshot",
    "StoreStatus",
    "evaluate",
    "quantile",
]

Severity = Literal["critical", "warning", "info"]

# The kinds, in the order the page shows them (most urgent first).
KINDS = (
    "stripe_outage",
    "network_failure",
    "store_unreachable",
    "auth_failure",
    "rate_limited",
    "latency_degraded",
    "client_errors_spike",
    "idempotency_misuse",
)

# Upper bounds (seconds) of the latency histogram buckets; one more bucket holds the rest.
LATENCY_BOUNDS = (
    0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 30.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ShareThreshold:
    """Raise when at least ``min_count`` calls failed this way and they are ``ratio`` of all."""

    ratio: float = 0.5
    min_count: int = 10


@dataclass(frozen=True, slots=True)
class OutageThreshold:
    """Stripe failing: a share of server/gateway/timeout failures on several operations."""

    ratio: float = 0.5
    min_count: int = 10
    min_operations: int = 2  # or every operation that had traffic, when fewer had


@dataclass(frozen=True, slots=True)
class CountThreshold:
    """Raise on ``min_count`` occurrences in the window, whatever their share."""

    min_count: int = 3


@dataclass(frozen=True, slots=True)
class LatencyThreshold:
    """Raise when the p99 of successful calls exceeds ``p99`` seconds."""

    p99: float = 4.0
    min_count: int = 20


@dataclass(frozen=True, slots=True)
class ClientErrorThreshold:
    """400s on one operation: a share well above that operation's usual share."""

    ratio: float = 0.25
    min_count: int = 10
    baseline_factor: float = 3.0  # the share must also exceed this many times the baseline
    baseline_half_life: float = 600.0  # seconds; how fast the usual share is learnt


@dataclass(frozen=True, slots=True)
class DiagnosisSettings:
    """The ``diagnosis:`` section: windows, hysteresis and one threshold per kind."""

    enabled: bool = True
    interval: float = 1.0  # seconds between evaluations
    window: float = 30.0  # seconds of traffic each evaluation looks at
    raise_after: float = 5.0  # a condition must hold this long before it is raised
    clear_after: float = 30.0  # ... and be gone this long before it is cleared
    clear_ratio: float = 0.5  # gone = below this fraction of the raise threshold
    recent: int = 50  # raised and cleared diagnoses kept for /diagnosis
    stripe_outage: OutageThreshold = field(default_factory=OutageThreshold)
    network_failure: ShareThreshold = field(
        default_factory=lambda: ShareThreshold(ratio=0.5, min_count=5)
    )
    auth_failure: CountThreshold = field(default_factory=CountThreshold)
    rate_limited: ShareThreshold = field(
        default_factory=lambda: ShareThreshold(ratio=0.1, min_count=10)
    )
    latency_degraded: LatencyThreshold = field(default_factory=LatencyThreshold)
    client_errors_spike: ClientErrorThreshold = field(default_factory=ClientErrorThreshold)
    idempotency_misuse: CountThreshold = field(default_factory=CountThreshold)


class Counts:
    """One operation's counts over the window (attempts are sends to Stripe)."""

    __slots__ = (
        "attempts",
        "auth",
        "bad",
        "bad_codes",
        "idem",
        "latency",
        "lock",
        "network",
        "ok",
        "outage",
        "perm",
        "rate",
        "requests",
        "requests_ok",
    )

    def __init__(self) -> None:
        self.attempts = 0
        self.ok = 0  # answered, and not a failure of Stripe or of the request (2xx, 3xx, 402)
        self.outage = 0  # 5xx, timeouts, connections reset after sending
        self.network = 0  # never reached Stripe: DNS, connect, TLS
        self.auth = 0  # 401
        self.perm = 0  # 403
        self.rate = 0  # 429 from one of Stripe's limiters
        self.lock = 0  # 429 lock_timeout
        self.bad = 0  # 400 invalid_request_error
        self.idem = 0  # 400 idempotency_error
        self.requests = 0  # client requests answered
        self.requests_ok = 0
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)  # successful attempts by duration
        self.bad_codes: Counter[tuple[str, str]] = Counter()  # (code, param) of 400s


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """An external store the sidecar uses (the outbox's, the shared rate limit's) that fails.

    ``url`` has any password removed; ``effect`` says in plain words what the sidecar does
    meanwhile; ``since`` is the wall-clock time of the first failure in a row.
    """

    url: str
    error: str
    since: float
    effect: str
    severity: Severity = "warning"


@dataclass(slots=True)
class Snapshot:
    """What the recorder counted over the last ``window`` seconds."""

    window: float
    ops: dict[str, Counts]
    steps: Counter[str] = field(default_factory=Counter)  # network failures by step
    reasons: Counter[str] = field(default_factory=Counter)  # rate-limit 429s by reason
    auth_codes: Counter[str] = field(default_factory=Counter)  # 401 error codes
    examples: dict[str, list[str]] = field(default_factory=dict)  # category -> Request-Ids
    baselines: dict[str, float] = field(default_factory=dict)  # op -> usual share of 400s
    stores: dict[str, StoreStatus] = field(default_factory=dict)  # name -> failing store

    def total(self, name: str) -> int:
        """One count summed over every operation."""
        return sum(getattr(c, name) for c in self.ops.values())


class Check(NamedTuple):
    """A rule's finding: holds (True), gone (False) or cannot tell (None), and if it holds, why."""

    holds: bool | None
    severity: Severity = "warning"
    summary: str = ""
    evidence: dict[str, Any] = {}  # a shared default, never mutated
    action: str = ""


_GONE = Check(False)
_UNKNOWN = Check(None)


def quantile(buckets: list[int], q: float) -> float | None:
    """The q-quantile (seconds) of a latency histogram, interpolated within its bucket."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for i, count in enumerate(buckets):
        if count and running + count >= rank:
            low = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
            high = LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else LATENCY_BOUNDS[-1] * 2
            return low + (high - low) * (rank - running) / count
        running += count
    return LATENCY_BOUNDS[-1] * 2


def _pct(part: int, whole: int) -> str:
    return f"{round(100 * part / whole)}%" if whole else "0%"


def _ops_text(ops: list[str]) -> str:
    if len(ops) <= 3:
        return ", ".join(ops)
    return f"{', '.join(ops[:3])} and {len(ops) - 3} more"


def _share_state(count: int, total: int, ratio: float, min_count: int, clear: float) -> bool | None:
    """True: at or over threshold; False: clearly under it; None: in between or no traffic."""
    if total == 0:
        return None
    share = count / total
    if count >= min_count and share >= ratio:
        return True
    if share < ratio * clear:
        return False
    return None


def _evidence(s: Snapshot, category: str, count: int, total: int, ops: list[str]) -> dict[str, Any]:
    return {
        "count": count,
        "total": total,
        "share": round(count / total, 3) if total else 0.0,
        "window_seconds": s.window,
        "operations": ops,
        "example_request_ids": s.examples.get(category, [])[:5],
    }


def stripe_outage(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """Server, gateway, timeout and connection failures across several operations."""
    t = cfg.stripe_outage
    count, total = s.total("outage"), s.total("attempts")
    state = _share_state(count, total, t.ratio, t.min_count, cfg.clear_ratio)
    if not state:
        return _GONE if state is False else _UNKNOWN
    busy = [op for op, c in s.ops.items() if c.attempts]
    failing = sorted(op for op, c in s.ops.items() if c.outage and c.outage >= t.ratio * c.attempts)
    if len(failing) < min(t.min_operations, len(busy)):
        return _UNKNOWN  # one operation failing is that operation's trouble, not an outage
    return Check(
        True,
        "critical",
        f"Stripe is failing: {_pct(count, total)} of calls to {len(failing)} operation(s) got "
        f"server errors, gateway errors or timeouts in the last {s.window:g} s.",
        _evidence(s, "outage", count, total, failing),
        "The sidecar retries what is safe and fails fast while breakers are open; answers carry "
        "Sidecar-Diagnosis: stripe_outage so the app can switch to a fallback. Check "
        "status.stripe.com; nothing to fix on your side.",
    )


_STEP_ADVICE = {
    "dns": "resolving Stripe's host name (DNS) fails: check the pod's DNS resolver",
    "connect": "TCP connections to Stripe fail: check egress firewall rules, proxies and routes",
    "tls": "the TLS handshake with Stripe fails: check the CA bundle (upstream.ca_file), "
    "TLS-intercepting proxies and the clock",
}


def network_failure(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """Connections never reach Stripe; names the failing step (DNS, connect, TLS)."""
    t = cfg.network_failure
    count, total = s.total("network"), s.total("attempts")
    state = _share_state(count, total, t.ratio, t.min_count, cfg.clear_ratio)
    if not state:
        return _GONE if state is False else _UNKNOWN
    step = s.steps.most_common(1)[0][0] if s.steps else "connect"
    ops = sorted(op for op, c in s.ops.items() if c.network)
    evidence = _evidence(s, "network", count, total, ops)
    evidence["failing_step"] = step
    evidence["steps"] = dict(s.steps)
    return Check(
        True,
        "critical",
        f"The sidecar cannot reach Stripe: {count} of {total} calls failed at the {step} step "
        f"in the last {s.window:g} s.",
        evidence,
        f"Nothing was sent to Stripe for these calls. Likely cause: "
        f"{_STEP_ADVICE.get(step, _STEP_ADVICE['connect'])}; "
        "`stripe-sidecar doctor` checks each step.",
    )


def auth_failure(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """401 (invalid, expired or revoked key) or 403 (a restricted key lacks a permission)."""
    t = cfg.auth_failure
    unauthorized, forbidden, total = s.total("auth"), s.total("perm"), s.total("attempts")
    if total == 0:
        return _UNKNOWN
    if unauthorized + forbidden < t.min_count:
        return _GONE if unauthorized + forbidden == 0 else _UNKNOWN
    denied = sorted(op for op, c in s.ops.items() if c.perm)
    ops = sorted(op for op, c in s.ops.items() if c.auth or c.perm)
    evidence = _evidence(s, "auth", unauthorized + forbidden, total, ops)
    evidence.update(unauthorized_401=unauthorized, forbidden_403=forbidden)
    evidence["error_codes"] = dict(s.auth_codes.most_common(5))
    if unauthorized >= t.min_count or not forbidden:
        codes = ", ".join(s.auth_codes) or "no code"
        return Check(
            True,
            "critical",
            f"Stripe rejected the API key on {unauthorized} calls (401: {codes}) in the last "
            f"{s.window:g} s: the key is invalid, expired or revoked.",
            evidence,
            "Stripe performed nothing for these calls. Roll the key in the Stripe Dashboard "
            "and give the new one to the app (or to the sidecar's STRIPE_SIDECAR_SECRET_KEYS).",
        )
    return Check(
        True,
        "warning",
        f"Stripe refused {forbidden} calls to {_ops_text(denied)} with 403: the restricted key "
        "lacks a permission these operations need.",
        evidence | {"operations": denied},
        f"Grant the restricted key the permission for {_ops_text(denied)} in the Stripe "
        "Dashboard, or use a key that has it.",
    )


def rate_limited(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """429s from Stripe's limiters (by reason), or lock_timeout contention on one object."""
    t = cfg.rate_limited
    limited, locked, total = s.total("rate"), s.total("lock"), s.total("attempts")
    count = limited + locked
    state = _share_state(count, total, t.ratio, t.min_count, cfg.clear_ratio)
    if not state:
        return _GONE if state is False else _UNKNOWN
    ops = sorted(op for op, c in s.ops.items() if c.rate or c.lock)
    evidence = _evidence(s, "rate", count, total, ops)
    evidence.update(reasons=dict(s.reasons), lock_timeout=locked)
    if locked > limited:
        contended = sorted(op for op, c in s.ops.items() if c.lock)
        return Check(
            True,
            "warning",
            f"Requests are contending for the same Stripe objects: {locked} lock_timeout 429s "
            f"on {_ops_text(contended)} in the last {s.window:g} s.",
            evidence,
            "The sidecar retries them with backoff. Make concurrent updates to one object "
            "(a PaymentIntent, a Customer) serial in the app.",
        )
    reasons = ", ".join(f"{r} {n}" for r, n in s.reasons.most_common()) or "no reason given"
    return Check(
        True,
        "warning",
        f"Stripe is rate limiting this account: {_pct(count, total)} of calls got 429 "
        f"({reasons}) in the last {s.window:g} s.",
        evidence,
        "The sidecar slows down to the rate Stripe accepts and retries with backoff. Lower the "
        "app's request rate (batch, cache reads) or ask Stripe for a higher limit.",
    )


def latency_degraded(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """The p99 of successful calls is above the threshold."""
    t = cfg.latency_degraded
    merged = [sum(col) for col in zip(*(c.latency for c in s.ops.values()), strict=True)]
    count = sum(merged)
    if count == 0:
        return _UNKNOWN
    p99 = quantile(merged, 0.99) or 0.0
    if p99 < t.p99 * cfg.clear_ratio:
        return _GONE
    if p99 <= t.p99 or count < t.min_count:
        return _UNKNOWN
    slow = {
        op: round((quantile(c.latency, 0.99) or 0.0) * 1000)
        for op, c in s.ops.items()
        if sum(c.latency)
    }
    ops = sorted(slow, key=lambda op: -slow[op])
    evidence = _evidence(s, "slow", count, s.total("attempts"), ops[:10])
    evidence.update(p99_ms=round(p99 * 1000), threshold_ms=round(t.p99 * 1000), p99_ms_by_op=slow)
    return Check(
        True,
        "warning",
        f"Stripe is slow: the p99 of successful calls is {p99:.1f} s (threshold {t.p99:g} s) "
        f"over the last {s.window:g} s.",
        evidence,
        "Nothing is failing yet. Check status.stripe.com; keep the app's timeouts above the "
        "sidecar's retry deadline.",
    )


def client_errors_spike(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """400s on one operation well above their usual share: the app sends bad requests."""
    t = cfg.client_errors_spike
    spiking: list[str] = []
    high = False
    for op, c in s.ops.items():
        if not c.attempts:
            continue
        share = c.bad / c.attempts
        usual = s.baselines.get(op, 0.0)
        if c.bad >= t.min_count and share >= max(t.ratio, usual * t.baseline_factor):
            spiking.append(op)
        elif share >= t.ratio * cfg.clear_ratio:
            high = True
    if not spiking:
        return _UNKNOWN if high or s.total("attempts") == 0 else _GONE
    spiking.sort()
    codes: Counter[tuple[str, str]] = Counter()
    for op in spiking:
        codes.update(s.ops[op].bad_codes)
    count = sum(s.ops[op].bad for op in spiking)
    total = sum(s.ops[op].attempts for op in spiking)
    evidence = _evidence(s, "bad", count, total, spiking)
    top = codes.most_common(5)
    evidence["top_errors"] = [{"code": c, "param": p, "count": n} for (c, p), n in top]
    evidence["usual_share"] = {op: round(s.baselines.get(op, 0.0), 3) for op in spiking}
    named = "; ".join(f"{c} on {p}" if p else c for (c, p), _ in top[:3]) or "no error code"
    return Check(
        True,
        "warning",
        f"The app is sending bad requests to {_ops_text(spiking)}: {count} of {total} calls "
        f"({_pct(count, total)}) got 400 in the last {s.window:g} s; most often {named}.",
        evidence,
        "Stripe performed nothing for these calls. Check the app's latest deploy and the "
        "Stripe-Version it sends; the error codes and params above name what Stripe refused.",
    )


def idempotency_misuse(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """400 idempotency_error: the app reuses one Idempotency-Key for different requests."""
    count = s.total("idem")
    if count == 0:
        return _GONE if s.total("attempts") else _UNKNOWN
    if count < cfg.idempotency_misuse.min_count:
        return _UNKNOWN
    ops = sorted(op for op, c in s.ops.items() if c.idem)
    return Check(
        True,
        "warning",
        f"The app reused Idempotency-Keys for different requests {count} times on "
        f"{_ops_text(ops)} in the last {s.window:g} s; Stripe refused them (idempotency_error).",
        _evidence(s, "idem", count, s.total("attempts"), ops),
        "Give every new operation its own key and reuse a key only to retry the very same "
        "request; these requests were not performed.",
    )


def store_unreachable(s: Snapshot, cfg: DiagnosisSettings) -> Check:
    """A store the sidecar keeps fleet state in (Redis, SQLite) does not answer."""
    if not s.stores:
        return _GONE
    names = sorted(s.stores)
    worst: Severity = (
        "critical" if any(st.severity == "critical" for st in s.stores.values()) else "warning"
    )
    first = s.stores[names[0]]
    summary = (
        f"The sidecar cannot reach {', '.join(names)} ({first.url}: {first.error}); "
        + "; ".join(s.stores[n].effect for n in names)
        + "."
    )
    evidence = {
        "stores": {
            n: {"url": st.url, "error": st.error, "since": _iso(st.since), "effect": st.effect}
            for n, st in ((n, s.stores[n]) for n in names)
        }
    }
    return Check(
        True,
        worst,
        summary,
        evidence,
        "Check that the store is running and reachable from this pod (address, password, "
        "network policy); the sidecar reconnects by itself once it answers.",
    )


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


RULES: dict[str, Callable[[Snapshot, DiagnosisSettings], Check]] = {
    "stripe_outage": stripe_outage,
    "network_failure": network_failure,
    "store_unreachable": store_unreachable,
    "auth_failure": auth_failure,
    "rate_limited": rate_limited,
    "latency_degraded": latency_degraded,
    "client_errors_spike": client_errors_spike,
    "idempotency_misuse": idempotency_misuse,
}


def evaluate(snapshot: Snapshot, cfg: DiagnosisSettings) -> dict[str, Check]:
    """Every rule's finding for one snapshot."""
    return {kind: rule(snapshot, cfg) for kind, rule in RULES.items()}
