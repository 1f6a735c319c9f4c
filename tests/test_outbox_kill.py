"""SIGKILL and the outbox, with real processes: nothing acknowledged is lost, nothing runs twice.

`bench/outbox_outage.py` at a small scale: real `stripe-sidecar serve` processes on one SQLite
store, the simulator down, an app sending writes under its own Idempotency-Keys and resending
any not answered 202; the sidecar is SIGKILLed during the acknowledgements and again during the
deliveries, and started again on the same file each time. The simulator's books then count
every write performed exactly once.
"""

from __future__ import annotations

from pathlib import Path

from bench.outbox_outage import run

FAST = {
    # Give up on Stripe fast, come back fast: the test takes seconds, not minutes.
    "retry": {"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.05, "deadline": 2.0},
    "breaker": {"open_duration": 0.3, "open_duration_max": 0.3},
    "host_breaker": {"open_duration": 0.3, "open_duration_max": 0.3},
    "outbox": {"poll_interval": 0.1, "backoff_base": 0.1, "backoff_max": 0.3, "lease": 5.0},
}


async def test_sigkill_during_acks_and_during_delivery_loses_nothing_twice_nothing(tmp_path: Path) -> None:
    """Two SIGKILLs (acknowledging, delivering), restarts on one SQLite file: every write acked 202, performed once."""
    report = await run(
        store=f"sqlite:///{tmp_path}/outbox.db",
        replicas=1,
        outage=3.0,
        writes=80,
        concurrency=20,
        workdir=tmp_path,
        sidecar_config=FAST,
        settle_timeout=40.0,
        delivery_work=0.02,
    )
    assert len(report.kills) == 2, report.text()
    assert report.acknowledged == 80, report.text()
    assert report.resends > 0, report.text()  # the first kill cut or refused some writes
    assert report.performed == 80 and report.lost == 0, report.text()
    assert report.duplicates == 0, report.text()
    assert report.counts["delivered"] == 80, report.text()


async def test_sigterm_keeps_queued_writes_for_the_next_start(tmp_path: Path) -> None:
    """SIGTERM with writes queued: the process exits 0 at once, and the next start delivers them, once each."""
    import asyncio
    import time

    import aiohttp

    from bench.outbox_outage import KEY, Replica
    from proxy.simulator import start_simulator

    async with start_simulator(profile="outage") as sim:
        replica = Replica(0, tmp_path, sim.url, f"sqlite:///{tmp_path}/outbox.db", FAST)
        await replica.start()
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
                for i in range(5):
                    async with s.post(replica.url + "/v1/customers", data={"metadata[ref]": f"t{i}"}) as resp:
                        assert resp.status == 202
            assert replica.proc is not None
            t0 = time.monotonic()
            replica.stop()  # SIGTERM, then wait
            assert replica.proc.returncode == 0
            assert time.monotonic() - t0 < 10  # far under the 25 s shutdown grace
            assert sim.books()["refs"] == {}
            sim.set_profile("none")
            await replica.start()
            deadline = time.monotonic() + 20
            while len(sim.books()["refs"]) < 5:
                assert time.monotonic() < deadline, sim.books()["refs"]
                await asyncio.sleep(0.05)
            assert sim.books()["refs"] == {f"t{i}": 1 for i in range(5)}
        finally:
            replica.stop()
