"""Fault profiles: which failures the simulator injects, and how often.

The kinds, and what a client sees:

- server_error: 500 api_error, `Stripe-Should-Retry: true`; nothing runs, nothing is saved.
- server_error_saved: 500 api_error, `Stripe-Should-Retry: false`, saved under the
  idempotency key (so a retry with the key gets the 500 again); nothing runs.
- html_502, html_503, gateway_504: a load balancer's HTML page, no Stripe headers.
- rate_limited: 429 rate_limit with `Stripe-Rate-Limited-Reason`; lock_timeout: 429
  lock_timeout without it. Nothing runs.
- drop_before: the connection is reset before anything runs.
- drop_after: the request runs (side effect booked, result saved under its key), then the
  connection is reset instead of answered. Requests refused before running (auth,
  validation, idempotency conflicts) are answered normally.
- slow: the answer comes `slow_seconds` late (the key stays in flight meanwhile).
- outage (a flag, not a draw): every request gets an HTML 503 at once.

Besides the random faults, a profile can rate limit like Stripe (not a draw either):
`account_rate` requests/s per API key (burst `account_burst`, default one second's worth)
answered `429 rate_limit` with `Stripe-Rate-Limited-Reason: global-rate` beyond it, and
`endpoint_rate`/`endpoint_burst` the same per key and operation (`endpoint-rate`). Off: null.

Pure code: `choose_fault` maps one uniform draw to at most one fault, so a seeded
`random.Random` gives the same fault sequence on every run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

FaultKind = Literal[
    "server_error",
    "server_error_saved",
    "html_502",
    "html_503",
    "gateway_504",
    "rate_limited",
    "lock_timeout",
    "drop_before",
    "drop_after",
    "slow",
]

# The order of the cumulative draw is the order of FaultKind above. Changing it changes every
# seeded sequence, so new kinds go at the end.
FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)

# Faults answered before the API runs at all (edge, load balancer, limiter):
# nothing executes and nothing is saved under an idempotency key.
EDGE_FAULTS: Final[frozenset[FaultKind]] = frozenset(
    {"server_error", "html_502", "html_503", "gateway_504", "rate_limited", "lock_timeout",
     "drop_before"}
)


_LIMIT_FIELDS: Final = ("account_rate", "account_burst", "endpoint_rate", "endpoint_burst")


@dataclass(frozen=True, slots=True)
class FaultProfile:
    """Probability (0..1) of each fault kind per request, plus timings and a total outage."""

    server_error: float = 0.0
    server_error_saved: float = 0.0
    html_502: float = 0.0
    html_503: float = 0.0
    gateway_504: float = 0.0
    rate_limited: float = 0.0
    lock_timeout: float = 0.0
    drop_before: float = 0.0
    drop_after: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 1.0
    work_seconds: float = 0.0
    outage: bool = False
    account_rate: float | None = None
    account_burst: float | None = None
    endpoint_rate: float | None = None
    endpoint_burst: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for kind in FAULT_KINDS:
            p = getattr(self, kind)
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                problems.append(f"{kind}: {p!r} is not a probability between 0 and 1")
        for name in ("slow_seconds", "work_seconds"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 <= v < math.inf:
                problems.append(f"{name}: {v!r} is not a non-negative number of seconds")
        for name in _LIMIT_FIELDS:
            v = getattr(self, name)
            if v is not None and (
                not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 < v < math.inf
            ):
                problems.append(f"{name}: {v!r} is not a positive number (or null: no limit)")
        if not isinstance(self.outage, bool):
            problems.append(f"outage: {self.outage!r} is not a boolean")
        if not problems and self.total() > 1.0 + 1e-9:
            problems.append(f"fault probabilities add up to {self.total():.4f}, more than 1")
        if problems:
            raise ValueError("; ".join(problems))

    def total(self) -> float:
        """Probability that a request gets any fault."""
        return math.fsum(getattr(self, kind) for kind in FAULT_KINDS)


PROFILES: Final[dict[str, FaultProfile]] = {
    "none": FaultProfile(),
    # 10% of requests get a transient fault, spread over every retryable kind:
    # server_error 2%, html_502 1%, html_503 1%, gateway_504 1%, rate_limited 1.5%,
    # lock_timeout 1%, drop_before 1%, drop_after 1.5%  (sum 10%).
    # server_error_saved is left out: Stripe marks it Stripe-Should-Retry: false.
    "bad_day": FaultProfile(
        server_error=0.02,
        html_502=0.01,
        html_503=0.01,
        gateway_504=0.01,
        rate_limited=0.015,
        lock_timeout=0.01,
        drop_before=0.01,
        drop_after=0.015,
    ),
    # Connections reset: half before the request runs, half after it ran.
    "flaky_network": FaultProfile(drop_before=0.05, drop_after=0.05),
    "rate_limited": FaultProfile(rate_limited=0.25, lock_timeout=0.05),
    "slow": FaultProfile(slow=0.25, slow_seconds=2.0),
    "outage": FaultProfile(outage=True),
}

_FIELDS: Final[frozenset[str]] = frozenset(f.name for f in dataclasses.fields(FaultProfile))


def resolve_profile(profile: FaultProfile | str) -> FaultProfile:
    """Return `profile`, or the named entry of `PROFILES` (ValueError lists the names)."""
    if isinstance(profile, FaultProfile):
        return profile
    if not isinstance(profile, str):
        raise ValueError(f"profile: {profile!r} is not a profile name")
    try:
        return PROFILES[profile]
    except KeyError:
        names = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown fault profile {profile!r} (known: {names})") from None


def profile_from_mapping(data: Mapping[str, Any]) -> FaultProfile:
    """Build a profile from `{"profile": name, <field>: value, ...}`; `seed` is ignored here.

    Fields override the named profile (or `none`). Every problem is reported at once.
    """
    unknown = sorted(set(data) - _FIELDS - {"profile", "seed"})
    if unknown:
        raise ValueError("unknown key" + ("s" if len(unknown) > 1 else "") + ": "
                         + ", ".join(unknown))
    base = resolve_profile(data.get("profile", "none"))
    overrides = {k: v for k, v in data.items() if k in _FIELDS}
    return dataclasses.replace(base, **overrides)


def profile_as_dict(profile: FaultProfile) -> dict[str, Any]:
    """The profile as a JSON-ready dict."""
    return {name: getattr(profile, name) for name in sorted(_FIELDS)}


def choose_fault(profile: FaultProfile, draw: float) -> FaultKind | None:
    """Map a uniform draw in [0, 1) to the fault this request gets, or None."""
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += getattr(profile, kind)
        if draw < edge:
            return kind
    return None
