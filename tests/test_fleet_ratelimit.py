"""The fleet-shared limiter (ratelimit.shared) against a real redis-server and the simulator."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from loadgen import KEY, offer
from redisserver import RedisServer
from sidecarproc import SidecarProcess
from waiting import poll

from proxy.simulator import FaultProfile, start_simulator

AUTH = {"Authorization": f"Bearer {KEY}"}
FAST_DIAGNOSIS = {"interval": 0.1, "raise_after": 0.3, "clear_after": 0.5}


async def _get(url: str, path: str) -> tuple[int, Any]:
    """GET ``path`` with the load generator's key: status, and JSON or text."""
    async with aiohttp.ClientSession(headers=AUTH) as s, s.get(url + path) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(body)
        return resp.status, body.decode()


async def _round_trips(url: str) -> int:
    """Scripts Redis ran so far (EVALSHA and EVAL calls)."""
    client = aioredis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))
    finally:
        await client.aclose()


async def test_a_dormant_fleet_sends_nothing_to_redis_per_request(make_sidecar, redis_url):
    """300 req/s to a healthy upstream: every request answered untouched; Redis sees one round trip per sync, none per request."""
    async with start_simulator() as sim:
        sc = await make_sidecar(sim.url, ratelimit={"shared": redis_url, "shared_interval": 0.25})
        start = time.monotonic()
        # Before the first request (no account known yet) a sync is a PING, never a script.
        before_trips, before_syncs = await _round_trips(redis_url), sc.shared_limit.syncs
        run = await offer(sc.url, 300.0, 2.0)
        # A busy machine syncs less often than every 0.25 s: wait for four, however long.
        await poll(lambda: sc.shared_limit.syncs - before_syncs >= 4, timeout=20.0, what="four syncs")
        # Syncs before trips: a sync ending in between then counts in trips only (within the +2).
        syncs = sc.shared_limit.syncs - before_syncs
        trips = await _round_trips(redis_url) - before_trips
        elapsed = time.monotonic() - start
    assert [r.status for r in run.results].count(200) == 600
    assert sc.forwarder.limiter.rates() == {}
    rounds = sc.registry.get_sample_value("stripe_sidecar_ratelimit_shared_syncs_total", {"result": "ok"})
    assert rounds and rounds >= 4
    # One script per sync (the first may be retried after loading it), never one per request.
    assert syncs <= trips <= syncs + 2, (trips, syncs)
    assert syncs <= elapsed / 0.25 + 1, (syncs, elapsed)  # each sync waits out the interval


async def test_a_quiet_replica_learns_the_fleet_limit_before_its_own_429(make_sidecar, redis_url):
    """Replica A is throttled; idle replica B, same account, takes the fleet's rate at a small weight without one 429 of its own."""
    async with start_simulator(profile=FaultProfile(account_rate=40.0)) as sim:
        shared = {"shared": redis_url, "shared_interval": 0.1}
        a = await make_sidecar(sim.url, ratelimit=shared)
        b = await make_sidecar(sim.url, ratelimit=shared)
        status, _ = await _get(b.url, "/v1/balance")  # B knows the account now
        assert status == 200
        await offer(a.url, 120.0, 2.0)
        await poll(lambda: "global" in b.forwarder.limiter.rates(), timeout=20.0, what="B to share the limit")
        state = b.forwarder.limiter.state()["global"]
        rated_b = b.registry.get_sample_value("stripe_sidecar_upstream_attempts_total",
                                              {"operation": "GET /v1/balance", "outcome": "rate_limited"})
        _, report = await _get(b.url, "/diagnosis")
    assert not rated_b  # B never saw a 429
    assert 0 < state["fleet_weight"] < 0.5  # B asks little: A keeps most of the fleet's rate
    assert state["rate_cubic"]["w_max"] <= 60.0  # the fleet's rate, from A's accepted 40/s or so
    assert report["ratelimit"]["shared"]["up"] is True
    assert report["ratelimit"]["shared"]["scopes"] == ["global"]
    assert "sk_test" not in str(report)


async def test_redis_down_each_sidecar_goes_on_alone_and_says_so_then_recovers(make_sidecar, tmp_path: Path):
    """Redis killed: requests still answered, /ready 200, store_unreachable on /diagnosis and shared_up 0; Redis back: shared again, diagnosis cleared."""
    server = RedisServer(tmp_path / "r").start()
    try:
        async with start_simulator() as sim:
            sc = await make_sidecar(sim.url, ratelimit={"shared": server.url, "shared_interval": 0.1},
                                    diagnosis=FAST_DIAGNOSIS)
            assert (await _get(sc.url, "/v1/balance"))[0] == 200
            await poll(lambda: sc.shared_limit.up is True, what="the store to answer")
            server.kill()
            await poll(lambda: sc.shared_limit.up is False, what="the store to be seen down")
            answers = [(await _get(sc.url, "/v1/balance"))[0] for _ in range(20)]
            await poll(lambda: "store_unreachable" in sc.diagnosis.active, timeout=20.0, what="store_unreachable")
            ready, _ = await _get(sc.url, "/ready")
            _, report = await _get(sc.url, "/diagnosis")
            _, metrics = await _get(sc.url, "/metrics")
            down = next(d for d in report["active"] if d["kind"] == "store_unreachable")
            server.start()  # the same port
            await poll(lambda: sc.shared_limit.up is True, timeout=20.0, what="the store to be seen again")
            await poll(lambda: "store_unreachable" not in sc.diagnosis.active, timeout=20.0, what="the diagnosis to clear")
            _, metrics_after = await _get(sc.url, "/metrics")
    finally:
        server.stop()
    assert answers == [200] * 20
    assert ready == 200
    assert down["severity"] == "warning"
    assert down["evidence"]["stores"]["ratelimit.shared"]["url"] == server.url
    assert "on its own" in down["summary"]
    assert "stripe_sidecar_ratelimit_shared_up 0.0" in metrics
    assert "stripe_sidecar_ratelimit_shared_up 1.0" in metrics_after
    assert [e["event"] for e in _events(sc, "ratelimit_shared_")] == [
        "ratelimit_shared_up", "ratelimit_shared_down", "ratelimit_shared_up"]


def _events(sc: Any, prefix: str) -> list[dict[str, Any]]:
    lines = sc.log_stream.getvalue().splitlines()
    return [json.loads(line) for line in lines if f'"event":"{prefix}' in line]


def _window(books: list[dict[str, Any]], end: dict[str, Any]) -> tuple[int, int]:
    """(rate-limited, requests) the simulator counted from ``books[0]`` to ``end``."""
    start = books[0]
    limited = sum(end["rate_limited"].values()) - sum(start["rate_limited"].values())
    return limited, end["requests"] - start["requests"]


@pytest.mark.wallclock
async def test_two_replicas_share_the_account_limit(tmp_path: Path, redis_url):
    """Two sidecar processes sharing Redis, 150 req/s each against 100 req/s: from 3 s on, < 10% of what reaches Stripe is limited and >= 80% of the limit succeeds."""
    seconds, rate, limit, skip = 8.0, 150.0, 100.0, 3
    async with start_simulator(profile=FaultProfile(account_rate=limit)) as sim:
        replicas = [
            SidecarProcess(tmp_path / f"s{i}", {"upstream": {"override": sim.url},
                                                "log": {"access_log": False}},
                           env={"STRIPE_SIDECAR_RATELIMIT_SHARED": redis_url}).start()
            for i in range(2)
        ]
        try:
            await asyncio.gather(*(r.started() for r in replicas))
            runs = await asyncio.gather(
                *(offer(r.url, rate, seconds, mark=sim.books if i == 0 else None) for i, r in enumerate(replicas))
            )
            end = sim.books()
        finally:
            for r in replicas:
                r.stop()
    limited, reached = _window([runs[0].marks[skip]], end)  # type: ignore[list-item]
    ok = sum(x.status == 200 for run in runs for x in run.after(skip))
    measured = seconds - skip
    assert reached > 0
    assert limited / reached < 0.10, (limited, reached)
    assert ok / measured >= 0.8 * limit, ok / measured
    assert all(r.events("ratelimit_shared_up") for r in replicas)


async def test_a_wrong_redis_address_shows_before_any_request(make_sidecar, redis_url, tmp_path: Path):
    """No request yet, so no account: a sidecar still PINGs its Redis; nothing listening is store_unreachable, a live one is up."""
    nowhere = RedisServer(tmp_path / "none")  # never started: its port is free
    async with start_simulator() as sim:
        wrong = await make_sidecar(sim.url, ratelimit={"shared": nowhere.url, "shared_interval": 0.05},
                                   diagnosis=FAST_DIAGNOSIS)
        right = await make_sidecar(sim.url, ratelimit={"shared": redis_url, "shared_interval": 0.05})
        await poll(lambda: "store_unreachable" in wrong.diagnosis.active, timeout=5.0, what="store_unreachable")
        await poll(lambda: right.shared_limit.up is True, what="the live Redis to answer")
    assert wrong.registry.get_sample_value("stripe_sidecar_ratelimit_shared_up") == 0
    assert right.registry.get_sample_value("stripe_sidecar_ratelimit_shared_up") == 1
    assert wrong.forwarder.fleet_auth is None and right.shared_limit.syncs == 0
