"""The reliability targets, measured on the simulator's books with seeded fault profiles.

The client here never retries and never sends an Idempotency-Key: the sidecar alone must make
its payments safe. Counts come from the simulator (what Stripe would have executed) and from the
sidecar's own metrics (what the client sent).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import aiohttp
import stripe

from proxy.simulator import start_simulator

KEY = "sk_test_reliability0000000000000000"
RAISED_LIMITS = {"enabled": True, "global_rate": 5000.0, "global_burst": 500.0, "endpoint_rate": 5000.0, "endpoint_burst": 500.0}


async def _pay(session: aiohttp.ClientSession, url: str, ref: str) -> tuple[int, str | None]:
    """One payment, the way an app that never retries sends it. Returns (status, error code)."""
    form = {
        "amount": "2000",
        "currency": "usd",
        "payment_method": "pm_card_visa",
        "confirm": "true",
        "metadata[ref]": ref,
    }
    try:
        async with session.post(f"{url}/v1/payment_intents", data=form, headers={"Authorization": f"Bearer {KEY}"}) as resp:
            body = await resp.read()
            code = None
            if resp.status >= 400 and resp.content_type == "application/json":
                code = (await resp.json()).get("error", {}).get("code")
            del body
            return resp.status, code
    except (TimeoutError, aiohttp.ClientError):
        return 0, "client_saw_a_broken_connection"


def _client_requests(sc) -> float:
    """Client requests the sidecar answered, from its own metrics."""
    total = 0.0
    for metric in sc.registry.collect():
        if metric.name == "stripe_sidecar_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def test_bad_day_every_payment_succeeds_once(make_sidecar):
    """10% transient faults of every kind: >= 99.9% succeed, 0 duplicates, attempts <= 1.15x requests."""
    n, concurrency = 2000, 20
    async with start_simulator(profile="bad_day", seed=11) as sim:
        sc = await make_sidecar(sim.url, ratelimit=RAISED_LIMITS)
        refs = [f"bad-day-{i}" for i in range(n)]
        results: dict[str, tuple[int, str | None]] = {}
        queue = iter(refs)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def worker() -> None:
                for ref in queue:
                    results[ref] = await _pay(session, sc.url, ref)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        books = sim.books()

    statuses = Counter(status for status, _ in results.values())
    ok = statuses[200]
    print(f"\nbad day: {ok}/{n} ok, upstream attempts {books['requests']} ({books['requests'] / n:.3f}x), faults {sum(books['faults'].values())}, duplicates {books['duplicates']}")
    failures = Counter(r for r in results.values() if r[0] != 200)
    sc.log.flush()
    errors = [line for line in sc.log._stream.getvalue().splitlines() if '"level":"error"' in line]
    assert ok / n >= 0.999, (failures, errors[:3])
    assert books["duplicates"] == 0
    # Every payment the client saw succeed was executed exactly once. A payment can still fail
    # (all four attempts faulted: about 1 in 10,000 at a 10% fault rate); it is executed at most
    # once, and only if a connection dropped after Stripe did the work.
    for ref, (status, _) in results.items():
        executed = books["refs"].get(ref, 0)
        assert executed == 1 if status == 200 else executed <= 1, (ref, status, executed, failures)
    assert _client_requests(sc) == n  # the client never retried
    assert books["requests"] <= 1.15 * n, books["requests"]
    assert sum(books["faults"].values()) >= 0.09 * n  # the faults really happened
    assert books["faults"].get("drop_after", 0) > 0


async def test_outage_sheds_load_fails_fast_and_recovers(make_sidecar):
    """Full outage: upstream sees <= 15% of client requests (<= 5% once open); fail fast; recovery after."""
    async with start_simulator(profile="none", seed=3) as sim:
        sc = await make_sidecar(sim.url, ratelimit=RAISED_LIMITS)
        paths = itertools.cycle(["pay", "/v1/balance", "/v1/customers/cus_missing1"])
        counts = {"client": 0, "client_after_open": 0, "fail_fast": 0}
        opened: dict[str, int] = {}
        stop = asyncio.Event()
        recovered_at: list[float] = []
        headers = {"Authorization": f"Bearer {KEY}"}

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def one() -> tuple[int, str | None]:
                path = next(paths)
                if path == "pay":
                    return await _pay(session, sc.url, f"outage-{counts['client']}")
                async with session.get(sc.url + path, headers=headers) as resp:
                    code = None
                    if resp.content_type == "application/json" and resp.status >= 400:
                        code = (await resp.json()).get("error", {}).get("code")
                    else:
                        await resp.read()
                    return resp.status, code

            async def worker() -> None:
                # Paced, like real app traffic (about 200 requests/s from 10 workers).
                while not stop.is_set():
                    status, code = await one()
                    counts["client"] += 1
                    if code == "sidecar_circuit_open":
                        counts["fail_fast"] += 1
                        if not opened:
                            opened["upstream"] = sim.books()["requests"]
                            opened["client"] = counts["client"]
                    elif opened and status in (200, 404) and not recovered_at:
                        recovered_at.append(time.monotonic())
                    await asyncio.sleep(0.05)

            sim.reset()
            sim.set_profile("outage")
            workers = [asyncio.create_task(worker()) for _ in range(10)]
            outage_started = time.monotonic()
            while time.monotonic() - outage_started < 7.0:  # long enough for one half-open cycle
                await asyncio.sleep(0.1)
            outage_books = sim.books()
            client_during = counts["client"]
            sim.set_profile("none")
            outage_ended = time.monotonic()
            deadline = outage_ended + 20
            while not recovered_at:
                assert time.monotonic() < deadline, "traffic never flowed again"
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*workers)

    upstream = outage_books["requests"]
    assert client_during >= 500
    assert upstream <= 0.15 * client_during, (upstream, client_during)
    assert opened, "the breaker never opened"
    after_open_upstream = upstream - opened["upstream"]
    after_open_client = client_during - opened["client"]
    assert after_open_upstream <= 0.05 * after_open_client, (after_open_upstream, after_open_client)
    assert counts["fail_fast"] >= 0.8 * client_during
    recovery = recovered_at[0] - outage_ended
    print(f"\noutage: client={client_during} upstream={upstream} after-open {after_open_upstream}/{after_open_client}; recovered {recovery:.2f}s after the outage ended")


async def test_python_sdk_with_default_retries_under_faults(make_sidecar):
    """The official SDK with its default retries: every call succeeds, 0 duplicates, attempts <= 1.15x calls."""
    calls = 300
    async with start_simulator(profile="bad_day", seed=5) as sim:
        sc = await make_sidecar(sim.url, ratelimit=RAISED_LIMITS)
        client = stripe.StripeClient(
            KEY,
            base_addresses={"api": sc.url, "files": sc.url, "connect": sc.url},
            max_network_retries=2,  # stripe-python's documented default for retries
        )

        def one(i: int) -> str:
            customer = client.v1.customers.create(params={"email": f"c{i}@example.com", "metadata": {"ref": f"sdk-{i}"}})
            fetched = client.v1.customers.retrieve(customer.id)
            assert fetched.id == customer.id
            return customer.id

        def all_calls() -> list[str]:
            # One call at a time, so the seeded faults fall on the same requests every run.
            return [one(i) for i in range(calls // 2)]

        ids = await asyncio.to_thread(all_calls)
        books = sim.books()

    assert len(set(ids)) == calls // 2
    assert books["duplicates"] == 0
    assert all(books["refs"][f"sdk-{i}"] == 1 for i in range(calls // 2))
    assert books["requests"] <= 1.15 * calls, books["requests"]
    assert sum(books["faults"].values()) > 0
