"""The demo's outbox phase: payments accepted during an outage, performed exactly once after it.

A fresh sidecar has ``POST /v1/payment_intents`` on ``fallback: queue`` (payments the business
accepts asynchronously) and an outbox in a temporary SQLite file. The simulator goes down;
an app that never retries sends paced payments, each answered ``202`` (queued) instead of an
error. Then Stripe comes back and the sidecar delivers them under their Idempotency-Keys; the
simulator's books say how many Stripe performed, and how many twice.

The pure part (:class:`OutboxPhaseReport`, :func:`render_outbox_phase`) takes plain values;
:func:`outbox_phase` is the I/O shell.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.app import Sidecar
from proxy.config import config_from_dict
from proxy.simulator import start_simulator

__all__ = [
    "OutboxPhasePlan",
    "OutboxPhaseReport",
    "outbox_phase",
    "outbox_phase_intro",
    "render_outbox_phase",
]

APP_KEY: Final = "sk_test_demoOutbox000000000000000"
OPERATION: Final = "POST /v1/payment_intents"


@dataclass(frozen=True, slots=True)
class OutboxPhasePlan:
    """How the phase runs."""

    payments: int = 100
    outage: float = 4.0  # seconds Stripe is down; the payments are sent in the first 3/4
    settle: float = 30.0  # at most this long for the deliveries after the outage


@dataclass(slots=True)
class OutboxPhaseReport:
    """What the app saw, what the outbox did and what Stripe's books say."""

    plan: OutboxPhasePlan
    statuses: dict[int, int] = field(default_factory=dict)
    during_outage_requests: int = 0  # payment requests Stripe got while it was down
    performed: int = 0
    duplicates: int = 0
    lost: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    delivered_after: float | None = None  # s from Stripe's return to the last payment performed
    seconds: float = 0.0

    @property
    def queued(self) -> int:
        """Payments answered 202."""
        return self.statuses.get(202, 0)


def outbox_phase_intro(plan: OutboxPhasePlan) -> str:
    """What the phase does, printed before it runs."""
    text = (
        f"Outbox: {OPERATION} has fallback: queue. Stripe goes down for {plan.outage:g} s; an "
        f"app that never retries sends {plan.payments} payments meanwhile. Each is stored in "
        "the outbox (SQLite) and answered 202; when Stripe is back the sidecar sends each "
        "under its own Idempotency-Key."
    )
    return textwrap.fill(text, width=96) + "\n\n"


def render_outbox_phase(report: OutboxPhaseReport) -> str:
    """The phase's table: each number with a target is marked ok or MISSED."""
    p = report.plan

    def mark(good: bool) -> str:
        return "ok" if good else "MISSED"

    others = sum(n for status, n in report.statuses.items() if status != 202)
    after = f"{report.delivered_after:.1f}" if report.delivered_after is not None else "never"
    lines = [
        f"{'payments sent during the outage':<44}{p.payments:>8}",
        f"{'  answered 202 (queued)':<44}{report.queued:>8}  {mark(report.queued == p.payments)}",
        f"{'  answered otherwise':<44}{others:>8}",
        f"{'  reached Stripe while it was down':<44}{report.during_outage_requests:>8}",
        "the simulator's books after the outage",
        f"{'  payments performed':<44}{report.performed:>8}  "
        f"{mark(report.performed == report.queued)}",
        f"{'  performed twice (target 0)':<44}{report.duplicates:>8}  "
        f"{mark(report.duplicates == 0)}",
        f"{'  queued, never performed (target 0)':<44}{report.lost:>8}  {mark(report.lost == 0)}",
        f"{'last performed (s after Stripe came back)':<44}{after:>8}",
        "outbox at the end: " + ", ".join(f"{k} {v}" for k, v in report.counts.items()),
        "",
        f"Run time: {report.seconds:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


async def _send(plan: OutboxPhasePlan, base: str, report: OutboxPhaseReport) -> None:
    gap = plan.outage * 0.75 / plan.payments
    t0 = time.monotonic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {APP_KEY}"}) as session:

        async def pay(i: int) -> None:
            form = {"amount": "1500", "currency": "usd", "confirm": "true",
                    "payment_method": "pm_card_visa", "metadata[ref]": f"outbox_{i}"}  # fmt: skip
            try:
                async with session.post(base + "/v1/payment_intents", data=form) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            report.statuses[status] = report.statuses.get(status, 0) + 1

        tasks = []
        for i in range(plan.payments):
            await asyncio.sleep(max(0.0, t0 + i * gap - time.monotonic()))
            tasks.append(asyncio.create_task(pay(i)))
        await asyncio.gather(*tasks)


async def outbox_phase(plan: OutboxPhasePlan = OutboxPhasePlan()) -> OutboxPhaseReport:
    """Run the phase against a fresh simulator and sidecar."""
    report = OutboxPhaseReport(plan)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stripe-sidecar-demo-") as tmp:
        async with start_simulator(profile="outage") as sim:
            config = config_from_dict({
                "server": {"listen": "127.0.0.1:0", "drain_period": 0, "shutdown_grace": 2.0},
                "upstream": {"override": sim.url},
                "operations": {OPERATION: {"fallback": "queue"}},
                # Short waits so the demo is short: breakers open for 1 s, and the outbox
                # looks every 0.2 s and waits at most 2 s between rounds (defaults 5, 1, 60).
                "breaker": {"open_duration": 1.0, "open_duration_max": 1.0},
                "host_breaker": {"open_duration": 1.0, "open_duration_max": 1.0},
                "outbox": {"store": f"sqlite:///{tmp}/outbox.db", "poll_interval": 0.2,
                           "backoff_max": 2.0},
            }, source="demo")  # fmt: skip
            sidecar = Sidecar(config, registry=CollectorRegistry(), log_stream=io.StringIO())
            base = f"http://127.0.0.1:{await sidecar.start()}"
            try:
                outage_end = time.monotonic() + plan.outage
                await _send(plan, base, report)
                await asyncio.sleep(max(0.0, outage_end - time.monotonic()))
                report.during_outage_requests = _payment_requests(sim.books())
                sim.set_profile("none")
                back = time.monotonic()
                await _settle(sidecar, sim, report, back, plan.settle)
            finally:
                await sidecar.stop()
            books = sim.books()
    refs = {k: v for k, v in books["refs"].items() if k.startswith("outbox_")}
    report.performed = len(refs)
    report.duplicates = sum(n - 1 for n in refs.values() if n > 1)
    report.lost = max(0, report.queued - report.performed)
    report.seconds = time.monotonic() - t0
    return report


def _payment_requests(books: dict[str, Any]) -> int:
    return int(books["by_operation"].get(OPERATION, 0))


async def _settle(sidecar: Sidecar, sim: Any, report: OutboxPhaseReport, back: float,
                  limit: float) -> None:  # fmt: skip
    """Wait until nothing is left to deliver (or ``limit`` seconds), noting the last write."""
    seen = 0
    end = back + limit
    while time.monotonic() < end:
        n = sum(1 for k in sim.books()["refs"] if k.startswith("outbox_"))
        if n > seen:
            seen, report.delivered_after = n, time.monotonic() - back
        await sidecar.outbox.refresh()
        report.counts = {k: v for k, v in sidecar.outbox.counts.items()}
        if report.counts["queued"] + report.counts["delivering"] == 0 and n >= report.queued:
            return
        await asyncio.sleep(0.05)
