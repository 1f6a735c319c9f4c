"""The shared limiter's Lua scripts on a real redis-server: one cut per overload, joins, shares, quiet."""

from __future__ import annotations

import io
import json
import time

import pytest
from prometheus_client import CollectorRegistry

from proxy.diagnosis import DiagnosisEngine
from proxy.log import Logger
from proxy.ratelimit import GLOBAL_SCOPE, RateLimiter, RateLimitSettings
from proxy.rules import DiagnosisSettings
from proxy.sharedlimit import SharedLimit, state_key


class FakeClock:
    """A monotonic clock that moves only when told (the limiter's; Redis keeps its own time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


KEYS = (state_key("acct-test") + ":state", state_key("acct-test") + ":demand")


def _replica(url: str, **settings: float) -> SharedLimit:
    limiter = RateLimiter(RateLimitSettings(**settings), FakeClock())  # type: ignore[arg-type]
    return SharedLimit(
        url, limiter, identity=lambda: "acct-test", engine=DiagnosisEngine(DiagnosisSettings()),
        log=Logger(io.StringIO()), registry=CollectorRegistry(), interval=0.05, clock=FakeClock(),
    )


@pytest.fixture
async def pair(redis_url: str):
    a, b = _replica(redis_url), _replica(redis_url)
    yield a, b
    await a.stop()
    await b.stop()


async def test_reports_within_the_hold_join_one_event_whose_base_is_their_sum(pair) -> None:
    """A cuts from 60/s accepted, B reports 50/s in the same hold: one event, base 110/s, rate 0.7 x 110."""
    a, b = pair
    first = (await a._report(KEYS, GLOBAL_SCOPE, 60.0, "cut", ""))["state"]
    second = (await b._report(KEYS, GLOBAL_SCOPE, 50.0, "cut", ""))["state"]
    assert second["event"] == first["event"]
    assert first["w_max"] == pytest.approx(60.0)
    assert second["w_max"] == pytest.approx(110.0)
    assert second["contrib"] == {a.replica: 60.0, b.replica: 50.0}
    assert second["k"] == pytest.approx((110.0 * 0.3 / 0.4) ** (1 / 3))
    again = (await b._report(KEYS, GLOBAL_SCOPE, 999.0, "cut", ""))["state"]
    assert again["w_max"] == pytest.approx(110.0)  # a replica counts once per event


async def test_a_join_names_its_event_and_never_cuts(pair) -> None:
    """A join for another event, or with no event at all, changes nothing."""
    a, b = pair
    assert (await b._report(KEYS, GLOBAL_SCOPE, 40.0, "join", "nope")).get("state") is None
    event = (await a._report(KEYS, GLOBAL_SCOPE, 60.0, "cut", ""))["state"]["event"]
    stale = (await b._report(KEYS, GLOBAL_SCOPE, 40.0, "join", "1.2"))["state"]
    assert stale["w_max"] == pytest.approx(60.0) and b.replica not in stale["contrib"]
    joined = (await b._report(KEYS, GLOBAL_SCOPE, 40.0, "join", event))["state"]
    assert joined["w_max"] == pytest.approx(100.0)
    assert joined["last_throttle"] == stale["last_throttle"]  # a join is not a new 429


async def test_a_cut_after_the_hold_starts_a_new_event_capped_by_the_fleet_rate(redis_url: str) -> None:
    """Past the hold, a cut from a replica at weight 1 reporting 500/s starts anew, capped at the fleet's rate then."""
    a = _replica(redis_url, decrease_interval=0.05)
    try:
        first = (await a._report(KEYS, GLOBAL_SCOPE, 100.0, "cut", ""))["state"]

        async def later() -> bool:
            reply = await a._report(KEYS, GLOBAL_SCOPE, 500.0, "cut", "")
            return reply["state"]["event"] != first["event"]

        deadline = time.monotonic() + 5  # Redis's clock must pass the 0.5 s hold
        while not await later():
            assert time.monotonic() < deadline, "the hold never ended"
        state = json.loads(await a._client.hget(KEYS[0], GLOBAL_SCOPE))
        assert 70.0 <= state["cap"] <= 75.0  # 0.7 x 100 regrowing for a moment
        assert state["w_max"] == pytest.approx(state["cap"])
    finally:
        await a.stop()


async def test_a_sync_gives_a_dormant_replica_the_fleet_state_at_its_fair_share(pair) -> None:
    """B never saw a 429: one sync later its limiter paces at its max-min share of the fleet's cubic, and B has joined the event."""
    a, b = pair
    for _ in range(20):  # B's app asks 20 requests in its first half second: 40/s
        b.limiter.reserve("GET /v1/balance")
    b.limiter._clock.advance(0.5)  # type: ignore[attr-defined]
    await a._report(KEYS, GLOBAL_SCOPE, 90.0, "cut", "")
    await a.step()  # A learns the fleet's scope ...
    await a.step()  # ... and reports its demand for it: 0 (its app asked nothing)
    await b.step()
    state = b.limiter.state()[GLOBAL_SCOPE]
    assert state["adaptive"] is True
    # The fleet's rate 0.7 x 90 = 63: B asks 40 (44 with headroom), A nothing; the spare 19 is
    # split between them.
    assert state["fleet_weight"] == pytest.approx((44.0 + 19.0 / 2) / 63.0, rel=0.01)
    stored = json.loads(await b._client.hget(KEYS[0], GLOBAL_SCOPE))
    assert b.replica in stored["contrib"]
    assert b.up is True and b.syncs == 1 and a.syncs == 2


async def test_a_quiet_fleet_forgets_the_scope(redis_url: str) -> None:
    """After quiet_period with no cut the sync drops the scope: replicas go back to dormant."""
    a = _replica(redis_url, quiet_period=0.2)
    try:
        await a._report(KEYS, GLOBAL_SCOPE, 90.0, "cut", "")
        await a.step()
        assert a.status()["scopes"] == [GLOBAL_SCOPE]

        async def forgotten() -> bool:
            await a.step()
            return a.status()["scopes"] == []

        deadline = time.monotonic() + 5  # Redis's clock must pass quiet_period
        while not await forgotten():
            assert time.monotonic() < deadline, "the scope never went quiet"
        assert await a._client.hget(KEYS[0], GLOBAL_SCOPE) is None
    finally:
        await a.stop()
