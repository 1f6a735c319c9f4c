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
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final, Literal

import aiohttp

from proxy.app import Sidecar
from proxy.config import config_from_dict
from proxy.simulator import start_simulator
from proxy.simulator.faults import resolve_profile

__all__ = ["Comparison", "RunReport", "compare", "render", "run_demo"]

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
    )


@dataclass(frozen=True, slots=True)
class Comparison:
    """Both runs of the demo, and how they were set up."""

    profile: str
    seed: int
    concurrency: int
    direct: RunReport
    sidecar: RunReport


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


def _failure_list(failures: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {detail}" for detail, count in failures.items())


def render_summary(direct: RunReport, sidecar: RunReport) -> str:
    """A few plain-English sentences on what the table shows."""
    lines: list[str] = []
    recovered = direct.failed - sidecar.failed
    if recovered > 0:
        head = f"The sidecar recovered {recovered} of the {direct.failed} failures the app saw " \
               "directly"
    elif recovered == 0:
        head = f"The sidecar left as many failures as the direct run ({sidecar.failed})"
    else:
        head = f"The sidecar ended with {-recovered} more failures than the direct run"
    extra = sidecar.attempts_per_payment - 1.0
    lines.append(
        f"{head}, created {sidecar.duplicates} duplicate charges and lost "
        f"{sidecar.lost_writes} writes, at {extra:+.2f} upstream attempts per payment."
    )
    if direct.failed:
        lines.append(
            f"Directly, {direct.failed} payments failed ({_failure_list(direct.failures)}); "
            f"{direct.lost_writes} of them were executed by Stripe anyway (lost writes: the app "
            f"cannot tell whether to charge again) and {direct.duplicates} were charged twice."
        )
    if sidecar.failed:
        lines.append(
            f"Through the sidecar, {sidecar.failed} still failed "
            f"({_failure_list(sidecar.failures)})."
        )
    if sidecar.declined or direct.declined:
        lines.append(
            f"Card declines ({sidecar.declined} through the sidecar, {direct.declined} directly) "
            "are business answers: passed through as 402, not retried."
        )
    return "\n".join(lines) + "\n"


def render(comparison: Comparison) -> str:
    """Everything the demo prints on stdout: set-up, table, summary, timings."""
    c = comparison
    return (
        f"{c.direct.attempted} payments, concurrency {c.concurrency}, fault profile "
        f"{c.profile!r}, seed {c.seed}; the app neither retries nor sends Idempotency-Keys.\n\n"
        + render_table(c.direct, c.sidecar)
        + "\n"
        + render_summary(c.direct, c.sidecar)
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

    def start(self, phase: str, total: int) -> None:
        """Begin a phase of ``total`` payments."""
        self._phase, self._total = phase, total
        self._counts = Counter()
        self._last = -math.inf
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
                f"declined {c['declined']}  failed {c['failed']}")
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


def _sidecar_config(upstream_url: str) -> Any:
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
        sidecar = Sidecar(_sidecar_config(sim_behind.url), log_stream=io.StringIO())
        port = await sidecar.start()
        try:
            behind = await _run_phase("through sidecar", f"http://127.0.0.1:{port}", payments,
                                      concurrency, progress, sim_behind.books)
        finally:
            await sidecar.stop()
    return Comparison(profile, seed, concurrency, direct, behind)


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
