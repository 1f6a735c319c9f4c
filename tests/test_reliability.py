"""The reliability targets, measured on the simulator's books with seeded fault profiles.

The client here never retries and never sends an Idempotency-Key: the sidecar alone must make
its payments safe. Counts come from the simulator (what Stripe would have executed) and from the
sidecar's own metrics (what the client sent). The outage scenario runs once, in test_demo.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import stripe

from proxy.simulator import start_simulator

KEY = "sk_test_reliability0000000000000000"


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
        sc = await make_sidecar(sim.url)  # the shipped defaults
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


async def test_python_sdk_with_default_retries_under_faults(make_sidecar):
    """The official SDK with its default retries: every call succeeds, 0 duplicates, attempts <= 1.15x calls."""
    calls = 300
    async with start_simulator(profile="bad_day", seed=5) as sim:
        sc = await make_sidecar(sim.url)  # the shipped defaults
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
