"""The Stripe simulator: Stripe's shapes, idempotency rules, faults and books, on real sockets."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe
from waiting import poll as until

from proxy.simulator import PROFILES, FaultProfile, SimulatorHandle, start_simulator
from proxy.simulator.errors import mask_key
from proxy.simulator.faults import choose_fault, profile_from_mapping
from proxy.simulator.forms import parse_form
from proxy.simulator.server import SIMULATOR

KEY = "sk_test_51SimulatorKey0000abcd"
AUTH = {"Authorization": f"Bearer {KEY}"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorHandle]:
    """A simulator with no faults on a free loopback port."""
    async with start_simulator() as handle:
        yield handle


@pytest.fixture
async def http(sim: SimulatorHandle) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session aimed at the simulator, authenticated with a test key."""
    async with aiohttp.ClientSession(base_url=sim.url, headers=AUTH) as session:
        yield session


async def post(http: aiohttp.ClientSession, path: str, data: str = "",
               key: str | None = None, **headers: str) -> tuple[int, Any, Any]:
    """POST a form body; returns (status, parsed JSON or text, headers)."""
    hdrs = {**FORM, **headers}
    if key is not None:
        hdrs["Idempotency-Key"] = key
    async with http.post(path, data=data, headers=hdrs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, resp.headers


# --- pure parts -----------------------------------------------------------------------------


def test_form_parsing_nests_brackets() -> None:
    """Stripe's bracket encoding becomes nested dicts and lists; metadata keys stay keys."""
    params = parse_form("metadata[ref]=r1&metadata[0]=z&expand[]=a&expand[]=b"
                        "&items[0][price]=p1&items[1][price]=p2&email=a%40b.co")
    assert params == {
        "metadata": {"ref": "r1", "0": "z"},
        "expand": ["a", "b"],
        "items": [{"price": "p1"}, {"price": "p2"}],
        "email": "a@b.co",
    }


def test_choose_fault_maps_draws_in_order() -> None:
    """A draw falls into the fault whose cumulative band holds it, else no fault."""
    profile = FaultProfile(server_error=0.1, html_502=0.2, drop_after=0.1)
    assert choose_fault(profile, 0.05) == "server_error"
    assert choose_fault(profile, 0.15) == "html_502"
    assert choose_fault(profile, 0.35) == "drop_after"
    assert choose_fault(profile, 0.45) is None


def test_profiles_are_valid_and_bad_day_is_ten_percent() -> None:
    """Every named profile exists, and bad_day faults exactly 10% of requests, drops included."""
    assert {"none", "bad_day", "flaky_network", "rate_limited", "slow", "outage"} <= set(PROFILES)
    bad_day = PROFILES["bad_day"]
    assert bad_day.total() == pytest.approx(0.10)
    assert bad_day.drop_after > 0 and bad_day.drop_before > 0
    assert PROFILES["outage"].outage


def test_fault_profile_rejects_bad_values_all_at_once() -> None:
    """Out-of-range probabilities are named together; sums above 1 are refused."""
    with pytest.raises(ValueError, match=r"server_error.*html_502"):
        FaultProfile(server_error=-0.1, html_502=2.0)
    with pytest.raises(ValueError, match="add up to"):
        FaultProfile(server_error=0.6, drop_after=0.6)
    with pytest.raises(ValueError, match="unknown key: server_eror"):
        profile_from_mapping({"server_eror": 0.1})


def test_mask_key_keeps_prefix_and_last_four() -> None:
    """Masked keys show Stripe's prefix and the last four characters only."""
    assert mask_key("sk_test_abcdefgh1234") == "sk_test_********1234"
    assert mask_key("whatever-secret-9876") == "****************9876"


# --- Stripe shapes --------------------------------------------------------------------------


async def test_customer_lifecycle_has_stripe_shapes(http: aiohttp.ClientSession) -> None:
    """Create, retrieve, update, list and delete a customer with Stripe's object and headers."""
    status, cus, headers = await post(http, "/v1/customers",
                                      "email=a%40b.co&metadata[ref]=r1&expand[]=x",
                                      key="k1", **{"Stripe-Version": "2026-01-01"})
    assert status == 200
    assert cus["id"].startswith("cus_") and cus["object"] == "customer"
    assert cus["livemode"] is False and isinstance(cus["created"], int)
    assert cus["metadata"] == {"ref": "r1"} and cus["email"] == "a@b.co"
    assert headers["Request-Id"].startswith("req_")
    assert headers["Content-Type"] == "application/json"
    assert headers["Stripe-Version"] == "2026-01-01"
    assert headers["Idempotency-Key"] == "k1"

    async with http.get(f"/v1/customers/{cus['id']}") as resp:
        assert (await resp.json())["email"] == "a@b.co"
        assert "Idempotency-Key" not in resp.headers
    status, updated, _ = await post(http, f"/v1/customers/{cus['id']}",
                                    "name=Ann&metadata[ref]=&metadata[tier]=gold")
    assert status == 200 and updated["name"] == "Ann" and updated["metadata"] == {"tier": "gold"}
    _, cleared, _ = await post(http, f"/v1/customers/{cus['id']}", "metadata=")
    assert cleared["metadata"] == {} and cleared["name"] == "Ann"

    await post(http, "/v1/customers", "email=c%40d.co")
    async with http.get("/v1/customers", params={"limit": "1"}) as resp:
        page = await resp.json()
    assert page["object"] == "list" and page["url"] == "/v1/customers"
    assert page["has_more"] is True and len(page["data"]) == 1
    async with http.get("/v1/customers",
                        params={"limit": "5", "starting_after": page["data"][0]["id"]}) as resp:
        rest = await resp.json()
    assert [c["id"] for c in rest["data"]] == [cus["id"]] and rest["has_more"] is False

    async with http.delete(f"/v1/customers/{cus['id']}") as resp:
        assert await resp.json() == {"id": cus["id"], "object": "customer", "deleted": True}
    async with http.delete(f"/v1/customers/{cus['id']}") as resp:
        assert resp.status == 404


async def test_errors_have_stripe_shapes(http: aiohttp.ClientSession) -> None:
    """Unknown path, unknown id and missing param answer Stripe's error bodies."""
    async with http.get("/v1/nothing_here") as resp:
        err = (await resp.json())["error"]
        assert resp.status == 404 and err["type"] == "invalid_request_error"
        assert err["message"].startswith("Unrecognized request URL (GET: /v1/nothing_here)")
        assert resp.headers["Request-Id"].startswith("req_")
    async with http.get("/v1/customers/cus_missing") as resp:
        err = (await resp.json())["error"]
        assert resp.status == 404
        assert (err["code"], err["param"]) == ("resource_missing", "id")
        assert err["message"] == "No such customer: 'cus_missing'"
        assert f"/test/logs/{resp.headers['Request-Id']}?t=" in err["request_log_url"]
    status, body, _ = await post(http, "/v1/payment_intents", "amount=100")
    assert status == 400
    assert body["error"]["code"] == "parameter_missing"
    assert body["error"]["param"] == "currency"
    assert body["error"]["doc_url"].endswith("/parameter-missing")


async def test_payment_intents_confirm_capture_decline_refund(http: aiohttp.ClientSession) -> None:
    """pm_card_visa succeeds, manual capture holds then captures, a declined card is a 402."""
    status, pi, _ = await post(http, "/v1/payment_intents",
                               "amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true")
    assert status == 200 and pi["id"].startswith("pi_") and pi["status"] == "succeeded"

    _, held, _ = await post(http, "/v1/payment_intents",
                            "amount=500&currency=eur&capture_method=manual")
    assert held["status"] == "requires_payment_method"
    _, held, _ = await post(http, f"/v1/payment_intents/{held['id']}/confirm",
                            "payment_method=pm_card_visa")
    assert held["status"] == "requires_capture"
    _, held, _ = await post(http, f"/v1/payment_intents/{held['id']}/capture")
    assert held["status"] == "succeeded" and held["amount_received"] == 500

    status, body, _ = await post(http, "/v1/payment_intents",
                                 "amount=100&currency=usd&payment_method=pm_card_chargeDeclined"
                                 "&confirm=true")
    err = body["error"]
    assert status == 402 and err["type"] == "card_error"
    assert (err["code"], err["decline_code"]) == ("card_declined", "generic_decline")
    assert err["payment_intent"]["status"] == "requires_payment_method"
    assert err["payment_intent"]["id"].startswith("pi_")

    status, refund, _ = await post(http, "/v1/refunds", f"payment_intent={pi['id']}&amount=500")
    assert status == 200 and refund["id"].startswith("re_") and refund["amount"] == 500
    status, body, _ = await post(http, "/v1/refunds", "amount=5")
    assert status == 400 and body["error"]["param"] == "payment_intent"
    async with http.get("/v1/balance") as resp:
        bal = await resp.json()
    assert bal["object"] == "balance"
    assert {a["currency"]: a["amount"] for a in bal["available"]} == {"eur": 500, "usd": 1500}


async def test_file_upload_and_contents(http: aiohttp.ClientSession) -> None:
    """A multipart upload becomes a file object whose url serves the exact bytes."""
    payload = bytes(range(256)) * 4
    form = aiohttp.FormData()
    form.add_field("purpose", "dispute_evidence")
    form.add_field("file", payload, filename="evidence.pdf",
                   content_type="application/octet-stream")
    async with http.post("/v1/files", data=form) as resp:
        assert resp.status == 200
        obj = await resp.json()
    assert obj["id"].startswith("file_") and obj["object"] == "file"
    assert (obj["size"], obj["filename"], obj["purpose"], obj["type"]) == (
        1024, "evidence.pdf", "dispute_evidence", "pdf")
    async with http.get(f"/v1/files/{obj['id']}") as resp:
        assert (await resp.json())["url"] == obj["url"]
    async with http.get(obj["url"]) as resp:
        assert resp.status == 200 and await resp.read() == payload


async def test_oauth_token_and_errors(http: aiohttp.ClientSession) -> None:
    """An ac_ code gives a token once; reuse is invalid_grant in OAuth's flat error shape."""
    status, tok, _ = await post(http, "/oauth/token", "grant_type=authorization_code&code=ac_1")
    assert status == 200 and tok["token_type"] == "bearer"
    assert tok["access_token"].startswith("sk_test_") and tok["stripe_user_id"].startswith("acct_")
    status, body, _ = await post(http, "/oauth/token", "grant_type=authorization_code&code=ac_1")
    assert status == 400 and body["error"] == "invalid_grant"
    assert isinstance(body["error_description"], str)
    status, body, _ = await post(http, "/oauth/token", "grant_type=authorization_code&code=xyz")
    assert status == 400 and body["error"] == "invalid_grant"


async def test_v2_meter_event_takes_json(http: aiohttp.ClientSession) -> None:
    """POST /v2/billing/meter_events reads JSON and answers a v2 object."""
    event = {"event_name": "api_calls", "payload": {"stripe_customer_id": "cus_1", "value": "3"}}
    async with http.post("/v2/billing/meter_events", json=event) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["object"] == "v2.billing.meter_event"
    assert body["payload"] == event["payload"] and body["created"].endswith("Z")


async def test_stripe_python_sdk_round_trip(sim: SimulatorHandle) -> None:
    """The official stripe SDK parses every object and error the simulator sends."""
    def run() -> None:
        client = stripe.StripeClient(
            KEY, base_addresses={"api": sim.url, "files": sim.url, "connect": sim.url},
            max_network_retries=0)
        cus = client.v1.customers.create(params={"email": "sdk@x.co", "metadata": {"ref": "s1"}})
        assert isinstance(cus, stripe.Customer) and cus.metadata is not None
        assert cus.metadata.to_dict() == {"ref": "s1"}
        assert client.v1.customers.retrieve(cus.id).email == "sdk@x.co"
        assert client.v1.customers.update(cus.id, params={"name": "Sdk"}).name == "Sdk"
        assert [c.id for c in client.v1.customers.list().auto_paging_iter()] == [cus.id]
        assert client.v1.customers.delete(cus.id).deleted is True

        upload = io.BytesIO(b"%PDF-1.4 simulated")
        upload.name = "proof.pdf"
        file = client.v1.files.create(params={"purpose": "dispute_evidence", "file": upload})
        assert isinstance(file, stripe.File) and file.size == 18 and file.url
        got = client.v1.files.retrieve(file.id)
        assert got.url is not None
        req = stripe.RequestsClient()
        body, status, _ = req.request(  # the SDK has no call for contents; fetch its url
            "get", got.url, {"Authorization": f"Bearer {KEY}"})
        assert status == 200 and body == b"%PDF-1.4 simulated"

        with pytest.raises(stripe.CardError) as declined:
            client.v1.payment_intents.create(params={
                "amount": 100, "currency": "usd", "payment_method": "pm_card_chargeDeclined",
                "confirm": True})
        assert declined.value.code == "card_declined"
        assert declined.value.error is not None
        assert declined.value.error.decline_code == "generic_decline"
        with pytest.raises(stripe.InvalidRequestError) as missing:
            client.v1.customers.retrieve("cus_nope")
        assert missing.value.code == "resource_missing"
        with pytest.raises(stripe.oauth_error.InvalidGrantError):
            client.oauth.token(params={"grant_type": "authorization_code", "code": "nope"})
        event = client.v2.billing.meter_events.create(
            params={"event_name": "calls", "payload": {"stripe_customer_id": "c", "value": "1"}})
        assert event.event_name == "calls"
        with pytest.raises(stripe.AuthenticationError):
            anon = stripe.StripeClient("pk_test_nope", base_addresses={"api": sim.url})
            anon.v1.balance.retrieve()

    await asyncio.to_thread(run)
    assert sim.books()["refs"] == {"s1": 1}


# --- idempotency ----------------------------------------------------------------------------


async def test_idempotent_replay_is_identical_and_executes_once(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """The same key and params replay status and body, Idempotent-Replayed, Original-Request."""
    first = await post(http, "/v1/customers", "email=a%40b.co&metadata[ref]=once", key="same")
    again = await post(http, "/v1/customers", "metadata[ref]=once&email=a%40b.co", key="same")
    assert first[0] == again[0] == 200
    assert first[1] == again[1]
    assert first[2]["Original-Request"] == first[2]["Request-Id"]
    assert again[2]["Original-Request"] == first[2]["Request-Id"]
    assert again[2]["Request-Id"] != first[2]["Request-Id"]
    assert again[2]["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first[2]
    books = sim.books()
    assert (books["side_effects"], books["replays"], books["duplicates"]) == (1, 1, 0)


async def test_idempotency_keys_are_scoped_per_api_key(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """The same idempotency key under another API key is a new request."""
    await post(http, "/v1/customers", key="shared")
    status, _, headers = await post(http, "/v1/customers", key="shared",
                                    Authorization="Bearer sk_test_otheraccount")
    assert status == 200 and "Idempotent-Replayed" not in headers
    assert sim.books()["side_effects"] == 2


async def test_same_key_different_params_is_idempotency_error(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """Reusing a key with other parameters is a 400 idempotency_error and runs nothing."""
    await post(http, "/v1/customers", "email=a%40b.co", key="k")
    status, body, _ = await post(http, "/v1/customers", "email=z%40b.co", key="k")
    assert status == 400 and body["error"]["type"] == "idempotency_error"
    assert body["error"]["message"].startswith(
        "Keys for idempotent requests can only be used with the same parameters they were first "
        "used with")
    assert sim.books()["side_effects"] == 1


async def test_same_key_while_in_flight_is_409(http: aiohttp.ClientSession) -> None:
    """A second request with a key whose first request still runs gets 409 and runs nothing."""
    async with start_simulator(profile=FaultProfile(work_seconds=0.3)) as slow_sim:
        state = slow_sim.app[SIMULATOR]
        url = slow_sim.url + "/v1/customers"
        hdrs = {**FORM, "Idempotency-Key": "busy"}
        first = asyncio.create_task(http.post(url, data="metadata[ref]=b", headers=hdrs))
        await until(lambda: len(state.idempotency) == 1)
        async with http.post(url, data="metadata[ref]=b", headers=hdrs) as resp:
            body = await resp.json()
            assert resp.status == 409
            assert body["error"]["code"] == "idempotency_key_in_use"
            assert body["error"]["type"] == "idempotency_error"
        async with await first as resp:
            assert resp.status == 200
        # The 409 saved nothing: a retry now replays the first request's answer.
        async with http.post(url, data="metadata[ref]=b", headers=hdrs) as resp:
            assert resp.headers["Idempotent-Replayed"] == "true"
        assert slow_sim.books()["side_effects"] == 1


async def test_validation_failure_is_not_saved(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """A 400 parameter_missing saves nothing: the fixed retry under the same key executes."""
    status, body, _ = await post(http, "/v1/payment_intents", "amount=100", key="fixme")
    assert status == 400 and body["error"]["code"] == "parameter_missing"
    status, pi, headers = await post(http, "/v1/payment_intents", "amount=100&currency=usd",
                                     key="fixme")
    assert status == 200 and pi["currency"] == "usd"
    assert "Idempotent-Replayed" not in headers
    assert sim.books()["side_effects"] == 1


async def test_saved_500_is_replayed(sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """server_error_saved answers 500 (Should-Retry false) and replays it for the same key."""
    sim.set_profile(FaultProfile(server_error_saved=1.0))
    status, body, headers = await post(http, "/v1/customers", "metadata[ref]=s", key="k500")
    assert status == 500 and body["error"]["type"] == "api_error"
    assert headers["Stripe-Should-Retry"] == "false"
    sim.set_profile("none")
    again = await post(http, "/v1/customers", "metadata[ref]=s", key="k500")
    assert again[0] == 500 and again[1] == body
    assert again[2]["Idempotent-Replayed"] == "true"
    assert again[2]["Original-Request"] == headers["Request-Id"]
    assert again[2]["Stripe-Should-Retry"] == "false"
    assert sim.books()["side_effects"] == 0


async def test_long_key_rejected_and_get_ignores_keys(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """Keys over 255 characters are a 400; GET never replays or echoes a key."""
    status, body, _ = await post(http, "/v1/customers", key="x" * 256)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    for _ in range(2):
        async with http.get("/v1/balance", headers={"Idempotency-Key": "g"}) as resp:
            assert resp.status == 200
            assert "Idempotent-Replayed" not in resp.headers
            assert "Idempotency-Key" not in resp.headers
    assert sim.books()["replays"] == 0 and sim.books()["side_effects"] == 0


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "html"),
    [
        ("server_error", 500, False),
        ("html_502", 502, True),
        ("html_503", 503, True),
        ("gateway_504", 504, True),
        ("rate_limited", 429, False),
        ("lock_timeout", 429, False),
    ],
)
async def test_answered_fault_shapes(sim: SimulatorHandle, http: aiohttp.ClientSession,
                                     kind: str, status: int, html: bool) -> None:
    """Each answered fault has its status and shape, and nothing executes."""
    sim.set_profile(profile_from_mapping({kind: 1.0}))
    async with http.post("/v1/customers", data="metadata[ref]=f", headers=FORM) as resp:
        assert resp.status == status
        if html:
            assert resp.content_type == "text/html"
            assert "<html>" in await resp.text()
            assert "Request-Id" not in resp.headers
            assert not any(h.lower().startswith("stripe-") for h in resp.headers)
        else:
            err = (await resp.json())["error"]
            assert resp.headers["Request-Id"].startswith("req_")
            assert resp.headers["Stripe-Should-Retry"] == "true"
            reason = resp.headers.get("Stripe-Rate-Limited-Reason")
            if kind == "server_error":
                assert err["type"] == "api_error"
            elif kind == "rate_limited":
                assert (err["type"], err["code"]) == ("invalid_request_error", "rate_limit")
                assert reason in {"global-rate", "global-concurrency", "endpoint-rate",
                                  "endpoint-concurrency", "resource-specific"}
            else:
                assert (err["type"], err["code"]) == ("invalid_request_error", "lock_timeout")
                assert reason is None
    books = sim.books()
    assert books["faults"] == {kind: 1} and books["side_effects"] == 0


async def test_drop_before_resets_without_executing(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """drop_before resets the connection with no answer and no side effect."""
    sim.set_profile(FaultProfile(drop_before=1.0))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, "/v1/customers", "metadata[ref]=d")
    assert sim.books()["side_effects"] == 0 and sim.books()["faults"] == {"drop_before": 1}


async def test_drop_after_executes_then_resets(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """drop_after runs the write and resets; a keyless retry duplicates, a keyed one replays."""
    sim.set_profile(FaultProfile(drop_after=1.0))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, "/v1/payment_intents", "amount=100&currency=usd&metadata[ref]=p1")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, "/v1/payment_intents", "amount=100&currency=usd&metadata[ref]=p2",
                   key="kp2")
    assert sim.books()["side_effects"] == 2

    sim.set_profile("none")
    await post(http, "/v1/payment_intents", "amount=100&currency=usd&metadata[ref]=p1")
    status, _, headers = await post(http, "/v1/payment_intents",
                                    "amount=100&currency=usd&metadata[ref]=p2", key="kp2")
    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    books = sim.books()
    assert books["refs"] == {"p1": 2, "p2": 1}
    assert (books["side_effects"], books["duplicates"]) == (3, 1)


async def test_slow_answers_correctly_after_the_delay(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """slow delays the answer by slow_seconds and still executes once."""
    sim.set_profile(FaultProfile(slow=1.0, slow_seconds=0.2))
    started = time.monotonic()
    status, cus, _ = await post(http, "/v1/customers", "metadata[ref]=slow")
    assert status == 200 and cus["object"] == "customer"
    assert time.monotonic() - started >= 0.2
    assert sim.books()["faults"] == {"slow": 1} and sim.books()["side_effects"] == 1


async def test_outage_answers_every_request_with_html_503(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """The outage profile answers every request at once with an HTML 503."""
    async with http.post("/_sim/faults", json={"profile": "outage"}) as resp:
        assert (await resp.json())["outage"] is True
    for path in ("/v1/balance", "/v1/customers/cus_1"):
        async with http.get(path) as resp:
            assert resp.status == 503 and resp.content_type == "text/html"
    assert sim.books()["faults"] == {"outage": 2}


async def test_seeded_profile_repeats_its_fault_sequence(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """The same seed gives the same sequence of faults; another seed gives another."""
    profile: dict[str, Any] = {"server_error": 0.2, "html_502": 0.2, "rate_limited": 0.2,
                               "lock_timeout": 0.1}

    async def statuses(seed: int) -> list[tuple[int, str | None]]:
        async with http.post("/_sim/faults", json={**profile, "seed": seed}) as resp:
            assert resp.status == 200
        out = []
        for _ in range(40):
            async with http.get("/v1/balance") as resp:
                out.append((resp.status, resp.headers.get("Stripe-Rate-Limited-Reason")))
        return out

    first = await statuses(42)
    assert len(set(first)) >= 4
    assert await statuses(42) == first
    assert await statuses(43) != first
    sim.set_profile(FaultProfile(**profile), seed=42)
    sim.reset()  # reset restarts the sequence from the seed too
    assert await statuses(42) == first


# --- books, control, auth -------------------------------------------------------------------


async def test_books_count_duplicates_and_template_operations(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """Three executions of one ref are two duplicates; operations are templated, /_sim uncounted."""
    for _ in range(3):
        _, cus, _ = await post(http, "/v1/customers", "metadata[ref]=triple")
    await post(http, f"/v1/customers/{cus['id']}", "metadata[ref]=other")
    async with http.get(f"/v1/customers/{cus['id']}"):
        pass
    async with http.get("/_sim/books") as resp:
        books = await resp.json()
    assert books == sim.books()
    assert books["requests"] == 5
    assert books["by_operation"] == {"POST /v1/customers": 3, "POST /v1/customers/{id}": 1,
                                     "GET /v1/customers/{id}": 1}
    assert books["refs"] == {"triple": 3, "other": 1}
    assert (books["side_effects"], books["duplicates"]) == (4, 2)

    async with http.post("/_sim/reset") as resp:
        assert resp.status == 200
    assert sim.books()["requests"] == 0
    async with http.get(f"/v1/customers/{cus['id']}") as resp:
        assert resp.status == 404


async def test_control_endpoint_rejects_unknown_fault_fields(http: aiohttp.ClientSession) -> None:
    """POST /_sim/faults names every unknown key and keeps the old profile."""
    async with http.post("/_sim/faults", json={"sever_error": 1, "dorp": 1}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "unknown keys: dorp, sever_error"
    async with http.get("/_sim/faults") as resp:
        assert (await resp.json())["server_error"] == 0.0


async def test_auth_failures(sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """Missing, bad and revoked keys get 401 with the key masked; read-only keys 403 on writes."""
    async with aiohttp.ClientSession(base_url=sim.url) as anon:
        async with anon.get("/v1/balance") as resp:
            assert resp.status == 401
            assert "did not provide an API key" in (await resp.json())["error"]["message"]
        bad = "sk_tset_supersecretvalue1234"
        async with anon.get("/v1/balance", headers={"Authorization": f"Bearer {bad}"}) as resp:
            err = (await resp.json())["error"]
            assert resp.status == 401 and err["type"] == "invalid_request_error"
            assert err["message"].startswith("Invalid API Key provided: ")
            assert err["message"].endswith("1234") and "supersecret" not in err["message"]
        basic = base64.b64encode(f"{KEY}:".encode()).decode()
        async with anon.get("/v1/balance", headers={"Authorization": f"Basic {basic}"}) as resp:
            assert resp.status == 200

        victim = "sk_test_revokedkey99998888"
        async with anon.post("/_sim/keys/revoke", json={"key": victim}) as resp:
            assert resp.status == 200
        async with anon.get("/v1/balance", headers={"Authorization": f"Bearer {victim}"}) as resp:
            message = (await resp.json())["error"]["message"]
            assert resp.status == 401
            assert message == "Invalid API Key provided: sk_test_**************8888"

        readonly = {"Authorization": "Bearer rk_test_readonly_abc123"}
        async with anon.get("/v1/balance", headers=readonly) as resp:
            assert resp.status == 200
        async with anon.post("/v1/customers", headers=readonly) as resp:
            assert resp.status == 403
            assert "rk_test_readonly_abc123" not in await resp.text()
    assert sim.books()["side_effects"] == 0


def test_run_simulator_serves_until_sigterm() -> None:
    """run_simulator prints its URL, serves, and exits cleanly on SIGTERM."""
    code = ("from proxy.simulator import run_simulator; "
            "run_simulator('127.0.0.1', 0, 'none', 0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        url = line.split("listening on ")[1].split()[0]

        async def ping() -> int:
            async with aiohttp.ClientSession() as s, s.get(url + "/v1/balance",
                                                           headers=AUTH) as resp:
                return resp.status

        assert asyncio.run(ping()) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_drop_does_not_log_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Simulated resets leave no error log lines behind."""
    async def go() -> None:
        async with start_simulator(profile=FaultProfile(drop_before=0.5, drop_after=0.5)) as s, \
                aiohttp.ClientSession(base_url=s.url, headers=AUTH) as session:
            for _ in range(6):
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await post(session, "/v1/customers")

    asyncio.run(go())
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]



async def test_account_rate_limit_answers_like_stripe_and_is_booked(
        sim: SimulatorHandle, http: aiohttp.ClientSession) -> None:
    """Past account_rate/burst a key gets 429 rate_limit with global-rate, counted in the books."""
    async with http.post("/_sim/faults", json={"account_rate": 0.001, "account_burst": 3}) as resp:
        assert (await resp.json())["account_rate"] == 0.001
    statuses = []
    for _ in range(5):
        async with http.get("/v1/balance") as resp:
            statuses.append(resp.status)
            last_body, last_headers = await resp.json(), resp.headers
    assert statuses == [200, 200, 200, 429, 429]
    assert last_body["error"]["code"] == "rate_limit"
    assert last_body["error"]["type"] == "invalid_request_error"
    assert last_headers["Stripe-Rate-Limited-Reason"] == "global-rate"
    assert "Request-Id" in last_headers
    other_key = {"Authorization": "Bearer sk_test_other"}  # another key: its own bucket
    async with aiohttp.ClientSession(base_url=sim.url) as other, other.get("/v1/balance", headers=other_key) as r:
        assert r.status == 200
    books = sim.books()
    assert books["rate_limited"] == {"global-rate": 2}
    assert books["requests"] == 6
    async with http.post("/_sim/faults", json={"account_rate": 0}) as resp:
        assert resp.status == 400  # a rate must be positive (or null)


def test_simulate_command_takes_rate_limit_flags() -> None:
    """`stripe-sidecar simulate --account-rate` rejects a bad rate before opening a socket."""
    from proxy.cli import main

    assert main(["simulate", "--port", "0", "--account-rate", "-5"]) == 2
