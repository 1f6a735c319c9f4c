"""Webhook notifications: payloads, dedup, retries (respx), and a real receiver on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import httpx
import respx
from aiohttp import web

from proxy.alerts import AlertSettings, Notifier, Webhook, payload
from proxy.diagnosis import Diagnosis, DiagnosisEngine, DiagnosisEvent
from proxy.log import Logger
from proxy.rules import DiagnosisSettings
from proxy.simulator import start_simulator

HOOK = "https://hooks.example.test/services/T000/B000/secretToken"
OUTAGE = Diagnosis("stripe_outage", "critical", "Stripe is failing.", {"count": 9, "share": 1.0},
                   "Wait.", 1.8e9)


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Log:
    def __init__(self) -> None:
        import io

        self.stream = io.StringIO()
        self.logger = Logger(self.stream)


def _notifier(settings: AlertSettings, client: httpx.AsyncClient, clock: Any = time.monotonic,
              sleeps: list[float] | None = None) -> tuple[Notifier, DiagnosisEngine, _Log]:
    engine = DiagnosisEngine(DiagnosisSettings())
    log = _Log()
    waits = sleeps if sleeps is not None else []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    n = Notifier(settings, engine, log=log.logger, client=client, clock=clock, sleep=sleep)
    return n, engine, log


def test_slack_payload_has_text_and_blocks() -> None:
    """The Slack form carries a text fallback and mrkdwn blocks with summary and advice."""
    body = payload("raised", OUTAGE, "slack")
    assert "stripe_outage" in body["text"] and "Stripe is failing." in body["text"]
    assert body["blocks"][0]["type"] == "section" and "What to do" in body["blocks"][1]["text"]["text"]


def test_generic_payload_is_the_diagnosis_document() -> None:
    """The JSON form names the event and carries the diagnosis as /diagnosis shows it."""
    body = payload("cleared", OUTAGE, "json")
    assert body["event"] == "diagnosis_cleared" and body["diagnosis"]["kind"] == "stripe_outage"
    assert body["diagnosis"]["raised_at"].endswith("Z")


@respx.mock
async def test_raise_and_clear_are_sent_once_each_even_if_published_twice() -> None:
    """Duplicate events are dropped: one POST for the raise, one for the clear."""
    route = respx.post(HOOK).mock(return_value=httpx.Response(200))
    async with httpx.AsyncClient() as client:
        n, _, log = _notifier(AlertSettings(webhooks=(Webhook(HOOK, "slack"),)), client)
        n.start()
        for _ in range(2):
            n.on_event(DiagnosisEvent("raised", OUTAGE))
        cleared = Diagnosis(**{**_fields(OUTAGE), "cleared_at": 1.8e9 + 60})
        for _ in range(2):
            n.on_event(DiagnosisEvent("cleared", cleared))
        await n.drain()
        await n.stop()
    assert route.call_count == 2
    assert "secretToken" not in log.stream.getvalue() and "hooks.example.test" in log.stream.getvalue()


@respx.mock
async def test_failures_are_retried_with_doubling_backoff() -> None:
    """503, a connect error, then 200: delivered on the third try after 1 s and 2 s waits."""
    route = respx.post(HOOK).mock(side_effect=[httpx.Response(503), httpx.ConnectError("down"),
                                               httpx.Response(204)])
    sleeps: list[float] = []
    async with httpx.AsyncClient() as client:
        n, _, _ = _notifier(AlertSettings(webhooks=(Webhook(HOOK),)), client, sleeps=sleeps)
        assert await n.deliver(Webhook(HOOK), "raised", OUTAGE) is True
    assert route.call_count == 3 and sleeps == [1.0, 2.0]


@respx.mock
async def test_a_refused_payload_is_not_retried() -> None:
    """A 400 from the receiver is final: one try, reported as failed."""
    route = respx.post(HOOK).mock(return_value=httpx.Response(400))
    async with httpx.AsyncClient() as client:
        n, _, log = _notifier(AlertSettings(webhooks=(Webhook(HOOK),)), client)
        assert await n.deliver(Webhook(HOOK), "raised", OUTAGE) is False
    assert route.call_count == 1 and "alert_failed" in log.stream.getvalue()


@respx.mock
async def test_active_diagnoses_are_re_sent_at_the_interval() -> None:
    """A diagnosis still active after resend_interval is sent again as a reminder, once per interval."""
    route = respx.post(HOOK).mock(return_value=httpx.Response(200))
    clock = FakeClock()
    async with httpx.AsyncClient() as client:
        n, engine, _ = _notifier(AlertSettings(webhooks=(Webhook(HOOK),), resend_interval=600),
                                 client, clock=clock)
        n.start()
        engine.active["stripe_outage"] = OUTAGE
        n.on_event(DiagnosisEvent("raised", OUTAGE))
        clock.advance(599)
        assert n.remind() == 0
        clock.advance(1)
        assert n.remind() == 1 and n.remind() == 0
        await n.drain()
        await n.stop()
    events = [c.request.content for c in route.calls]
    assert len(events) == 2 and b"diagnosis_reminder" in events[1]


async def test_the_queue_is_bounded_and_never_blocks() -> None:
    """With the queue full, further events are dropped and counted, not awaited."""
    async with httpx.AsyncClient() as client:
        n, _, _ = _notifier(AlertSettings(webhooks=(Webhook(HOOK),), queue_size=1), client)
        for i in range(3):
            n.on_event(DiagnosisEvent("raised", Diagnosis(**{**_fields(OUTAGE), "raised_at": i})))
    assert n.dropped == 2


async def test_a_real_receiver_gets_raise_and_clear_exactly_once(make_sidecar: Any) -> None:
    """Through a sidecar in an outage and back: a loopback webhook receives raised then cleared, once each."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with start_simulator() as sim:
            sidecar = await make_sidecar(
                sim.url,
                diagnosis={"interval": 0.1, "window": 1.0, "raise_after": 0.2, "clear_after": 0.5,
                           "stripe_outage": {"min_count": 3}},
                alerts={"webhooks": [f"http://127.0.0.1:{port}/hook"], "resend_interval": 0},
                retry={"max_attempts": 1},
                breaker={"enabled": False},
                host_breaker={"enabled": False},
                log={"access_log": False},
            )
            sim.set_profile("outage")
            await _drive_until(sidecar.url, lambda: len(received) >= 1)
            sim.set_profile("none")
            await _drive_until(sidecar.url, lambda: len(received) >= 2)
            await _drive_for(sidecar.url, 1.5)  # long enough for any duplicate to show up
    finally:
        await runner.cleanup()
    assert [r["event"] for r in received] == ["diagnosis_raised", "diagnosis_cleared"]
    assert all(r["diagnosis"]["kind"] == "stripe_outage" for r in received)


async def _drive_until(url: str, done: Any, deadline: float = 15.0) -> None:
    start = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while not done():
            if time.monotonic() - start > deadline:
                raise AssertionError("the receiver did not get the expected alert in time")
            for path in ("/v1/balance", "/v1/customers"):
                async with s.get(url + path, headers={"Authorization": "Bearer sk_test_a1"}) as r:
                    await r.read()
            await asyncio.sleep(0.02)


async def _drive_for(url: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    await _drive_until(url, lambda: time.monotonic() >= end, deadline=seconds + 5)


def _fields(d: Diagnosis) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(d, f.name) for f in dataclasses.fields(d)}

