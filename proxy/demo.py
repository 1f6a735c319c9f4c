"""The demo: one payment workload against a faulty simulator, directly and through the sidecar.

Two simulators run with the same fault profile and seed, so both runs face the same kinds and
rates of faults; a sidecar sits in front of the second. The workload is a typical app that never
retries and sends no Idempotency-Key. Every number in the comparison is measured: what the app
saw, and the simulator's books (what Stripe actually executed).

The pure part (planning payments, classifying answers, summing up, rendering) takes plain values;
:func:`compare` and :func:`run_demo` are the I/O shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
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
from proxy.simulator import start_simulator
from proxy.simulator.faults import resolve_profile

__all__ = ["Comparison", "RunReport", "SidecarCounts", "compare", "render", "run_demo"]

OPERATION: Final = "POST /v1/payment_intents"
PATH: Final = "/v1/payment_intents"
API_KEY: Final = "sk_test_demo0000000000000000000000"
# One payment in DECLINE_EVERY uses a declining test card: a 402 is a business answer.
DECLINE_EVERY: Final = 20
# Longer than the sidecar's 20 s retry deadline, so the sidecar, not the app, gives up first.
APP_TIMEOUT: Final = 30.0
# Stripe's default limits would throttle a demo that sends hundreds of payments a second.
DEMO_RATE: Final = 1000.0

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


def classify_answer(status: int, body: bytes) -> tuple[Result, str]:
    """What an app that does not retry makes of one answer: succeeded, declined or failed."""
    if status == 402:
        return "declined", "HTTP 402"
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if status == 200:
        if isinstance(parsed, dict) and parsed.get("status") == "succeeded":
            return "succeeded", ""
        return "failed", "HTTP 200 without a succeeded payment"
    code = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        code = parsed["error"].get("code")
    return "failed", f"HTTP {status} {code}" if isinstance(code, str) and code else f"HTTP {status}"


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
        "defaults, rate limits raised so that they do not throttle the demo.\n\n"
        + render_table(c.direct, c.sidecar)
        + "\n"
        + render_summary(c.direct, c.sidecar, c.counts)
        + f"\nRun time: direct {c.direct.seconds:.1f} s, through sidecar "
        f"{c.sidecar.seconds:.1f} s.\n"
    )


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
        self._total = 0
        self._counts: Counter[Result] = Counter()
        self._last = -math.inf
        self._started = 0.0

    def start(self, phase: str, total: int) -> None:
        """Begin a phase of ``total`` payments."""
        self._phase, self._total = phase, total
        self._counts = Counter()
        self._last = -math.inf
        self._started = self._clock()
        self._show(force=True)

    def record(self, result: Result) -> None:
        """Count one finished payment; redraw if the last drawing is old enough."""
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
        line = (f"[{self._phase}] {done}/{self._total}  ok {c['succeeded']}  "
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
    """The sidecar's defaults, pointed at ``upstream_url``, with rate limits that never bind."""
    return config_from_dict(
        {
            "server": {"listen": "127.0.0.1:0", "shutdown_grace": 2.0},
            "upstream": {"override": upstream_url},
            "ratelimit": {
                "global_rate": DEMO_RATE,
                "global_burst": DEMO_RATE,
                "endpoint_rate": DEMO_RATE,
                "endpoint_burst": DEMO_RATE,
            },
        },
        source="demo",
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
    samples = (
        (sample.name, sample.labels, sample.value)
        for family in registry.collect()
        for sample in family.samples
    )
    return Comparison(profile, seed, concurrency, direct, behind, sidecar_counts(samples))


async def run_demo(*, requests: int = 600, concurrency: int = 20, profile: str = "bad_day",
                   seed: int = 7) -> int:
    """Run the comparison, print the table and summary on stdout; the exit status."""
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
    comparison = await compare(requests=requests, concurrency=concurrency, profile=profile,
                               seed=seed, progress=Progress(sys.stderr))
    sys.stdout.write(render(comparison))
    sys.stdout.flush()
    return 0
