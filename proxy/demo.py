"""The demo: one payment workload against a faulty simulator, directly and through the sidecar.

Two simulators run with the same fault profile and seed, so both runs face the same kinds and
rates of faults; a sidecar sits in front of the second. The workload is a typical app that never
retries and sends no Idempotency-Key. Every number in the comparison is measured: what the app
saw, and the simulator's books (what Stripe actually executed).

A second phase, the outage, runs through a fresh sidecar only: paced mixed traffic while its
simulator goes from healthy to a total outage and back. It measures how much of the load still
reached Stripe, how fast the sidecar failed, and how soon traffic flowed again, each number
against its target.

A third phase, the rate limit, pushes an app past the account's limit on a simulator that
limits like Stripe (a token bucket per API key): the same open-loop load directly and through a
fresh sidecar, which knows no limit in advance. It measures the share of what reaches Stripe
that is rate limited, and the app's successful throughput against the limit.

The pure part (planning payments, classifying answers, summing up, rendering) takes plain values;
:func:`compare`, :func:`outage_drill`, :func:`rate_limit_push` and :func:`run_demo` are the I/O
shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import math
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.app import Sidecar
from proxy.config import Config, config_from_dict
from proxy.simulator import FaultProfile, start_simulator
from proxy.simulator.faults import resolve_profile

__all__ = [
    "Comparison",
    "LimitAnswer",
    "LimitRun",
    "OutagePlan",
    "OutageReport",
    "RateLimitPlan",
    "RateLimitReport",
    "RunReport",
    "SidecarCounts",
    "compare",
    "outage_drill",
    "rate_limit_push",
    "render",
    "render_outage",
    "render_rate_limit",
    "run_demo",
    "summarize_limit",
]

OPERATION: Final = "POST /v1/payment_intents"
PATH: Final = "/v1/payment_intents"
API_KEY: Final = "sk_test_demo0000000000000000000000"
# One payment in DECLINE_EVERY uses a declining test card: a 402 is a business answer.
DECLINE_EVERY: Final = 20
# Longer than the sidecar's 20 s retry deadline, so the sidecar, not the app, gives up first.
APP_TIMEOUT: Final = 30.0

Result = Literal["succeeded", "declined", "failed"]


# -- pure core ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Payment:
    """One payment the app makes: its ref (``metadata[ref]``), amount and test card."""

    ref: str
    amount: int
    payment_method: str

    def form(self) -> dict[str, str]:
        """The form body of its ``POST /v1/payment_intents``."""
        return {
            "amount": str(self.amount),
            "currency": "usd",
            "payment_method": self.payment_method,
            "confirm": "true",
            "metadata[ref]": self.ref,
        }


def plan_payments(count: int) -> list[Payment]:
    """The workload: ``count`` payments, the same for both runs, one in 20 meant to decline."""
    return [
        Payment(
            ref=f"order_{i:06d}",
            amount=500 + (i * 7919) % 19500,
            payment_method=(
                "pm_card_chargeDeclined" if i % DECLINE_EVERY == DECLINE_EVERY - 1
                else "pm_card_visa"
            ),
        )
        for i in range(count)
    ]


@dataclass(frozen=True, slots=True)
class Seen:
    """What the app saw for one payment."""

    ref: str
    result: Result
    detail: str  # "" when it succeeded; else "HTTP 502", "connection dropped", ...
    seconds: float


def error_code(body: bytes) -> str:
    """The ``error.code`` of a Stripe-shaped error body; "" when there is none."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else ""


def classify_answer(status: int, body: bytes) -> tuple[Result, str]:
    """What an app that does not retry makes of one answer: succeeded, declined or failed."""
    if status == 402:
        return "declined", "HTTP 402"
    if status == 200:
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("status") == "succeeded":
            return "succeeded", ""
        return "failed", "HTTP 200 without a succeeded payment"
    code = error_code(body)
    return "failed", f"HTTP {status} {code}" if code else f"HTTP {status}"


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class RunReport:
    """One run's numbers: what the app saw, and what the simulator's books say happened."""

    label: str
    attempted: int
    succeeded: int
    declined: int
    failed: int
    failures: Mapping[str, int]  # detail -> count, e.g. {"HTTP 500": 12}
    duplicates: int  # books: writes executed again for a ref already charged
    lost_writes: int  # refs Stripe executed while the app saw a failure
    executed_refs: int  # distinct refs in the books
    upstream_attempts: int  # books: POST /v1/payment_intents requests the simulator received
    p50_ms: float
    p99_ms: float
    seconds: float
    books: Mapping[str, Any] = field(default_factory=dict)  # the snapshot these came from

    @property
    def success_rate(self) -> float:
        """Succeeded out of the payments that were not declined, in percent."""
        base = self.attempted - self.declined
        return 100.0 * self.succeeded / base if base else 0.0

    @property
    def attempts_per_payment(self) -> float:
        """Requests Stripe received per payment the app made."""
        return self.upstream_attempts / self.attempted if self.attempted else 0.0


def summarize(label: str, seen: Sequence[Seen], books: Mapping[str, Any],
              seconds: float) -> RunReport:
    """Combine the app's view of a run with the simulator's books after it."""
    results = Counter(s.result for s in seen)
    refs: Mapping[str, int] = books.get("refs", {})
    by_operation: Mapping[str, int] = books.get("by_operation", {})
    latencies = [s.seconds * 1000 for s in seen]
    return RunReport(
        label=label,
        attempted=len(seen),
        succeeded=results["succeeded"],
        declined=results["declined"],
        failed=results["failed"],
        failures=dict(Counter(s.detail for s in seen if s.result == "failed").most_common()),
        duplicates=int(books.get("duplicates", 0)),
        lost_writes=sum(1 for s in seen if s.result == "failed" and refs.get(s.ref, 0) > 0),
        executed_refs=sum(1 for count in refs.values() if count > 0),
        upstream_attempts=int(by_operation.get(OPERATION, 0)),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        seconds=seconds,
        books=books,
    )


@dataclass(frozen=True, slots=True)
class SidecarCounts:
    """What the sidecar's own metrics say it did for the workload's operation."""

    upstream_attempts: int = 0
    retries: Mapping[str, int] = field(default_factory=dict)  # cause (outcome) -> retries
    fail_fast: Mapping[str, int] = field(default_factory=dict)  # reason -> answers
    budget_exhausted: int = 0  # retries not made: the retry budget was spent


def sidecar_counts(samples: Iterable[tuple[str, Mapping[str, str], float]]) -> SidecarCounts:
    """Pick the workload's counters out of ``(name, labels, value)`` metric samples."""
    attempts = 0.0
    budget = 0.0
    retries: Counter[str] = Counter()
    fail_fast: Counter[str] = Counter()
    for name, labels, value in samples:
        if labels.get("operation") != OPERATION:
            continue
        if name == "stripe_sidecar_upstream_attempts_total":
            attempts += value
        elif name == "stripe_sidecar_retries_total":
            retries[labels["outcome"]] += round(value)
        elif name == "stripe_sidecar_fail_fast_total":
            fail_fast[labels["reason"]] += round(value)
        elif name == "stripe_sidecar_retry_budget_exhausted_total":
            budget += value
    return SidecarCounts(
        upstream_attempts=round(attempts),
        retries={k: v for k, v in retries.most_common() if v},
        fail_fast={k: v for k, v in fail_fast.most_common() if v},
        budget_exhausted=round(budget),
    )


@dataclass(frozen=True, slots=True)
class Comparison:
    """Both runs of the demo, how they were set up, and the sidecar's own counts."""

    profile: str
    seed: int
    concurrency: int
    direct: RunReport
    sidecar: RunReport
    counts: SidecarCounts = field(default_factory=SidecarCounts)


def render_table(direct: RunReport, sidecar: RunReport) -> str:
    """The side-by-side table of both runs."""
    rows: list[tuple[str, str, str]] = [("", "direct", "through sidecar")]

    def row(label: str, pick: Callable[[RunReport], str]) -> None:
        rows.append((label, pick(direct), pick(sidecar)))

    row("payments attempted", lambda r: str(r.attempted))
    row("succeeded", lambda r: str(r.succeeded))
    row("declined (402, expected)", lambda r: str(r.declined))
    row("failed", lambda r: str(r.failed))
    row("success % (excl. declines)", lambda r: f"{r.success_rate:.1f}")
    row("duplicate charges", lambda r: str(r.duplicates))
    row("lost writes", lambda r: str(r.lost_writes))
    row("upstream attempts / payment", lambda r: f"{r.attempts_per_payment:.2f}")
    row("p50 / p99 latency (ms)", lambda r: f"{r.p50_ms:.0f} / {r.p99_ms:.0f}")
    return "\n".join(f"{a:<28}{b:>10}{c:>20}".rstrip() for a, b, c in rows) + "\n"


def _listing(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {what}" for what, count in counts.items())


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def render_summary(direct: RunReport, sidecar: RunReport, counts: SidecarCounts) -> str:
    """A few plain-English sentences on what the table shows, one paragraph each."""
    d, s = direct, sidecar
    paragraphs: list[str] = []
    recovered = d.failed - s.failed
    if recovered > 0:
        verdict = f"the sidecar recovered {recovered}"
    elif recovered == 0:
        verdict = "the sidecar recovered none"
    else:
        verdict = f"the sidecar saw {-recovered} more"
    duplicates = _plural(s.duplicates, "duplicate charge", "duplicate charges")
    paragraphs.append(
        f"{_plural(d.failed, 'payment', 'payments')} failed directly and {s.failed} through "
        f"the sidecar: {verdict}, created {duplicates} and lost "
        f"{_plural(s.lost_writes, 'write', 'writes')}."
    )
    load = (
        f"It sent Stripe {s.attempts_per_payment:.2f} requests per payment "
        f"(direct: {d.attempts_per_payment:.2f})"
    )
    details = []
    retries = sum(counts.retries.values())
    if retries:
        details.append(f"{_plural(retries, 'retry', 'retries')} ({_listing(counts.retries)})")
    if counts.budget_exhausted:
        details.append(f"{counts.budget_exhausted} not retried because the retry budget was spent")
    fail_fast = sum(counts.fail_fast.values())
    if fail_fast:
        details.append(
            f"{fail_fast} answered at once without calling Stripe ({_listing(counts.fail_fast)})"
        )
    paragraphs.append(load + (": " + "; ".join(details) if details else "") + ".")
    if counts.upstream_attempts != s.upstream_attempts:
        paragraphs[-1] += (
            f" Stripe's books show {s.upstream_attempts} requests where the sidecar's attempt "
            f"metric counts {counts.upstream_attempts}."
        )
    if d.failed:
        lost = (
            f" Stripe had executed {d.lost_writes} of them anyway (the connection dropped after "
            "the work): lost writes, as the app cannot tell whether to charge again."
            if d.lost_writes else ""
        )
        paragraphs.append(f"Directly, the app saw {_listing(d.failures)}.{lost}")
    if s.failed:
        paragraphs.append(f"Through the sidecar, the app saw {_listing(s.failures)}.")
    if d.declined or s.declined:
        retried = counts.retries.get("card_declined", 0)
        paragraphs.append(
            f"Card declines ({d.declined} direct, {s.declined} through the sidecar) are a "
            f"business answer: passed through as 402, retried {_plural(retried, 'time', 'times')}."
        )
    return "".join(textwrap.fill(p, width=96) + "\n" for p in paragraphs)


def render(comparison: Comparison) -> str:
    """Everything the demo prints on stdout: set-up, table, summary, timings."""
    c = comparison
    return (
        f"{c.direct.attempted} payments, concurrency {c.concurrency}, fault profile "
        f"{c.profile!r}, seed {c.seed}.\n"
        "The app neither retries nor sends an Idempotency-Key. The sidecar runs with its\n"
        "defaults.\n\n"
        + render_table(c.direct, c.sidecar)
        + "\n"
        + render_summary(c.direct, c.sidecar, c.counts)
        + f"\nRun time: direct {c.direct.seconds:.1f} s, through sidecar "
        f"{c.sidecar.seconds:.1f} s.\n"
    )


# -- the outage phase: pure part ------------------------------------------------------------------
CIRCUIT_OPEN: Final = "sidecar_circuit_open"
# The app's mixed traffic in the outage phase: a write and two reads, in turn.
OUTAGE_OPERATIONS: Final = (OPERATION, "GET /v1/balance", "GET /v1/customers/{customer}")
# The targets the phase is measured against.
OUTAGE_SHARE_TARGET: Final = 0.15  # Stripe requests per client request during the outage
OPEN_SHARE_TARGET: Final = 0.05  # the same, once the breaker has opened
FAIL_FAST_TARGET_MS: Final = 5.0  # p99 of a fail-fast answer, as the app measures it
RECOVERY_TARGET: Final = 6.0  # seconds from the outage's end, with the default 5 s open time
_STATE_RANK: Final = {"open": 0, "half_open": 1, "closed": 2}  # the order transitions print in
NBSP: Final = "\xa0"  # keeps an operation template on one line when a paragraph is wrapped


@dataclass(frozen=True, slots=True)
class OutagePlan:
    """How the outage phase runs: paced traffic, Stripe healthy, down, then healthy again."""

    workers: int = 10
    pace: float = 0.025  # each worker's pause after every answer
    healthy: float = 1.0  # seconds of healthy traffic before the outage
    # Longer than the default 5 s open time, so one half-open probe cycle fails during it.
    outage: float = 7.0
    deadline: float = 15.0  # seconds after the phase began: stop waiting for recovery


@dataclass(frozen=True, slots=True)
class Answer:
    """One request the app made in the outage phase; times in seconds since the phase began."""

    operation: str
    sent: float
    received: float
    status: int  # 0 when no answer came (connection failed, timeout)
    code: str  # the error answer's ``error.code``; "" otherwise

    @property
    def ok(self) -> bool:
        """Whether Stripe's answer was a success (2xx)."""
        return 200 <= self.status < 300

    @property
    def fail_fast(self) -> bool:
        """Whether the sidecar answered at once because a breaker was open."""
        return self.code == CIRCUIT_OPEN


@dataclass(frozen=True, slots=True)
class OutageTimeline:
    """When the phase's events happened (seconds since it began) and Stripe's request count then."""

    outage_start: float
    outage_end: float
    upstream_at_start: int
    upstream_at_end: int
    opened_at: float | None  # when the app got its first fail-fast answer; None if it never did
    upstream_at_open: int  # Stripe's request count at that moment (0 when it never came)
    closed_at: float | None  # the first time after outage_end every breaker was closed
    seconds: float  # the phase's run time


@dataclass(frozen=True, slots=True)
class SidecarView:
    """What the sidecar's own metrics say about the outage phase, over every operation."""

    # scope -> new state -> transitions, e.g. {"GET /v1/balance": {"open": 2, "closed": 1}}
    transitions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    fail_fast: Mapping[str, int] = field(default_factory=dict)  # reason -> answers


def sidecar_view(samples: Iterable[tuple[str, Mapping[str, str], float]]) -> SidecarView:
    """Pick breaker transitions and fail-fast answers out of ``(name, labels, value)`` samples."""
    transitions: dict[str, Counter[str]] = {}
    fail_fast: Counter[str] = Counter()
    for name, labels, value in samples:
        if name == "stripe_sidecar_breaker_transitions_total" and value:
            transitions.setdefault(labels["scope"], Counter())[labels["state"]] += round(value)
        elif name == "stripe_sidecar_fail_fast_total":
            fail_fast[labels["reason"]] += round(value)
    return SidecarView(
        transitions={scope: dict(states) for scope, states in sorted(transitions.items())},
        fail_fast={k: v for k, v in fail_fast.most_common() if v},
    )


def share(part: int, whole: int) -> float:
    """``part / whole``; NaN when ``whole`` is 0, so that no target counts as met."""
    return part / whole if whole else math.nan


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the outage table: a heading, a number, or a number against its target."""

    label: str
    measured: str = ""
    target: str = ""  # "" when the number has no target
    met: bool = True


@dataclass(frozen=True, slots=True)
class OutageReport:
    """The outage phase's numbers: the app's view, Stripe's books and the sidecar's metrics."""

    plan: OutagePlan
    requests: int  # every request the app made in the phase
    client_during: int  # requests the app sent during the outage
    upstream_during: int  # requests Stripe received during the outage
    client_after_open: int  # of client_during, those sent after the first fail-fast answer
    upstream_after_open: int  # of upstream_during, those received after it
    opened_after: float | None  # seconds from the outage's start to the first fail-fast answer
    fail_fast_answers: int  # fail-fast answers the app got
    fail_fast_p50_ms: float
    fail_fast_p99_ms: float
    first_success_after: float | None  # seconds from the outage's end to a 2xx answer
    closed_after: float | None  # seconds from the outage's end to every breaker closed
    seconds: float
    view: SidecarView = field(default_factory=SidecarView)

    @property
    def outage_share(self) -> float:
        """Stripe requests per client request during the outage."""
        return share(self.upstream_during, self.client_during)

    @property
    def open_share(self) -> float:
        """Stripe requests per client request once the breaker had opened."""
        return share(self.upstream_after_open, self.client_after_open)

    def rows(self) -> list[Row]:
        """The phase's table, with a verdict on every number that has a target."""

        def pct(value: float) -> str:
            return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"

        def after(seconds: float | None) -> str:
            return "never" if seconds is None else f"{seconds:.2f}"

        def recovery(label: str, seconds: float | None) -> Row:
            met = seconds is not None and seconds <= RECOVERY_TARGET
            return Row(label, after(seconds), f"<= {RECOVERY_TARGET:.0f}", met)

        fast = self.fail_fast_answers > 0 and self.fail_fast_p99_ms < FAIL_FAST_TARGET_MS
        return [
            Row(f"during the outage ({self.plan.outage:.0f} s)"),
            Row("  client requests", str(self.client_during)),
            Row("  Stripe requests (simulator's books)", str(self.upstream_during)),
            Row("  Stripe / client", pct(self.outage_share),
                f"<= {100 * OUTAGE_SHARE_TARGET:.0f}%", self.outage_share <= OUTAGE_SHARE_TARGET),
            Row("from the breaker opening to the outage's end"),
            Row("  opened (s after the outage began)", after(self.opened_after)),
            Row("  client requests", str(self.client_after_open)),
            Row("  Stripe requests", str(self.upstream_after_open)),
            Row("  Stripe / client", pct(self.open_share),
                f"<= {100 * OPEN_SHARE_TARGET:.0f}%", self.open_share <= OPEN_SHARE_TARGET),
            Row(f"fail-fast answers ({CIRCUIT_OPEN})"),
            Row("  answers in the whole phase", str(self.fail_fast_answers)),
            Row("  p50 / p99 latency (ms)",
                f"{self.fail_fast_p50_ms:.1f} / {self.fail_fast_p99_ms:.1f}",
                f"< {FAIL_FAST_TARGET_MS:.0f}", fast),
            Row("after the outage's end (s)"),
            recovery("  first successful answer", self.first_success_after),
            recovery("  every breaker closed", self.closed_after),
        ]


def summarize_outage(plan: OutagePlan, answers: Sequence[Answer], timeline: OutageTimeline,
                     view: SidecarView) -> OutageReport:
    """Combine what the app saw with Stripe's counts and the sidecar's metrics."""
    t = timeline
    during = [a for a in answers if t.outage_start <= a.sent < t.outage_end]
    after_open = (
        [a for a in during if a.sent >= t.opened_at] if t.opened_at is not None else []
    )
    fast_ms = [(a.received - a.sent) * 1000 for a in answers if a.fail_fast]
    recovered = [a.received for a in answers if a.ok and a.received >= t.outage_end]
    return OutageReport(
        plan=plan,
        requests=len(answers),
        client_during=len(during),
        upstream_during=t.upstream_at_end - t.upstream_at_start,
        client_after_open=len(after_open),
        upstream_after_open=(
            t.upstream_at_end - t.upstream_at_open if t.opened_at is not None else 0
        ),
        opened_after=None if t.opened_at is None else t.opened_at - t.outage_start,
        fail_fast_answers=len(fast_ms),
        fail_fast_p50_ms=percentile(fast_ms, 50),
        fail_fast_p99_ms=percentile(fast_ms, 99),
        first_success_after=min(recovered) - t.outage_end if recovered else None,
        closed_after=None if t.closed_at is None else t.closed_at - t.outage_end,
        seconds=t.seconds,
        view=view,
    )


def render_outage(report: OutageReport) -> str:
    """Everything the outage phase prints: set-up, table with targets, the sidecar's metrics."""
    r, p = report, report.plan
    operations = ", ".join(OUTAGE_OPERATIONS[:-1]) + " and " + OUTAGE_OPERATIONS[-1]
    head = (
        f"Outage: {p.workers} app workers send, through a fresh sidecar only, a request each "
        f"every {1000 * p.pace:.0f} ms, in turn {operations.replace(' /', NBSP + '/')}, and never "
        f"retry. Stripe is healthy for {p.healthy:.0f} s, down for {p.outage:.0f} s (every request "
        f"an HTML 503), then healthy again until traffic flows and the breakers close (at most "
        f"{p.deadline:.0f} s in all)."
    )
    lines = [textwrap.fill(head, width=96).replace(NBSP, " "), "",
             f"{'':<46}{'measured':>12}{'target':>10}"]
    for row in r.rows():
        mark = ("ok" if row.met else "MISSED") if row.target else ""
        lines.append(f"{row.label:<46}{row.measured:>12}{row.target:>10}  {mark}".rstrip())
    fail_fast = sum(r.view.fail_fast.values())
    lines += [
        "",
        "The sidecar's own metrics:",
        f"  answered without calling Stripe (stripe_sidecar_fail_fast_total): {fail_fast}"
        + (f" ({_listing(r.view.fail_fast)})" if fail_fast else ""),
        "  breaker transitions by scope (stripe_sidecar_breaker_transitions_total):",
    ]
    width = max((len(scope) for scope in r.view.transitions), default=0)
    for scope, states in r.view.transitions.items():
        ordered = sorted(states.items(), key=lambda kv: _STATE_RANK.get(kv[0], len(_STATE_RANK)))
        lines.append(f"    {scope:<{width}}  " + ", ".join(f"{s} {n}" for s, n in ordered))
    if not r.view.transitions:
        lines.append("    none")
    lines += ["", f"Run time: {r.seconds:.1f} s, {r.requests} requests."]
    return "\n".join(lines) + "\n"


# -- the rate-limit phase: pure part --------------------------------------------------------------
SIDECAR_RATE_LIMITED: Final = "sidecar_rate_limited"
# The app's traffic in the rate-limit phase: a payment and a read, in turn.
LIMIT_OPERATIONS: Final = (OPERATION, "GET /v1/balance")


@dataclass(frozen=True, slots=True)
class RateLimitPlan:
    """How the rate-limit phase runs: an account limit, and an app that offers more."""

    limit: float = 50.0  # the account's limit on the simulator, requests/s per API key
    offered: float = 150.0  # what the app sends, requests/s, open loop (it never waits)
    seconds: float = 4.5  # per run: directly, then through a sidecar
    settle: float = 2.0  # the measured window starts here: the sidecar learns the limit first


@dataclass(frozen=True, slots=True)
class LimitAnswer:
    """One request of the rate-limit phase: when it started (s), its status and error code."""

    started: float
    status: int  # 0 when no answer came
    code: str


@dataclass(frozen=True, slots=True)
class LimitRun:
    """One run of the rate-limit phase, from the app's answers and the simulator's books."""

    label: str
    requests: int  # what the app sent
    succeeded: int  # 2xx answers
    succeeded_after: int  # 2xx answers to requests started after the plan's settle time
    refused_by_sidecar: int  # sidecar_rate_limited answers: never sent to Stripe
    limited_by_stripe: int  # 429 rate_limit answers the app got from Stripe
    stripe_requests: int  # books: every request Stripe received, retries included
    stripe_limited: int  # books: of those, answered 429 by its rate limiter
    stripe_requests_after: int  # the same two, from the settle time on
    stripe_limited_after: int
    seconds: float

    @property
    def limited_share_after(self) -> float:
        """Share of what reached Stripe after the settle time that it rate limited."""
        return share(self.stripe_limited_after, self.stripe_requests_after)


def summarize_limit(label: str, plan: RateLimitPlan, answers: Sequence[LimitAnswer],
                    books_at_settle: Mapping[str, Any], books_end: Mapping[str, Any],
                    seconds: float) -> LimitRun:
    """Combine the app's answers with the books at the settle time and at the end."""

    def limited(books: Mapping[str, Any]) -> int:
        return sum(books.get("rate_limited", {}).values())

    ok = [a for a in answers if 200 <= a.status < 300]
    return LimitRun(
        label=label,
        requests=len(answers),
        succeeded=len(ok),
        succeeded_after=sum(1 for a in ok if a.started >= plan.settle),
        refused_by_sidecar=sum(1 for a in answers if a.code == SIDECAR_RATE_LIMITED),
        limited_by_stripe=sum(1 for a in answers if a.status == 429 and a.code == "rate_limit"),
        stripe_requests=int(books_end.get("requests", 0)),
        stripe_limited=limited(books_end),
        stripe_requests_after=int(books_end.get("requests", 0))
        - int(books_at_settle.get("requests", 0)),
        stripe_limited_after=limited(books_end) - limited(books_at_settle),
        seconds=seconds,
    )


@dataclass(frozen=True, slots=True)
class RateLimitReport:
    """Both runs of the rate-limit phase."""

    plan: RateLimitPlan
    direct: LimitRun
    sidecar: LimitRun

    def throughput(self, run: LimitRun) -> float:
        """The app's successes per second after the settle time."""
        window = self.plan.seconds - self.plan.settle
        return run.succeeded_after / window if window > 0 else math.nan


def render_rate_limit(report: RateLimitReport) -> str:
    """Everything the rate-limit phase prints: set-up, table, what it shows."""
    p, d, s = report.plan, report.direct, report.sidecar
    head = (
        f"Rate limit: the account allows {p.limit:.0f} requests/s per API key (Stripe: 100/s "
        f"live, 25/s sandbox) and the app offers {p.offered:.0f}/s for {p.seconds:g} s, in turn "
        f"{LIMIT_OPERATIONS[0]} and {LIMIT_OPERATIONS[1]}, never retrying; directly, then "
        f"through a fresh sidecar with its defaults (no limit configured: it learns from "
        f"Stripe's 429s). Measured from {p.settle:.1f} s on, unless said otherwise."
    )
    rows: list[tuple[str, str, str]] = [("", "direct", "through sidecar")]

    def row(label: str, pick: Callable[[LimitRun], str]) -> None:
        rows.append((label, pick(d), pick(s)))

    def pct(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"

    row("app requests (whole run)", lambda r: str(r.requests))
    row("Stripe requests (whole run)", lambda r: str(r.stripe_requests))
    row("Stripe requests", lambda r: str(r.stripe_requests_after))
    row("  rate limited by Stripe", lambda r: f"{r.stripe_limited_after} "
        f"({pct(r.limited_share_after)})")
    row("app successes / s", lambda r: f"{report.throughput(r):.1f} "
        f"({pct(report.throughput(r) / p.limit)})")
    row("answered by the sidecar (whole run)", lambda r: str(r.refused_by_sidecar))
    lines = [textwrap.fill(head, width=96), ""]
    lines += [f"{a:<36}{b:>16}{c:>20}".rstrip() for a, b, c in rows]
    summary = (
        f"Directly, Stripe refuses {pct(d.limited_share_after)} of what it receives. The sidecar "
        f"brings that to {pct(s.limited_share_after)} while the app still gets "
        f"{report.throughput(s):.0f} successes/s against a limit of {p.limit:.0f}/s; the excess "
        f"waits up to ratelimit.max_wait, then gets 429 {SIDECAR_RATE_LIMITED} from the "
        f"sidecar ({s.refused_by_sidecar}), which never reached Stripe."
    )
    lines += ["", textwrap.fill(summary, width=96)]
    lines += ["", f"Run time: direct {d.seconds:.1f} s, through sidecar {s.seconds:.1f} s."]
    return "\n".join(lines) + "\n"


class Progress:
    """One status line per phase on a stream: redrawn with ``\\r`` on a TTY, else plain lines."""

    def __init__(self, stream: IO[str], *, clock: Callable[[], float] = time.monotonic,
                 tty: bool | None = None) -> None:
        self._stream = stream
        self._clock = clock
        self._tty = stream.isatty() if tty is None else tty
        # A terminal can take ten redraws a second; a log file wants a line a second at most.
        self._interval = 0.1 if self._tty else 1.0
        self._phase = ""
        self._total: int | None = 0
        self._counts: Counter[Result] = Counter()
        self._last = -math.inf
        self._started = 0.0

    def start(self, phase: str, total: int | None) -> None:
        """Begin a phase of ``total`` payments (None: it runs until it is over)."""
        self._phase, self._total = phase, total
        self._counts = Counter()
        self._last = -math.inf
        self._started = self._clock()
        self._show(force=True)

    def record(self, result: Result) -> None:
        """Count one finished request; redraw if the last drawing is old enough."""
        self._counts[result] += 1
        self._show(force=False)

    def finish(self) -> None:
        """Draw the phase's final state and end its line."""
        self._show(force=True)
        if self._tty:
            self._stream.write("\n")
        self._stream.flush()

    def _show(self, *, force: bool) -> None:
        now = self._clock()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        c = self._counts
        done = c["succeeded"] + c["declined"] + c["failed"]
        of = "" if self._total is None else f"/{self._total}"
        line = (f"[{self._phase}] {done}{of}  ok {c['succeeded']}  "
                f"declined {c['declined']}  failed {c['failed']}  {now - self._started:.1f} s")
        if self._tty:
            self._stream.write(f"\r{line}\x1b[K")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


# -- I/O shell ----------------------------------------------------------------------------------
async def _pay(session: aiohttp.ClientSession, url: str, payment: Payment) -> Seen:
    """Make one payment as an app without retries would, and note what it saw."""
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=payment.form()) as resp:
            body = await resp.read()
            result, detail = classify_answer(resp.status, body)
    except TimeoutError:
        result, detail = "failed", "timeout"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
            aiohttp.ClientPayloadError):
        result, detail = "failed", "connection dropped"
    except aiohttp.ClientError as exc:
        result, detail = "failed", type(exc).__name__
    return Seen(payment.ref, result, detail, time.perf_counter() - t0)


async def _drive(session: aiohttp.ClientSession, url: str, payments: Sequence[Payment],
                 concurrency: int, progress: Progress) -> list[Seen]:
    """Send every payment with at most ``concurrency`` in flight; results in payment order."""
    seen: list[Seen | None] = [None] * len(payments)
    todo: Iterator[tuple[int, Payment]] = iter(enumerate(payments))

    async def worker() -> None:
        for i, payment in todo:  # the iterator is shared: each payment goes to one worker
            s = await _pay(session, url, payment)
            seen[i] = s
            progress.record(s.result)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(payments)))))
    return [s for s in seen if s is not None]


async def _run_phase(label: str, base_url: str, payments: Sequence[Payment], concurrency: int,
                     progress: Progress, books: Callable[[], dict[str, Any]]) -> RunReport:
    """One run of the workload against ``base_url``, with its own client session."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=aiohttp.ClientTimeout(total=APP_TIMEOUT),
    ) as session:
        progress.start(label, len(payments))
        t0 = time.perf_counter()
        seen = await _drive(session, base_url + PATH, payments, concurrency, progress)
        seconds = time.perf_counter() - t0
        progress.finish()
    return summarize(label, seen, books(), seconds)


def _sidecar_config(upstream_url: str) -> Config:
    """The sidecar's defaults, pointed at ``upstream_url``."""
    return config_from_dict(
        {
            "server": {"listen": "127.0.0.1:0", "drain_period": 0, "shutdown_grace": 2.0},
            "upstream": {"override": upstream_url},
        },
        source="demo",
    )


def _metric_samples(registry: CollectorRegistry) -> Iterator[tuple[str, Mapping[str, str], float]]:
    """Every sample in ``registry`` as ``(name, labels, value)``."""
    return (
        (sample.name, sample.labels, sample.value)
        for family in registry.collect()
        for sample in family.samples
    )


async def compare(*, requests: int, concurrency: int, profile: str, seed: int,
                  progress: Progress) -> Comparison:
    """Run the workload directly against one simulator, then through a sidecar to another."""
    payments = plan_payments(requests)
    async with contextlib.AsyncExitStack() as stack:
        sim_direct = await stack.enter_async_context(start_simulator(profile=profile, seed=seed))
        sim_behind = await stack.enter_async_context(start_simulator(profile=profile, seed=seed))
        direct = await _run_phase("direct", sim_direct.url, payments, concurrency, progress,
                                  sim_direct.books)
        registry = CollectorRegistry()
        sidecar = Sidecar(_sidecar_config(sim_behind.url), registry=registry,
                          log_stream=io.StringIO())
        port = await sidecar.start()
        try:
            behind = await _run_phase("through sidecar", f"http://127.0.0.1:{port}", payments,
                                      concurrency, progress, sim_behind.books)
        finally:
            await sidecar.stop()
    return Comparison(profile, seed, concurrency, direct, behind,
                      sidecar_counts(_metric_samples(registry)))


def _breakers_closed(registry: CollectorRegistry) -> bool:
    """Whether the sidecar's breaker-state gauge shows every breaker closed."""
    gauge = registry.restricted_registry(["stripe_sidecar_breaker_state"])
    return all(sample.value == 0 for family in gauge.collect() for sample in family.samples)


async def _call(session: aiohttp.ClientSession, base_url: str, operation: str, customer: str,
                ref: str, clock: Callable[[], float]) -> Answer:
    """Make one request of the outage phase as an app without retries would; note the answer."""
    sent = clock()
    try:
        if operation == OPERATION:
            payment = Payment(ref=ref, amount=2000, payment_method="pm_card_visa")
            request = session.post(base_url + PATH, data=payment.form())
        else:
            path = operation.split(" ", 1)[1].replace("{customer}", customer)
            request = session.get(base_url + path)
        async with request as resp:
            status, body = resp.status, await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        status, body = 0, b""
    return Answer(operation, sent, clock(), status, error_code(body) if status >= 400 else "")


async def _create_customer(session: aiohttp.ClientSession, base_url: str) -> str:
    """The customer read by the phase's ``GET /v1/customers/{customer}``, made before traffic."""
    async with session.post(base_url + "/v1/customers", data={"email": "demo@example.com"}) as resp:
        resp.raise_for_status()
        customer: Any = await resp.json()
    return str(customer["id"])


async def outage_drill(plan: OutagePlan = OutagePlan(), *, progress: Progress) -> OutageReport:
    """Drive paced traffic through a fresh sidecar while its simulator goes down and comes back.

    The phase ends once a request has succeeded after the outage and every breaker is closed,
    or at ``plan.deadline``.
    """
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(start_simulator(profile="none"))
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=plan.workers),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=aiohttp.ClientTimeout(total=APP_TIMEOUT),
        ))
        customer = await _create_customer(session, sim.url)
        registry = CollectorRegistry()
        sidecar = Sidecar(_sidecar_config(sim.url), registry=registry, log_stream=io.StringIO())
        port = await sidecar.start()
        try:
            answers, timeline = await _drive_outage(
                plan, session, f"http://127.0.0.1:{port}", customer, progress,
                upstream=lambda: int(sim.books()["requests"]),
                outage=lambda down: sim.set_profile("outage" if down else "none"),
                closed=lambda: _breakers_closed(registry),
            )
        finally:
            await sidecar.stop()
    return summarize_outage(plan, answers, timeline, sidecar_view(_metric_samples(registry)))


async def _drive_outage(plan: OutagePlan, session: aiohttp.ClientSession, base_url: str,
                        customer: str, progress: Progress, *, upstream: Callable[[], int],
                        outage: Callable[[bool], None],
                        closed: Callable[[], bool]) -> tuple[list[Answer], OutageTimeline]:
    """Run the workers, switch the outage on and off, and wait for recovery; what happened."""
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    answers: list[Answer] = []
    opened: list[tuple[float, int]] = []  # (when, Stripe's request count) of the first fail-fast
    outage_end = math.inf
    recovered = asyncio.Event()  # a 2xx answer arrived after the outage ended
    stop = asyncio.Event()
    refs = itertools.count()

    async def worker(first: int) -> None:
        turn = first
        while not stop.is_set():
            operation = OUTAGE_OPERATIONS[turn % len(OUTAGE_OPERATIONS)]
            turn += 1
            answer = await _call(session, base_url, operation, customer,
                                 f"outage_{next(refs):06d}", clock)
            answers.append(answer)
            progress.record("succeeded" if answer.ok else "failed")
            if answer.fail_fast and not opened:
                opened.append((answer.received, upstream()))
            elif answer.ok and answer.received >= outage_end:
                recovered.set()
            await asyncio.sleep(plan.pace)

    progress.start("outage", None)
    workers = [asyncio.create_task(worker(w)) for w in range(plan.workers)]
    try:
        await asyncio.sleep(plan.healthy)
        outage_start, upstream_at_start = clock(), upstream()
        outage(True)
        await asyncio.sleep(plan.outage)
        outage(False)
        outage_end, upstream_at_end = clock(), upstream()
        closed_at: float | None = None
        # Poll with a deadline: the breakers close on the sidecar's clock, not on an event here.
        while clock() < plan.deadline:
            if closed_at is None and closed():
                closed_at = clock()
            if closed_at is not None and recovered.is_set():
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        progress.finish()
    timeline = OutageTimeline(
        outage_start=outage_start,
        outage_end=outage_end,
        upstream_at_start=upstream_at_start,
        upstream_at_end=upstream_at_end,
        opened_at=opened[0][0] if opened else None,
        upstream_at_open=opened[0][1] if opened else 0,
        closed_at=closed_at,
        seconds=clock(),
    )
    return answers, timeline


async def _limit_call(session: aiohttp.ClientSession, base_url: str, i: int, started: float,
                      answers: list[LimitAnswer], progress: Progress) -> None:
    """One request of the rate-limit phase, as an app without retries makes it."""
    try:
        if i % len(LIMIT_OPERATIONS) == 0:
            payment = Payment(ref=f"limit_{i:06d}", amount=1500, payment_method="pm_card_visa")
            request = session.post(base_url + PATH, data=payment.form())
        else:
            request = session.get(base_url + "/v1/balance")
        async with request as resp:
            status, body = resp.status, await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        status, body = 0, b""
    answers.append(LimitAnswer(started, status, error_code(body) if status >= 400 else ""))
    progress.record("succeeded" if 200 <= status < 300 else "failed")


async def _offer(plan: RateLimitPlan, base_url: str, books: Callable[[], dict[str, Any]],
                 progress: Progress, label: str) -> tuple[list[LimitAnswer], dict[str, Any], float]:
    """Start ``plan.offered`` requests/s for ``plan.seconds``, whatever comes back (open loop).

    Returns the answers, the books at the settle time, and the run time.
    """
    answers: list[LimitAnswer] = []
    at_settle: dict[str, Any] = {}
    total = round(plan.offered * plan.seconds)
    progress.start(label, total)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=aiohttp.ClientTimeout(total=APP_TIMEOUT),
    ) as session:
        t0 = time.perf_counter()
        tasks = []
        for i in range(total):
            started = i / plan.offered
            delay = t0 + started - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the app's schedule: it never waits for an answer
            if not at_settle and started >= plan.settle:
                at_settle = books()
            tasks.append(asyncio.create_task(
                _limit_call(session, base_url, i, started, answers, progress)))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - t0
    progress.finish()
    return answers, at_settle, seconds


async def rate_limit_push(plan: RateLimitPlan = RateLimitPlan(), *,
                          progress: Progress) -> RateLimitReport:
    """Offer more than the account's limit directly, then through a fresh sidecar."""
    profile = FaultProfile(account_rate=plan.limit)
    runs = []
    for label in ("direct", "through sidecar"):
        async with start_simulator(profile=profile) as sim:
            base_url = sim.url
            sidecar = None
            if label != "direct":
                sidecar = Sidecar(_sidecar_config(sim.url), registry=CollectorRegistry(),
                                  log_stream=io.StringIO())
                base_url = f"http://127.0.0.1:{await sidecar.start()}"
            try:
                answers, at_settle, seconds = await _offer(plan, base_url, sim.books, progress,
                                                           f"rate limit, {label}")
            finally:
                if sidecar is not None:
                    await sidecar.stop()
            runs.append(summarize_limit(label, plan, answers, at_settle, sim.books(), seconds))
    return RateLimitReport(plan, runs[0], runs[1])


async def run_demo(*, requests: int = 600, concurrency: int = 20, profile: str = "bad_day",
                   seed: int = 7, outage: bool = True, rate_limit: bool = True,
                   key_failover: bool = True, outbox: bool = True) -> int:
    """Run the comparison, then the outage, rate-limit, key-failover and outbox phases (each
    can be left out).

    Everything is printed on stdout; returns the exit status.

    A missed target is printed as such; the exit status stays 0.
    """
    problems = []
    if requests < 1:
        problems.append(f"--requests: {requests} is not a positive integer")
    if concurrency < 1:
        problems.append(f"--concurrency: {concurrency} is not a positive integer")
    try:
        resolve_profile(profile)
    except ValueError as exc:
        problems.append(f"--profile: {exc}")
    if problems:
        for problem in problems:
            print(f"stripe-sidecar demo: {problem}", file=sys.stderr)
        return 2
    progress = Progress(sys.stderr)
    comparison = await compare(requests=requests, concurrency=concurrency, profile=profile,
                               seed=seed, progress=progress)
    sys.stdout.write(render(comparison))
    sys.stdout.flush()
    if outage:
        report = await outage_drill(progress=progress)
        sys.stdout.write("\n" + render_outage(report))
        sys.stdout.flush()
    if rate_limit:
        limits = await rate_limit_push(progress=progress)
        sys.stdout.write("\n" + render_rate_limit(limits))
        sys.stdout.flush()
    if key_failover:
        from proxy.demo_keys import (
            KeyPhasePlan,
            key_failover_phase,
            key_phase_intro,
            render_key_phase,
        )

        plan = KeyPhasePlan()
        sys.stdout.write("\n" + key_phase_intro(plan))
        keys = await key_failover_phase(plan, out=sys.stdout)
        sys.stdout.write("\n" + render_key_phase(keys))
        sys.stdout.flush()
    if outbox:
        from proxy.demo_outbox import (
            OutboxPhasePlan,
            outbox_phase,
            outbox_phase_intro,
            render_outbox_phase,
        )

        outbox_plan = OutboxPhasePlan()
        sys.stdout.write("\n" + outbox_phase_intro(outbox_plan))
        sys.stdout.flush()
        queued = await outbox_phase(outbox_plan)
        sys.stdout.write(render_outbox_phase(queued))
        sys.stdout.flush()
    return 0
