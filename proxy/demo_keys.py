"""The demo's key-failover phase: the primary API key revoked while the app is paying.

A fresh sidecar holds two keys of the simulator's account (primary first) and the app sends
none of its own. Paced payments and reads run for a few seconds; part way, the primary key is
revoked in the simulator. Stripe answers the next call 401, the sidecar retries it at once with
the second key and keeps using that one, and the app sees no error. The diagnoses and healing
actions are printed as the engine publishes them, then a short table of what the app saw.

The pure part (:class:`KeyPhaseReport`, :func:`render_key_phase`) takes plain values;
:func:`key_failover_phase` is the I/O shell.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Final

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.app import Sidecar
from proxy.config import config_from_dict
from proxy.diagnosis import DiagnosisEvent, HealingAction
from proxy.keys import mask
from proxy.simulator import start_simulator

__all__ = [
    "KeyPhasePlan", "KeyPhaseReport", "key_failover_phase", "key_phase_intro", "render_key_phase"
]

PRIMARY: Final = "sk_test_demoPrimaryKey0000000000a1b2"
SECOND: Final = "sk_test_demoSecondKey00000000000c3d4"
# The app holds no Stripe key: the sidecar does. SDKs insist on some key, so it sends this.
APP_KEY: Final = "sk_test_app_holds_no_key"


@dataclass(frozen=True, slots=True)
class KeyPhasePlan:
    """How the phase runs: healthy for a while, then the primary key revoked."""

    workers: int = 4
    pace: float = 0.02  # seconds each worker waits between its requests
    healthy: float = 1.0  # seconds before the primary key is revoked
    after: float = 2.0  # seconds of traffic after that


@dataclass(slots=True)
class KeyPhaseReport:
    """What the app saw, and what the sidecar said and did, in the phase."""

    plan: KeyPhasePlan
    statuses: list[int] = field(default_factory=list)
    switched: int = 0  # answers that came on the second key after a 401 (Sidecar-Attempts > 1)
    events: list[str] = field(default_factory=list)  # as printed, "t s  what"
    revoked_at: float = 0.0
    key_in_use: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        """Answers the app would treat as failures (not 2xx)."""
        return sum(1 for s in self.statuses if not 200 <= s < 300)


def key_phase_intro(plan: KeyPhasePlan) -> str:
    """What the phase does, printed before it runs (its events follow as they happen)."""
    head = (
        f"Key failover: the sidecar holds two keys of one Stripe account ({mask(PRIMARY)} "
        f"primary, {mask(SECOND)}); the app holds none. {plan.workers} workers pay and read for "
        f"{plan.healthy + plan.after:g} s; after {plan.healthy:g} s the primary key is revoked. "
        "Diagnoses and healing actions as they happen:"
    )
    return textwrap.fill(head, width=96) + "\n\n"


def render_key_phase(report: KeyPhaseReport) -> str:
    """The app's view of the phase, after its events."""
    target = "ok" if report.failed == 0 else "MISSED"
    lines = [
        f"{'app requests':<40}{len(report.statuses):>8}",
        f"{'failed (target 0)':<40}{report.failed:>8}  {target}",
        f"{'answered on the second key after a 401':<40}{report.switched:>8}",
        f"{'key in use at the end':<40}{report.key_in_use:>8}",
        "",
        f"Run time: {report.seconds:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def _describe_event(event: DiagnosisEvent) -> str:
    d = event.diagnosis
    return f"diagnosis {event.type}: {d.kind} ({d.severity}): {d.summary}"


def _describe_action(action: HealingAction) -> str:
    return f"action {action.kind} [{action.result}]: {action.reason}"


async def _traffic(plan: KeyPhasePlan, base: str, report: KeyPhaseReport,
                   stop: asyncio.Event) -> None:
    refs = itertools.count()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {APP_KEY}"}) as session:

        async def worker(first: int) -> None:
            turn = first
            while not stop.is_set():
                turn += 1
                if turn % 2:
                    request = session.post(base + "/v1/payment_intents", data={
                        "amount": "1000", "currency": "usd", "confirm": "true",
                        "payment_method": "pm_card_visa", "metadata[ref]": f"key_{next(refs)}"})
                else:
                    request = session.get(base + "/v1/balance")
                try:
                    async with request as resp:
                        await resp.read()
                        report.statuses.append(resp.status)
                        if int(resp.headers.get("Sidecar-Attempts", "1")) > 1:
                            report.switched += 1
                except (TimeoutError, aiohttp.ClientError):
                    report.statuses.append(0)
                await asyncio.sleep(plan.pace)

        await asyncio.gather(*(worker(w) for w in range(plan.workers)))


async def key_failover_phase(plan: KeyPhasePlan = KeyPhasePlan(), *,
                             out: IO[str] | None = None) -> KeyPhaseReport:
    """Run the phase; each diagnosis and action is also written to ``out`` as it happens."""
    report = KeyPhaseReport(plan)
    t0 = time.perf_counter()

    def note(text: str) -> None:
        line = f"{time.perf_counter() - t0:5.2f} s  {text}"
        report.events.append(line)
        if out is not None:
            out.write(f"  {line}\n")
            out.flush()

    async with start_simulator(profile="none") as sim:
        config = config_from_dict({
            "server": {"listen": "127.0.0.1:0", "drain_period": 0, "shutdown_grace": 2.0},
            "upstream": {"override": sim.url},
        }, source="demo")  # fmt: skip
        sidecar = Sidecar(config, registry=CollectorRegistry(), log_stream=io.StringIO(),
                          secret_keys=[PRIMARY, SECOND])  # fmt: skip
        sidecar.diagnosis.subscribe(lambda e: note(_describe_event(e)))
        sidecar.diagnosis.subscribe_actions(lambda a: note(_describe_action(a)))
        base = f"http://127.0.0.1:{await sidecar.start()}"
        try:
            await _until(lambda: sidecar.keeper is not None and sidecar.keeper.rounds > 0, 5.0)
            t0 = time.perf_counter()
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(plan, base, report, stop))
            await asyncio.sleep(plan.healthy)
            report.revoked_at = time.perf_counter() - t0
            note(f"the primary key {mask(PRIMARY)} is revoked in the simulator")
            sim.revoke_key(PRIMARY)
            await asyncio.sleep(plan.after)
            stop.set()
            await traffic
            report.seconds = time.perf_counter() - t0
            assert sidecar.keys is not None
            report.key_in_use = sidecar.keys.active.label
        finally:
            await sidecar.stop()
    return report


async def _until(check: Callable[[], bool], deadline: float) -> None:
    """Poll ``check`` until true or ``deadline`` seconds passed (the keys' first check)."""
    end = time.perf_counter() + deadline
    while not check() and time.perf_counter() < end:
        await asyncio.sleep(0.01)
