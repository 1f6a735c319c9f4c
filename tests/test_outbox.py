"""The outbox in a running sidecar, against the simulator on loopback: queue, deliver, operate.

Writes to a `fallback: queue` operation that cannot reach Stripe are stored and answered 202,
then delivered once Stripe is back, under their original Idempotency-Key: the simulator's books
count each write exactly once. Times the items live by (wall clock) are injected where a test
needs a day to pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.simulator import start_simulator
from proxy.simulator.faults import FaultProfile

KEY = "sk_test_outbox000000000000000000000"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _sections(tmp_path: Path, **outbox: Any) -> dict[str, Any]:
    """A sidecar that gives up fast and delivers at once: small retries, quick breakers."""
    return {
        "retry": {"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.02, "deadline": 2.0},
        "breaker": {"open_duration": 0.2, "open_duration_max": 0.2, "min_calls": 5},
        "host_breaker": {"open_duration": 0.2, "open_duration_max": 0.2},
        "operations": {"POST /v1/customers": {"fallback": "queue"}},
        "outbox": {
            "store": f"sqlite:///{tmp_path}/outbox.db",
            "poll_interval": 0.05,
            "backoff_base": 0.05,
            "backoff_max": 0.1,
            "lease": 5.0,
            **outbox,
        },
    }


async def _post(session: aiohttp.ClientSession, url: str, path: str, form: dict[str, str],
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    async with session.post(url + path, data=form, headers={**AUTH, **(headers or {})}) as resp:
        raw = await resp.read()
        return resp.status, dict(resp.headers), json.loads(raw) if raw.startswith(b"{") else raw


async def _get(session: aiohttp.ClientSession, url: str, path: str, method: str = "GET") -> tuple[int, Any]:
    async with session.request(method, url + path) as resp:
        return resp.status, json.loads(await resp.read())


async def _items(session: aiohttp.ClientSession, url: str, **query: str) -> Any:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    status, doc = await _get(session, url, "/outbox" + (f"?{q}" if q else ""))
    assert status == 200, doc
    return doc


async def _all_final(session: aiohttp.ClientSession, url: str, n: int) -> None:
    """Poll /outbox (deadline 15 s) until at least n items exist and none is still to deliver."""
    deadline = time.monotonic() + 15
    while True:
        counts = (await _items(session, url))["counts"]
        if counts["queued"] == 0 and counts["delivering"] == 0 and sum(counts.values()) >= n:
            return
        assert time.monotonic() < deadline, f"items never all settled: {counts}"
        await asyncio.sleep(0.02)


async def test_outage_writes_are_queued_then_delivered_once(make_sidecar, tmp_path):
    """In an outage a queue operation answers 202 and stores the write; afterwards Stripe performs each once."""
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            answers = []
            for i in range(12):
                answers.append(await _post(s, sc.url, "/v1/customers", {"email": f"a{i}@example.com", "metadata[ref]": f"c{i}"}))
            statuses = {a[0] for a in answers}
            assert statuses == {202}
            status, headers, body = answers[-1]
            assert headers["Sidecar-Outcome"] == "queued"
            assert body["object"] == "sidecar.queued_request" and body["state"] == "queued"
            assert body["operation"] == "POST /v1/customers" and body["id"].startswith("qr_")
            assert headers["Idempotency-Key"] == body["idempotency_key"]
            # Not a queue operation: the usual fail-fast answer.
            async with s.get(sc.url + "/v1/balance", headers=AUTH) as resp:
                assert resp.status in (502, 503)
            assert sim.books()["side_effects"] == 0
            counts = (await _items(s, sc.url))["counts"]
            assert counts["queued"] + counts["delivering"] == 12 and sum(counts.values()) == 12
            sim.set_profile("none")
            await _all_final(s, sc.url, 12)
            doc = await _items(s, sc.url)
            assert doc["counts"]["delivered"] == 12
            books = sim.books()
            assert books["duplicates"] == 0
            assert sorted(books["refs"]) == sorted(f"c{i}" for i in range(12))
            assert set(books["refs"].values()) == {1}
            status, shown = await _get(s, sc.url, f"/outbox/{body['id']}")
            assert status == 200 and shown["state"] == "delivered"
            assert shown["result"]["status"] == 200 and shown["result"]["body"]["object"] == "customer"
            assert [h["to"] for h in shown["history"]][:2] == ["queued", "delivering"]
            assert shown["history"][-1]["to"] == "delivered"
            assert "Authorization" in shown["header_names"]
            assert KEY not in json.dumps(shown) and KEY not in json.dumps(doc)
        await sc.outbox.refresh()
        metrics = sc.registry
        assert metrics.get_sample_value("stripe_sidecar_outbox_items", {"state": "delivered"}) == 12
        assert metrics.get_sample_value("stripe_sidecar_outbox_items", {"state": "queued"}) == 0
        assert metrics.get_sample_value("stripe_sidecar_outbox_oldest_queued_age_seconds") == 0
        assert metrics.get_sample_value("stripe_sidecar_outbox_store_up") == 1
        assert metrics.get_sample_value("stripe_sidecar_outbox_queued_total", {"operation": "POST /v1/customers"}) == 12
        assert metrics.get_sample_value("stripe_sidecar_outbox_deliveries_total", {"operation": "POST /v1/customers", "result": "delivered"}) == 12
        assert KEY not in sc.log_stream.getvalue()


async def test_app_resend_of_a_queued_write_gets_the_same_item(make_sidecar, tmp_path):
    """The app resending a queued write (same key, same body) gets the same item, stored once."""
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            form = {"email": "a@example.com", "metadata[ref]": "resent"}
            first = await _post(s, sc.url, "/v1/customers", form, {"Idempotency-Key": "app-key-1"})
            again = await _post(s, sc.url, "/v1/customers", form, {"Idempotency-Key": "app-key-1"})
            assert first[0] == again[0] == 202
            assert first[2]["id"] == again[2]["id"] and first[2]["idempotency_key"] == "app-key-1"
            other = await _post(s, sc.url, "/v1/customers", {"email": "b@example.com"}, {"Idempotency-Key": "app-key-1"})
            assert other[0] != 202  # the key reused for another write is never queued
            counts = (await _items(s, sc.url))["counts"]
            assert sum(counts.values()) == 1
            sim.set_profile("none")
            await _all_final(s, sc.url, 1)
            assert sim.books()["refs"] == {"resent": 1}


async def test_request_without_a_key_is_never_queued(make_sidecar, tmp_path):
    """With key injection off, a POST without an Idempotency-Key gets the failure, not 202."""
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, idempotency={"inject": False}, **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            status, headers, _body = await _post(s, sc.url, "/v1/customers", {"email": "a@example.com"})
            assert status in (502, 503) and headers["Sidecar-Outcome"] != "queued"
            assert (await _items(s, sc.url))["counts"]["queued"] == 0


async def test_terminal_answer_fails_the_item_and_operator_retries_or_drops(make_sidecar, tmp_path):
    """Stripe's 400 fails the item with the answer kept; retry re-queues it, drop deletes it, both audited."""
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            _, _, bad = await _post(s, sc.url, "/v1/customers", {"email": "not-an-email"})
            _, _, good = await _post(s, sc.url, "/v1/customers", {"email": "g@example.com"})
            sim.set_profile("none")
            await _all_final(s, sc.url, 2)
            failed = await _items(s, sc.url, state="failed")
            assert [i["id"] for i in failed["items"]] == [bad["id"]]
            assert failed["items"][0]["result"]["status"] == 400
            status, shown = await _get(s, sc.url, f"/outbox/{bad['id']}")
            assert shown["result"]["body"]["error"]["code"] == "email_invalid"
            assert shown["reason"].startswith("failed: Stripe's final answer (400 email_invalid)")
            # Operator: retry (fails again: the same write), then drop it.
            status, doc = await _get(s, sc.url, f"/outbox/{bad['id']}/retry", method="POST")
            assert status == 200 and doc["state"] in ("queued", "delivering", "failed")
            await _all_final(s, sc.url, 2)
            status, doc = await _get(s, sc.url, f"/outbox/{good['id']}/retry", method="POST")
            assert status == 409 and doc["error"]["code"] == "sidecar_outbox_not_allowed"
            status, doc = await _get(s, sc.url, f"/outbox/{bad['id']}?reason=bad+data", method="DELETE")
            assert status == 200 and doc["deleted"] is True
            status, doc = await _get(s, sc.url, f"/outbox/{bad['id']}")
            assert status == 404
            assert "outbox_dropped" in sc.log_stream.getvalue()
            assert (await _items(s, sc.url))["counts"]["failed"] == 0
            status, doc = await _get(s, sc.url, "/outbox?state=nonsense")
            assert status == 400


async def test_item_past_the_idempotency_window_expires_unsent(make_sidecar, tmp_path):
    """An item whose key is older than the window less the margin is expired, never sent."""
    wall = {"now": 1_800_000_000.0}
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, wall=lambda: wall["now"], **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            _, _, body = await _post(s, sc.url, "/v1/customers", {"email": "late@example.com", "metadata[ref]": "late"})
            wall["now"] += 86400 - 3600  # 23 h: the margin's start
            sim.set_profile("none")
            await _all_final(s, sc.url, 1)
            _, shown = await _get(s, sc.url, f"/outbox/{body['id']}")
            assert shown["state"] == "expired" and "never sent again" in shown["reason"]
            assert sim.books()["refs"] == {}
            status, doc = await _get(s, sc.url, f"/outbox/{body['id']}/retry", method="POST")
            assert status == 409 and "idempotency window" in doc["error"]["message"]


async def test_unreachable_store_answers_the_failure_and_says_so(make_sidecar, tmp_path):
    """A store that cannot be opened: no 202, /diagnosis names it, /ready stays ready, store_up is 0."""
    (tmp_path / "file").write_text("x")
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(
            sim.url, diagnosis={"interval": 0.05, "raise_after": 0.1},
            **_sections(tmp_path, store=f"sqlite:///{tmp_path}/file/outbox.db"),
        )
        async with aiohttp.ClientSession() as s:
            status, _headers, _ = await _post(s, sc.url, "/v1/customers", {"email": "a@example.com"})
            assert status in (502, 503)
            status, diag = await _get(s, sc.url, "/diagnosis")
            assert diag["outbox"]["store_up"] is False and diag["outbox"]["error"]
            deadline = time.monotonic() + 5
            while "store_unreachable" not in [d["kind"] for d in diag["active"]]:
                assert time.monotonic() < deadline, diag["active"]
                await asyncio.sleep(0.05)
                status, diag = await _get(s, sc.url, "/diagnosis")
            (found,) = [d for d in diag["active"] if d["kind"] == "store_unreachable"]
            assert found["severity"] == "critical" and "outbox.store" in json.dumps(found["evidence"])
            status, _ = await _get(s, sc.url, "/ready")
            assert status == 200
            status, doc = await _get(s, sc.url, "/outbox")
            assert status == 503 and doc["error"]["code"] == "sidecar_outbox_unavailable"
        assert sc.registry.get_sample_value("stripe_sidecar_outbox_store_up") == 0


async def test_outbox_off_by_default(make_sidecar):
    """Without a queue operation nothing opens: /outbox is refused, no outbox metrics exist."""
    async with start_simulator() as sim:
        sc = await make_sidecar(sim.url, environ={})
        async with aiohttp.ClientSession() as s:
            status, _ = await _get(s, sc.url, "/outbox")
            assert status == 404
        assert sc.registry.get_sample_value("stripe_sidecar_outbox_store_up") is None
        assert sc.outbox.capture is None


async def test_held_keys_store_no_authorization_and_deliver_with_the_held_key(make_sidecar, tmp_path):
    """With held keys the stored request carries no Authorization; the held key goes on at delivery."""
    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, secret_keys=[KEY], **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/v1/customers", data={"email": "h@example.com", "metadata[ref]": "held"}) as resp:
                assert resp.status == 202
                body = json.loads(await resp.read())
            _, shown = await _get(s, sc.url, f"/outbox/{body['id']}")
            assert "Authorization" not in shown["header_names"]
            sim.set_profile("none")
            await _all_final(s, sc.url, 1)
            assert sim.books()["refs"] == {"held": 1}
        db = (tmp_path / "outbox.db").read_bytes() + (tmp_path / "outbox.db-wal").read_bytes() if (tmp_path / "outbox.db-wal").exists() else (tmp_path / "outbox.db").read_bytes()
        assert KEY.encode() not in db


async def test_cli_lists_shows_and_drops(make_sidecar, tmp_path, capsys):
    """`stripe-sidecar outbox list|show|retry|drop` talk to the running sidecar; errors exit 1."""
    from proxy.cli import main

    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, **_sections(tmp_path, poll_interval=30.0))
        async with aiohttp.ClientSession() as s:
            _, _, body = await _post(s, sc.url, "/v1/customers", {"email": "cli@example.com"})
        item = body["id"]
        assert await asyncio.to_thread(main, ["outbox", "list", "--url", sc.url]) == 0
        listed = capsys.readouterr().out
        assert "queued 1" in listed and item in listed and "POST /v1/customers" in listed
        assert await asyncio.to_thread(main, ["outbox", "show", item, "--url", sc.url]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["id"] == item and KEY not in json.dumps(shown)
        assert await asyncio.to_thread(main, ["outbox", "list", "--state", "failed", "--json", "--url", sc.url]) == 0
        assert json.loads(capsys.readouterr().out)["items"] == []
        assert await asyncio.to_thread(main, ["outbox", "drop", item, "--reason", "test", "--url", sc.url]) == 0
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["outbox", "retry", item, "--url", sc.url]) == 1
        assert "No outbox item" in capsys.readouterr().err


async def test_callback_gets_each_final_result_retried_after_a_failure(make_sidecar, tmp_path):
    """outbox.callback_url is POSTed each final result; a 500 from it is retried; no secret in it."""
    from aiohttp import web

    received: list[dict[str, Any]] = []
    calls = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(status=500)  # the first try fails: it must come again
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with start_simulator(profile="outage") as sim:
            sc = await make_sidecar(sim.url, **_sections(tmp_path, callback_url=f"http://127.0.0.1:{port}/hook"))
            sc.outbox.callback._sleep = lambda _s: asyncio.sleep(0)  # no backoff wait in the test
            async with aiohttp.ClientSession() as s:
                _, _, body = await _post(s, sc.url, "/v1/customers", {"email": "cb@example.com"})
                sim.set_profile("none")
                await _all_final(s, sc.url, 1)
            deadline = time.monotonic() + 5
            while not received:
                assert time.monotonic() < deadline, "the callback never arrived"
                await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    (event,) = received
    assert calls["n"] == 2
    assert event["event"] == "outbox_item_final"
    assert event["item"]["id"] == body["id"] and event["item"]["state"] == "delivered"
    assert event["item"]["result"]["body"]["object"] == "customer"
    assert KEY not in json.dumps(event)


async def test_outbox_changes_need_the_client_token_when_the_sidecar_has_one(make_sidecar, tmp_path):
    """With held keys and a client token, retry and drop without the token get 401; reads do not."""
    token = "client-token-0123456789abcdef"
    async with start_simulator() as sim:
        sc = await make_sidecar(sim.url, secret_keys=[KEY], client_token=token, **_sections(tmp_path))
        async with aiohttp.ClientSession() as s:
            status, doc = await _get(s, sc.url, "/outbox/qr_x/retry", method="POST")
            assert status == 401 and doc["error"]["code"] == "sidecar_client_token_required"
            status, _ = await _get(s, sc.url, "/outbox/qr_x", method="DELETE")
            assert status == 401
            async with s.delete(sc.url + "/outbox/qr_x", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 404  # let through: there is no such item
            status, _ = await _get(s, sc.url, "/outbox")
            assert status == 200


async def test_a_put_the_store_does_not_confirm_is_never_acknowledged(make_sidecar, tmp_path):
    """The disk fails at the commit: the usual failure, store_up 0, no put until the store answers again."""
    import sqlite3

    async with start_simulator(profile="outage") as sim:
        # No monitor round during the test: it would find the store answering reads again.
        sc = await make_sidecar(sim.url, **_sections(tmp_path, poll_interval=30.0))
        store = sc.outbox.store

        def broken(batch: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        store._put_batch = broken
        async with aiohttp.ClientSession() as s:
            status, headers, _ = await _post(s, sc.url, "/v1/customers", {"email": "a@example.com"})
            assert status in (502, 503) and headers["Sidecar-Outcome"] != "queued"
        assert sc.registry.get_sample_value("stripe_sidecar_outbox_store_up") == 0
        assert '"event":"outbox_store_failed"' in sc.log_stream.getvalue()
        del store._put_batch
        async with aiohttp.ClientSession() as s:
            # Known to fail: not tried again until the monitor finds it answering.
            status, _, _ = await _post(s, sc.url, "/v1/customers", {"email": "b@example.com"})
            assert status != 202
            assert sum((await store.counts()).values()) == 0
            await sc.outbox.refresh()  # the monitor's round: the store answers again
            assert sc.registry.get_sample_value("stripe_sidecar_outbox_store_up") == 1
            status, _, _ = await _post(s, sc.url, "/v1/customers", {"email": "c@example.com"})
            assert status == 202


async def test_stripe_python_sdk_reads_the_202_as_an_object(make_sidecar, tmp_path):
    """The official stripe-python client gets the queued answer as an object: no exception, id and state readable."""
    import stripe

    async with start_simulator(profile="outage") as sim:
        sc = await make_sidecar(sim.url, **_sections(tmp_path, poll_interval=30.0))

        def create() -> Any:
            client = stripe.StripeClient(
                KEY, base_addresses={"api": sc.url}, max_network_retries=2,
            )
            return client.v1.customers.create(params={"email": "sdk@example.com"})

        made = await asyncio.to_thread(create)
    assert made.object == "sidecar.queued_request"
    assert made.id.startswith("qr_") and made["state"] == "queued"
    assert made["operation"] == "POST /v1/customers"
    assert made.last_response.code == 202


async def test_writes_to_one_object_are_delivered_in_the_order_received(make_sidecar, tmp_path):
    """Ten queued updates of one customer are performed in order: the last one received wins."""
    sections = _sections(tmp_path)
    sections["operations"]["POST /v1/customers/{customer}"] = {"fallback": "queue"}
    async with start_simulator() as sim:
        sc = await make_sidecar(sim.url, **sections)
        async with aiohttp.ClientSession() as s:
            status, _, customer = await _post(s, sc.url, "/v1/customers", {"email": "o@example.com"})
            assert status == 200
            sim.set_profile("outage")
            ids = []
            for i in range(10):
                status, _, body = await _post(s, sc.url, f"/v1/customers/{customer['id']}", {"name": f"n{i}"})
                assert status == 202
                ids.append(body["id"])
            # Half the answers come 0.1 s late: sent together, the updates would finish shuffled.
            sim.set_profile(FaultProfile(slow=0.5, slow_seconds=0.1), seed=3)
            await _all_final(s, sc.url, 10)
            async with s.get(f"{sc.url}/v1/customers/{customer['id']}", headers=AUTH) as resp:
                assert (await resp.json())["name"] == "n9"
            done_at = []
            for item_id in ids:
                _, shown = await _get(s, sc.url, f"/outbox/{item_id}")
                assert shown["state"] == "delivered"
                done_at.append(shown["updated_at"])
            assert done_at == sorted(done_at)
