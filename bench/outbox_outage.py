"""The outbox's headline: writes accepted during an outage, performed exactly once afterwards.

    .venv/bin/python bench/outbox_outage.py                       # SQLite, 1 replica, 60 s, 1000
    .venv/bin/python bench/outbox_outage.py --store redis://127.0.0.1:6379/0 --replicas 2

One run, on loopback, against the built-in simulator (in this process) and real sidecar
processes (``python -m proxy serve``) with ``POST /v1/customers`` on ``fallback: queue``:

1. The simulator goes down (every request gets an HTML 503). An app sends ``--writes``
   customer creations, paced over the first two thirds of the outage, round robin over the
   replicas, each under its own Idempotency-Key (as every Stripe SDK does) and tagged
   ``metadata[ref]``; it resends a write, under the same key, until it is answered ``202``.
2. Half way through the writes, replica 0 is killed with SIGKILL (acknowledgements in flight)
   and started again on the same store.
3. The outage ends. Once a third of the writes have been performed, replica 0 is killed
   with SIGKILL again (deliveries in flight) and started again.
4. When every item is settled, the simulator's books say how many writes Stripe performed:
   lost = acknowledged writes never performed, duplicates = writes performed twice.

A SQLite store belongs to one sidecar, so ``--replicas`` above 1 needs a shared store
(``redis://``), or a ``{replica}`` in the SQLite URL (one file each; a killed replica's
items then wait for it). Exit status 0 when all were acknowledged, none lost, none twice.
Benchmarks are never tests; ``tests/test_outbox_kill.py`` runs this at a small scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.simulator import start_simulator
from proxy.simulator.faults import FaultProfile
from proxy.simulator.runner import SimulatorHandle

KEY = "sk_test_outboxbench0000000000000000"
OPERATION = "POST /v1/customers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One ``stripe-sidecar serve`` process, restartable on the same port and store."""

    def __init__(
        self, n: int, workdir: Path, upstream: str, store: str, extra: dict[str, Any]
    ) -> None:
        self.n = n
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"sidecar-{n}.log"
        config: dict[str, Any] = {
            "server": {"listen": f"127.0.0.1:{self.port}", "drain_period": 0},
            "upstream": {"override": upstream},
            "operations": {OPERATION: {"fallback": "queue"}},
            "outbox": {"store": store.replace("{replica}", str(n))},
        }
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        self.config_path = workdir / f"sidecar-{n}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    async def start(self) -> None:
        """Start the process and wait until it answers /ready."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(self.url + "/ready") as resp:
                        if resp.status == 200:
                            return
                assert time.monotonic() < deadline, "the sidecar never became ready"
                await asyncio.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, nothing flushed that was not flushed already."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_events(self, name: str) -> int:
        needle = f'"event":"{name}"'
        return sum(needle in line for line in self.log_path.read_text().splitlines())


@dataclass
class Report:
    """What one run measured."""

    store: str
    replicas: int
    outage: float
    writes: int
    acknowledged: int = 0
    ack_latencies: list[float] = field(default_factory=list)
    resends: int = 0  # sends of an already-sent write (after a kill, or a non-202 answer)
    not_202: dict[str, int] = field(default_factory=dict)
    kills: list[str] = field(default_factory=list)
    performed: int = 0
    lost: int = 0
    duplicates: int = 0
    replays: int = 0
    stripe_requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    delivered_after: float | None = None  # seconds from the outage's end to the last write
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.acknowledged == self.writes and self.lost == 0 and self.duplicates == 0

    def text(self) -> str:
        lat = sorted(self.ack_latencies) or [0.0]
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        lines = [
            f"store {self.store}, {self.replicas} replica(s), outage {self.outage:.0f} s, "
            f"{self.writes} writes",
            "",
            f"writes acknowledged 202                 {self.acknowledged} / {self.writes}",
            f"  ack latency p50 / p99 (ms)            {p50:.1f} / {p99:.1f}",
            f"  resends by the app (same key)         {self.resends}"
            + (f"  ({', '.join(f'{k}: {v}' for k, v in sorted(self.not_202.items()))})"
               if self.not_202 else ""),
            f"SIGKILLs                                {'; '.join(self.kills)}",
            "",
            "the simulator's books",
            f"  writes performed                      {self.performed}",
            f"  lost (acknowledged, never performed)  {self.lost}",
            f"  duplicates (performed twice)          {self.duplicates}",
            f"  idempotent replays                    {self.replays}",
            f"  {OPERATION} requests received  {self.stripe_requests}",
            "",
            f"outbox states at the end                {json.dumps(self.counts)}",
            "last write performed (s after the outage's end)   "
            + (f"{self.delivered_after:.1f}" if self.delivered_after is not None else "never"),
            f"run time (s)                            {self.elapsed:.1f}",
            "",
            "result: " + ("OK: 0 lost, 0 duplicates" if self.ok else "FAILED"),
        ]
        return "\n".join(lines)


async def _send_all(
    replicas: list[Replica], writes: int, window: float, report: Report, concurrency: int,
    on_acked: Any,
) -> None:  # fmt: skip
    """Pace ``writes`` over ``window`` seconds; resend each (same key) until answered 202."""
    gap = window / max(1, writes)
    start = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    rr = {"next": 0}

    def pick() -> Replica | None:
        for _ in range(len(replicas)):
            r = replicas[rr["next"] % len(replicas)]
            rr["next"] += 1
            if r.alive:
                return r
        return None

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        key = f"bench-{uuid.uuid4().hex}"
        form = {"email": f"w{i}@example.com", "metadata[ref]": f"w{i}"}
        headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": key}
        sent_before = False
        async with sem:
            while True:
                replica = pick()
                if replica is None:  # every replica is down (being restarted)
                    await asyncio.sleep(0.05)
                    continue
                if sent_before:
                    report.resends += 1
                sent_before = True
                t0 = time.monotonic()
                try:
                    async with session.post(replica.url + "/v1/customers", data=form,
                                            headers=headers) as resp:  # fmt: skip
                        await resp.read()
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError, OSError):
                    status = 0
                if status == 202:
                    report.acknowledged += 1
                    report.ack_latencies.append(time.monotonic() - t0)
                    on_acked()
                    return
                label = "connection lost" if status == 0 else f"HTTP {status}"
                report.not_202[label] = report.not_202.get(label, 0) + 1
                await asyncio.sleep(0.1)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        for i in range(writes):
            delay = start + i * gap - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
        await asyncio.gather(*tasks)


async def _counts(replicas: list[Replica], shared: bool) -> dict[str, int]:
    """Outbox states (summed over replicas with their own stores)."""
    total: dict[str, int] = {}
    async with aiohttp.ClientSession() as s:
        for r in replicas if not shared else replicas[:1]:
            async with s.get(r.url + "/outbox?limit=1") as resp:
                doc = await resp.json()
            for state, n in doc["counts"].items():
                total[state] = total.get(state, 0) + n
    return total


async def run(
    *,
    store: str,
    replicas: int = 1,
    outage: float = 60.0,
    writes: int = 1000,
    concurrency: int = 50,
    workdir: Path,
    sidecar_config: dict[str, Any] | None = None,
    settle_timeout: float = 300.0,
    delivery_work: float = 0.01,
    progress: Any = None,
) -> Report:
    """One run: outage, writes, two SIGKILLs, recovery; the books at the end."""
    say = progress or (lambda text: None)
    shared = not store.startswith("sqlite:")
    if replicas > 1 and not shared and "{replica}" not in store:
        raise ValueError("one SQLite file belongs to one sidecar: use {replica} in the URL")
    report = Report(store=store, replicas=replicas, outage=outage, writes=writes)
    t_start = time.monotonic()
    async with start_simulator(profile="outage") as sim:
        fleet = [Replica(n, workdir, sim.url, store, sidecar_config or {}) for n in range(replicas)]
        try:
            await asyncio.gather(*(r.start() for r in fleet))
            say(f"{replicas} sidecar(s) up; outage begins")
            victim = fleet[0]
            killed = asyncio.Event()

            def on_acked() -> None:
                if report.acknowledged == writes // 2 and not killed.is_set():
                    killed.set()

            async def kill_during_acks() -> None:
                await killed.wait()
                victim.kill()
                report.kills.append(f"during acknowledgement (after {report.acknowledged} acks)")
                say(f"SIGKILL replica 0 after {report.acknowledged} acks; restarting")
                await victim.start()

            t_outage = time.monotonic()
            killer = asyncio.create_task(kill_during_acks())
            await _send_all(fleet, writes, outage * 2 / 3, report, concurrency, on_acked)
            await killer
            say(f"{report.acknowledged} acknowledged; waiting for the outage's end")
            await asyncio.sleep(max(0.0, t_outage + outage - time.monotonic()))
            sim.set_profile(FaultProfile(work_seconds=delivery_work))
            t_back = time.monotonic()
            say("outage over; delivering")
            await _kill_during_delivery(sim, victim, writes, report, say)
            deadline = time.monotonic() + settle_timeout
            last_seen = 0
            while True:
                books = sim.books()
                n = len([r for r in books["refs"] if r.startswith("w")])
                if n > last_seen:
                    last_seen = n
                    report.delivered_after = time.monotonic() - t_back
                counts = await _counts(fleet, shared)
                if counts.get("queued", 0) + counts.get("delivering", 0) == 0 and n >= writes:
                    break
                if time.monotonic() > deadline:
                    say(f"gave up waiting: {counts}")
                    break
                await asyncio.sleep(0.2)
            report.counts = counts
        finally:
            for r in fleet:
                r.stop()
        books = sim.books()
    refs = {k: v for k, v in books["refs"].items() if k.startswith("w")}
    report.performed = len(refs)
    report.lost = len({f"w{i}" for i in range(writes)} - refs.keys())
    report.duplicates = sum(v - 1 for v in refs.values() if v > 1)
    report.replays = books["replays"]
    report.stripe_requests = books["by_operation"].get(OPERATION, 0)
    report.elapsed = time.monotonic() - t_start
    return report


async def _kill_during_delivery(
    sim: SimulatorHandle, victim: Replica, writes: int, report: Report, say: Any
) -> None:
    """SIGKILL replica 0 once a third of the writes are performed, then start it again."""
    target = max(1, writes // 3)
    deadline = time.monotonic() + 300
    while len(sim.books()["refs"]) < target:
        if time.monotonic() > deadline:
            say("deliveries never reached a third; no kill during delivery")
            return
        await asyncio.sleep(0.01)
    done = len(sim.books()["refs"])
    victim.kill()
    report.kills.append(f"during delivery (after {done} performed)")
    say(f"SIGKILL replica 0 after {done} writes performed; restarting")
    await victim.start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None,
                   help="outbox store URL (default: a SQLite file in a temporary directory)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--outage", type=float, default=60.0, help="seconds")
    p.add_argument("--writes", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50, help="app requests in flight")
    p.add_argument("--lease", type=float, default=None,
                   help="outbox.lease (a killed replica's items are claimed again after it)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        store = args.store or f"sqlite:///{tmp}/outbox-{{replica}}.db"
        extra = {"outbox": {"lease": args.lease}} if args.lease else {}
        report = asyncio.run(run(
            store=store, replicas=args.replicas, outage=args.outage, writes=args.writes,
            concurrency=args.concurrency, workdir=Path(tmp), sidecar_config=extra,
            progress=lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True),
        ))  # fmt: skip
        print()
        print(report.text())
        for n in range(args.replicas):
            log = Path(tmp) / f"sidecar-{n}.log"
            errors = [line for line in log.read_text().splitlines() if '"level":"error"' in line]
            if errors:
                print(f"\nreplica {n}: {len(errors)} error log line(s), first: {errors[0][:300]}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
