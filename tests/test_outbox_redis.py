"""The Redis outbox store: the shared store contract on a real redis-server, plus what only Redis shows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from outbox_contract import *  # noqa: F403
from outbox_contract import T0, new_item
from redisserver import RedisServer

from proxy.outbox import Result, State, StoreError, open_store
from proxy.outbox.redis_store import RedisStore


@pytest.fixture
def outbox_url(redis_url: str) -> str:
    """A fresh, empty Redis of the test's own."""
    return redis_url


async def test_two_replicas_never_hold_one_item(redis_url: str) -> None:
    """Two stores on one Redis claiming 100 items at once: each item goes to exactly one."""
    a, b = await open_store(redis_url, now=T0), await open_store(redis_url, now=T0)
    try:
        ids = {(await a.put(new_item(received_at=T0 + i)))[0].id for i in range(100)}
        batches = await asyncio.gather(*(s.claim(T0 + 200, 30.0, 7, f"w{k}")
                                         for k in range(20) for s in (a, b)))
        got = [i.id for batch in batches for i in batch]
        assert sorted(got) == sorted(ids)  # all claimed, none twice
        assert (await b.counts())[State.DELIVERING] == 100
    finally:
        await a.close()
        await b.close()


async def test_times_and_bytes_come_back_exactly(redis_url: str) -> None:
    """Wall times with microseconds and binary bodies round-trip without loss through the scripts."""
    store = await open_store(redis_url, now=T0)
    try:
        t = 1_800_000_123.456789
        body = bytes(range(256))
        item, _ = await store.put(new_item(received_at=t, body=body, expires_at=t + 0.1))
        (claimed,) = await store.claim(t + 0.000001, 29.999999, 1, "w1")
        assert claimed.lease_until == t + 0.000001 + 29.999999
        done = await store.complete(item.id, "w1", State.DELIVERED, at=t + 1.25, reason="ok",
                                    sent=1, result=Result(200, body, None))
        assert done is not None and done.result == Result(200, body, None)
        assert (done.received_at, done.expires_at, done.updated_at) == (t, t + 0.1, t + 1.25)
        assert (await store.history(item.id))[-1].at == t + 1.25
    finally:
        await store.close()


async def test_an_unreachable_redis_is_a_store_error_without_the_password(tmp_path: Path) -> None:
    """Nothing listening: open fails with StoreError, the password never in the message."""
    server = RedisServer(tmp_path / "r")  # never started: its port is free
    url = f"redis://:hunter2@127.0.0.1:{server.port}/0"
    with pytest.raises(StoreError) as info:
        await open_store(url, now=T0)
    assert "hunter2" not in str(info.value)


async def test_writes_fail_while_redis_is_down_and_work_again_after(tmp_path: Path) -> None:
    """Redis killed: put raises StoreError (never a silent success); restarted with its AOF: the earlier item is there and puts work."""
    server = RedisServer(tmp_path / "r", appendonly=True).start()
    try:
        store = await open_store(server.url, now=T0)
        assert isinstance(store, RedisStore) and store.durable is True
        kept, _ = await store.put(new_item())
        server.kill()
        with pytest.raises(StoreError):
            await store.put(new_item())
        with pytest.raises(StoreError):
            await store.ping()
        server.start()
        assert await store.get(kept.id) == kept
        _, created = await store.put(new_item())
        assert created
        assert (await store.counts())[State.QUEUED] == 2
        await store.close()
    finally:
        server.stop()


async def test_durable_is_false_without_the_append_only_file(redis_url: str) -> None:
    """The test fixture's Redis runs without persistence: the store says so."""
    store = await open_store(redis_url, now=T0)
    try:
        assert isinstance(store, RedisStore) and store.durable is False
    finally:
        await store.close()


async def test_two_replicas_on_one_redis_with_sigkills_perform_every_write_once(redis_url: str, tmp_path: Path) -> None:
    """Two sidecar processes share one Redis outbox; replica 0 SIGKILLed while acknowledging and while delivering: every write acked 202 and performed exactly once."""
    from test_outbox_kill import FAST

    from bench.outbox_outage import run

    config = {**FAST, "outbox": {**FAST["outbox"], "lease": 3.0}}
    report = await run(
        store=redis_url,
        replicas=2,
        outage=3.0,
        writes=80,
        concurrency=20,
        workdir=tmp_path,
        sidecar_config=config,
        settle_timeout=40.0,
        delivery_work=0.02,
    )
    assert len(report.kills) == 2, report.text()
    assert report.acknowledged == 80, report.text()
    assert report.performed == 80 and report.lost == 0, report.text()
    assert report.duplicates == 0, report.text()
    assert report.counts["delivered"] == 80, report.text()


async def test_redis_down_no_write_is_acknowledged_and_the_sidecar_says_so(make_sidecar, tmp_path: Path) -> None:
    """Redis killed during an outage: a queue write gets the usual failure (never 202), store_unreachable on /diagnosis, /ready 200; Redis back: 202 again, then delivered once."""
    import aiohttp
    from test_outbox import _get, _post, _sections

    from proxy.simulator import start_simulator

    server = RedisServer(tmp_path / "r", appendonly=True).start()
    try:
        async with start_simulator(profile="outage") as sim:
            sc = await make_sidecar(sim.url, diagnosis={"interval": 0.05, "raise_after": 0.1},
                                    **_sections(tmp_path, store=server.url))
            async with aiohttp.ClientSession() as s:
                status, headers, body = await _post(s, sc.url, "/v1/customers", {"email": "a@example.com", "metadata[ref]": "r1"},
                                                    {"Idempotency-Key": "before"})
                assert status == 202, body
                server.kill()
                status, headers, body = await _post(s, sc.url, "/v1/customers", {"email": "b@example.com", "metadata[ref]": "r2"},
                                                    {"Idempotency-Key": "during"})
                assert status in (502, 503), body
                assert headers.get("Sidecar-Outcome") != "queued"
                deadline = asyncio.get_running_loop().time() + 5
                while "store_unreachable" not in sc.diagnosis.active:
                    assert asyncio.get_running_loop().time() < deadline, "store_unreachable never raised"
                    await asyncio.sleep(0.05)
                status, diag = await _get(s, sc.url, "/diagnosis")
                (found,) = [d for d in diag["active"] if d["kind"] == "store_unreachable"]
                assert found["severity"] == "critical"
                assert found["evidence"]["stores"]["outbox.store"]["url"] == server.url
                assert (await _get(s, sc.url, "/ready"))[0] == 200
                server.start()  # same port, its append-only file: "before" is still queued
                deadline = asyncio.get_running_loop().time() + 5
                while sc.outbox.store is None or sc.outbox.store_error is not None:
                    assert asyncio.get_running_loop().time() < deadline, "the store never came back"
                    await asyncio.sleep(0.02)
                status, headers, body = await _post(s, sc.url, "/v1/customers", {"email": "b@example.com", "metadata[ref]": "r2"},
                                                    {"Idempotency-Key": "during"})
                assert status == 202, body
                sim.set_profile("none")
                deadline = asyncio.get_running_loop().time() + 15
                while True:
                    counts = (await _get(s, sc.url, "/outbox"))[1]["counts"]
                    if counts["delivered"] == 2:
                        break
                    assert asyncio.get_running_loop().time() < deadline, counts
                    await asyncio.sleep(0.05)
            books = sim.books()
    finally:
        server.stop()
    assert books["refs"] == {"r1": 1, "r2": 1}
    assert books["duplicates"] == 0


async def test_a_redis_without_the_append_only_file_is_warned_about(make_sidecar, tmp_path: Path) -> None:
    """An outbox on a Redis that would lose acknowledged writes at a restart logs a warning at start; one with it does not."""
    from test_outbox import _sections

    from proxy.simulator import start_simulator

    async with start_simulator() as sim:
        with RedisServer(tmp_path / "plain") as plain, RedisServer(tmp_path / "aof", appendonly=True) as aof:
            warned = await make_sidecar(sim.url, **_sections(tmp_path, store=plain.url))
            safe = await make_sidecar(sim.url, **_sections(tmp_path, store=aof.url))
            for sc in (warned, safe):
                assert sc.outbox.store is not None
            assert '"event":"outbox_store_not_durable"' in warned.log_stream.getvalue()
            assert "appendonly yes" in warned.log_stream.getvalue()
            assert "outbox_store_not_durable" not in safe.log_stream.getvalue()
