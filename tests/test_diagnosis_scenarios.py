"""Diagnosis end to end: the simulator's troubles through a real sidecar, read from /diagnosis.

Each scenario runs app traffic through the sidecar, switches a trouble on in the simulator, polls
/diagnosis (with a deadline) until the right kind is active, switches it off, and polls until it
clears. Windows and hysteresis are short here (seconds, not tens of seconds) so the suite stays
fast; the unit tests cover the shipped defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from ports import free_port
from waiting import poll

from proxy.simulator import start_simulator

KEY = "sk_test_diagPrimaryKey0000000001"
AUTH = {"Authorization": f"Bearer {KEY}"}

DIAGNOSIS = {
    "interval": 0.1,
    "window": 1.5,
    "raise_after": 0.3,
    "clear_after": 0.8,
    "stripe_outage": {"min_count": 3},
    "network_failure": {"min_count": 3},
    "auth_failure": {"min_count": 2},
    "rate_limited": {"min_count": 3},
    "latency_degraded": {"p99": 0.15, "min_count": 3},
    "client_errors_spike": {"min_count": 3},
    "idempotency_misuse": {"min_count": 2},
}
FAST = {
    "diagnosis": DIAGNOSIS,
    "retry": {"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.02, "attempt_timeout": 2.0},
    "breaker": {"open_duration": 0.3, "open_duration_max": 0.3, "min_calls": 5},
    "host_breaker": {"open_duration": 0.3, "open_duration_max": 0.3},
    "log": {"access_log": False},
}
CALLS = [
    ("POST", "/v1/customers", "email=a%40example.com"),
    ("GET", "/v1/balance", None),
    ("GET", "/v1/customers", None),
]


class Traffic:
    """An app calling Stripe through the sidecar in a loop, a few calls at a time."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.headers = dict(headers or AUTH)
        self.statuses: list[int] = []
        self.diagnosis_headers: set[str] = set()
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Traffic:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(3)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert self._session is not None
        await self._session.close()

    async def _loop(self, worker: int) -> None:
        assert self._session is not None
        n = worker
        while not self._stop:
            method, path, body = CALLS[n % len(CALLS)]
            n += 1
            headers = dict(self.headers)
            if body is not None:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            try:
                async with self._session.request(
                    method, self.base + path, data=body, headers=headers
                ) as resp:
                    await resp.read()
                    self.statuses.append(resp.status)
                    if "Sidecar-Diagnosis" in resp.headers:
                        self.diagnosis_headers.add(resp.headers["Sidecar-Diagnosis"])
            except aiohttp.ClientError:
                self.statuses.append(0)
            await asyncio.sleep(0.01)


async def diagnosis(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(base + "/diagnosis") as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


async def until(check: Callable[[], Awaitable[bool]], deadline: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took (fails after ``deadline`` seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {deadline} s: {what}")


def active_kinds(doc: dict[str, Any]) -> set[str]:
    return {d["kind"] for d in doc["active"]}


async def raised_then_cleared(
    base: str, kind: str, trouble: Callable[[], Awaitable[None]], health: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    """Switch trouble on, wait for ``kind``; switch it off, wait for it to clear; its diagnosis."""
    await until(lambda: _no_active(base), 10, "a quiet start")
    await trouble()
    found: dict[str, Any] = {}

    async def is_active() -> bool:
        doc = await diagnosis(base)
        for d in doc["active"]:
            if d["kind"] == kind:
                found.update(d)
        return bool(found)

    await until(is_active, 10, f"{kind} raised")
    await health()

    async def cleared() -> bool:
        return kind not in active_kinds(await diagnosis(base))

    await until(cleared, 30, f"{kind} cleared")
    return found


async def _no_active(base: str) -> bool:
    return not (await diagnosis(base))["active"]


async def _post_sim(url: str, path: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()


@pytest.fixture
async def sim() -> AsyncIterator[Any]:
    async with start_simulator() as handle:
        yield handle


async def test_outage_raises_stripe_outage_and_tags_answers(sim: Any, make_sidecar: Any) -> None:
    """An outage raises stripe_outage (critical) within 10 s, answers carry Sidecar-Diagnosis, and it clears."""
    sidecar = await make_sidecar(sim.url, **FAST)
    async with Traffic(sidecar.url) as traffic:

        async def trouble() -> None:
            sim.set_profile("outage")

        async def health() -> None:
            # The app's next answer carries it: on a busy machine it may come a while after the raise.
            await poll(lambda: "stripe_outage" in traffic.diagnosis_headers, timeout=10.0,
                       what="an answer tagged stripe_outage")
            assert 'stripe_sidecar_diagnosis_active{kind="stripe_outage"} 1.0' in await _metrics(
                sidecar.url
            )
            sim.set_profile("none")

        d = await raised_then_cleared(sidecar.url, "stripe_outage", trouble, health)
    assert d["severity"] == "critical" and len(d["evidence"]["operations"]) >= 2
    assert d["evidence"]["window_seconds"] == 1.5
    assert 'stripe_sidecar_diagnosis_active{kind="stripe_outage"} 0.0' in await _metrics(sidecar.url)
    sidecar.log.flush()
    log = sidecar.log._stream.getvalue()
    # stripe_outage never flapped (a loaded test machine may add latency_degraded: not counted).
    events = [line for line in log.splitlines() if '"kind":"stripe_outage"' in line]
    assert sum('"event":"diagnosis_raised"' in line for line in events) == 1
    assert sum('"event":"diagnosis_cleared"' in line for line in events) == 1


async def _metrics(base: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as resp:
        return await resp.text()


async def test_revoked_key_raises_auth_failure(sim: Any, make_sidecar: Any) -> None:
    """A key revoked mid-run raises auth_failure naming the 401, and clears once the key works again."""
    sidecar = await make_sidecar(sim.url, **FAST)
    async with Traffic(sidecar.url):
        d = await raised_then_cleared(
            sidecar.url,
            "auth_failure",
            lambda: _post_sim(sim.url, "/_sim/keys/revoke", {"key": KEY}),
            lambda: _post_sim(sim.url, "/_sim/keys/restore", {"key": KEY}),
        )
    assert d["severity"] == "critical" and d["evidence"]["unauthorized_401"] >= 2
    assert d["evidence"]["example_request_ids"]


async def test_account_rate_limit_raises_rate_limited(sim: Any, make_sidecar: Any) -> None:
    """The simulator's account rate limit (5/s per key) raises rate_limited naming global-rate."""
    sidecar = await make_sidecar(sim.url, **FAST)

    async def trouble() -> None:
        sim.set_profile(_profile(account_rate=5.0))

    async def health() -> None:
        sim.set_profile("none")

    async with Traffic(sidecar.url):
        d = await raised_then_cleared(sidecar.url, "rate_limited", trouble, health)
    assert d["evidence"]["reasons"].get("global-rate", 0) >= 3 and "global-rate" in d["summary"]


async def test_dropped_network_raises_network_failure_at_connect(make_sidecar: Any) -> None:
    """With the upstream port closed, network_failure names the connect step; it clears when the port is back."""
    port = free_port()
    stack = contextlib.AsyncExitStack()
    sim = await stack.enter_async_context(start_simulator(port=port))
    sidecar = await make_sidecar(sim.url, **FAST)
    try:
        async with Traffic(sidecar.url):

            async def trouble() -> None:
                await stack.aclose()

            async def health() -> None:
                await stack.enter_async_context(start_simulator(port=port))

            d = await raised_then_cleared(sidecar.url, "network_failure", trouble, health)
    finally:
        await stack.aclose()
    assert d["evidence"]["failing_step"] == "connect" and "connect step" in d["summary"]


async def test_burst_of_400s_on_one_operation_raises_client_errors_spike(
    sim: Any, make_sidecar: Any
) -> None:
    """400s on POST /v1/customers raise client_errors_spike naming it, the code and the param."""
    sidecar = await make_sidecar(sim.url, **FAST)
    async with Traffic(sidecar.url):
        d = await raised_then_cleared(
            sidecar.url,
            "client_errors_spike",
            lambda: _post_sim(sim.url, "/_sim/scenarios/bad_requests",
                              {"operation": "POST /v1/customers", "param": "email"}),
            lambda: _post_sim(sim.url, "/_sim/scenarios/bad_requests",
                              {"operation": "POST /v1/customers", "count": 0}),
        )
    assert d["evidence"]["operations"] == ["POST /v1/customers"]
    assert d["evidence"]["top_errors"][0]["param"] == "email"
    assert d["evidence"]["top_errors"][0]["code"] == "parameter_invalid_string"


async def test_slow_stripe_raises_latency_degraded(sim: Any, make_sidecar: Any) -> None:
    """Answers 0.3 s late raise latency_degraded (p99 over 0.15 s) and it clears when fast again."""
    sidecar = await make_sidecar(sim.url, **FAST)

    async def trouble() -> None:
        sim.set_profile(_profile(slow=1.0, slow_seconds=0.3))

    async def health() -> None:
        sim.set_profile("none")

    async with Traffic(sidecar.url):
        d = await raised_then_cleared(sidecar.url, "latency_degraded", trouble, health)
    assert d["evidence"]["p99_ms"] > 150


async def test_healthy_traffic_raises_nothing_with_the_shipped_defaults(
    sim: Any, make_sidecar: Any
) -> None:
    """The `none` profile meets no default threshold (raise_after 0: one evaluation would raise)."""
    sidecar = await make_sidecar(
        sim.url, diagnosis={"interval": 0.1, "raise_after": 0.0}, log={"access_log": False}
    )
    async with Traffic(sidecar.url) as traffic:
        await until(lambda: _enough(traffic, 150), 20, "150 answers")
    doc = await diagnosis(sidecar.url)
    assert doc["active"] == [] and doc["recent"] == []
    ops = doc["operations"]
    assert ops["POST /v1/customers"]["success_ratio"] == 1.0
    assert ops["GET /v1/balance"]["breaker"] == "closed"


async def test_keys_appear_nowhere(sim: Any, make_sidecar: Any) -> None:
    """After an auth failure, no key appears in logs, /metrics, /diagnosis or /status."""
    sidecar = await make_sidecar(sim.url, **{**FAST, "log": {"access_log": True}})
    async with Traffic(sidecar.url):
        await raised_then_cleared(
            sidecar.url,
            "auth_failure",
            lambda: _post_sim(sim.url, "/_sim/keys/revoke", {"key": KEY}),
            lambda: _post_sim(sim.url, "/_sim/keys/restore", {"key": KEY}),
        )
    texts = [sidecar.log._stream.getvalue()]
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/diagnosis", "/status"):
            async with s.get(sidecar.url + path) as resp:
                texts.append(await resp.text())
    assert "diagnosis_raised" in texts[0] and "auth_failure" in texts[2]
    for text in texts:
        assert KEY not in text and KEY[8:] not in text and KEY[-12:] not in text


def _profile(**fields: Any) -> Any:
    from proxy.simulator.faults import profile_from_mapping

    return profile_from_mapping(fields)


async def _enough(traffic: Traffic, n: int) -> bool:
    return len(traffic.statuses) >= n


async def test_reused_idempotency_keys_raise_idempotency_misuse(sim: Any, make_sidecar: Any) -> None:
    """One Idempotency-Key sent with different parameters raises idempotency_misuse, then clears."""
    sidecar = await make_sidecar(sim.url, **FAST)
    misuse = {"on": False}

    async def reuse_keys() -> None:
        async with aiohttp.ClientSession() as s:
            n = 0
            while True:
                if misuse["on"]:
                    n += 1
                    headers = {**AUTH, "Idempotency-Key": "order-42",
                               "Content-Type": "application/x-www-form-urlencoded"}
                    async with s.post(sidecar.url + "/v1/customers", data=f"email=u{n}%40x.com",
                                      headers=headers) as resp:
                        await resp.read()
                await asyncio.sleep(0.02)

    async def trouble() -> None:
        misuse["on"] = True

    async def health() -> None:
        misuse["on"] = False

    task = asyncio.create_task(reuse_keys())
    try:
        async with Traffic(sidecar.url):
            d = await raised_then_cleared(sidecar.url, "idempotency_misuse", trouble, health)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert d["evidence"]["operations"] == ["POST /v1/customers"] and d["evidence"]["count"] >= 2


async def test_healing_actions_show_on_diagnosis_metrics_and_log(sim: Any, make_sidecar: Any) -> None:
    """A recorded action appears in /diagnosis actions, is counted by kind and result, and logged once."""
    sidecar = await make_sidecar(sim.url, **FAST)
    sidecar.diagnosis.record_action(
        "pool_reset", "network_failure", "Reconnect after connect failures.", "ok",
        before="3 idle", after="0 idle",
    )
    doc = await diagnosis(sidecar.url)
    assert doc["actions"][0]["kind"] == "pool_reset" and doc["actions"][0]["result"] == "ok"
    assert doc["actions"][0]["at"].endswith("Z")
    assert 'stripe_sidecar_healing_actions_total{kind="pool_reset",result="ok"} 1.0' in await _metrics(
        sidecar.url
    )
    sidecar.log.flush()
    assert sidecar.log._stream.getvalue().count('"event":"healing_action"') == 1


async def test_a_bad_day_raises_nothing_with_the_shipped_defaults(make_sidecar: Any) -> None:
    """10% transient faults (bad_day), retried by the sidecar, meet no default threshold at all.

    raise_after is 0 here, so a threshold met for a single evaluation would raise.
    """
    async with start_simulator(profile="bad_day", seed=7) as sim:
        sidecar = await make_sidecar(sim.url, diagnosis={"interval": 0.1, "raise_after": 0.0},
                                     log={"access_log": False},
                                     retry={"base_delay": 0.01, "max_delay": 0.05})
        async with Traffic(sidecar.url) as traffic:
            await until(lambda: _enough(traffic, 400), 30, "400 answers")
        doc = await diagnosis(sidecar.url)
    assert doc["active"] == [] and doc["recent"] == []
    assert sim.books()["faults"], "the profile injected faults"
