"""The pure parts of the fleet-shared limiter: fair shares, the account identity, the limiter in fleet units."""

from __future__ import annotations

import base64

import pytest
from fakeclock import FakeClock

from proxy.ratelimit import GLOBAL_SCOPE, RateLimiter, RateLimitSettings, SharedState
from proxy.sharedlimit import fair_weight, identity_of, state_key

KEY = b"sk_test_51Abcdefghijklmnop"


def test_equal_demands_share_the_rate_equally() -> None:
    """Two replicas each asking 150/s of a 100/s fleet rate get half each."""
    assert fair_weight(100.0, {"a": 150.0, "b": 150.0}, "a") == pytest.approx(0.5)


def test_a_quiet_replica_gets_what_it_asks_and_leaves_the_rest() -> None:
    """Water-filling: 10/s (with 10% headroom) to the quiet one, the rest to the busy one; together the whole rate."""
    demands = {"quiet": 10.0, "busy": 290.0}
    quiet = fair_weight(100.0, demands, "quiet")
    busy = fair_weight(100.0, demands, "busy")
    assert quiet == pytest.approx(0.11)
    assert busy == pytest.approx(0.89)
    assert quiet + busy == pytest.approx(1.0)


def test_spare_rate_is_split_equally_when_all_ask_less() -> None:
    """Asking 22 (x1.1) and 33 (x1.1) of 100: each gets its ask plus an equal part of the spare, adding up to 100."""
    demands = {"a": 20.0, "b": 30.0}
    a, b = fair_weight(100.0, demands, "a"), fair_weight(100.0, demands, "b")
    assert a == pytest.approx((22.0 + 22.5) / 100)
    assert b == pytest.approx((33.0 + 22.5) / 100)
    assert a + b == pytest.approx(1.0)


def test_three_levels_of_water_filling() -> None:
    """5, 40 and 200 asked of 90: 5.5, then the rest split between the two bigger ones."""
    demands = {"s": 5.0, "m": 40.0, "l": 200.0}
    w = {r: fair_weight(90.0, demands, r) * 90.0 for r in demands}
    assert w["s"] == pytest.approx(5.5)
    assert w["m"] == pytest.approx(42.25)
    assert w["l"] == pytest.approx(42.25)


def test_a_replica_missing_from_the_demands_takes_an_equal_part() -> None:
    """Not reported yet: one part among the others and itself."""
    assert fair_weight(100.0, {"a": 50.0}, "b") == pytest.approx(0.5)
    assert fair_weight(100.0, {}, "b") == 1.0


def test_weights_stay_within_bounds() -> None:
    """Never zero (a share of 0 would stop a replica for good), never above 1."""
    assert fair_weight(100.0, {"a": 0.0, "b": 1e6}, "a") == pytest.approx(1e-3)
    assert fair_weight(100.0, {"a": 1e6}, "a") == 1.0


def test_identity_is_a_digest_the_same_for_bearer_and_basic() -> None:
    """Bearer and Basic name one key the same way; the key itself is nowhere in the identity."""
    bearer = identity_of(b"Bearer " + KEY)
    basic = identity_of(b"Basic " + base64.b64encode(KEY + b":"))
    assert bearer == basic
    assert bearer is not None and bearer.startswith("key-") and len(bearer) == 36
    assert KEY.decode() not in bearer and "Abcdef" not in bearer
    assert identity_of(b"Bearer sk_test_other") != bearer
    assert identity_of(b"bearer " + KEY) == bearer


def test_identity_of_nothing_usable_is_none() -> None:
    """An empty key, or Basic that is not base64, names no account."""
    assert identity_of(b"Bearer ") is None
    assert identity_of(b"Basic !!!notbase64") is None


def test_state_keys_of_one_account_share_a_cluster_slot() -> None:
    """The identity is the hash tag: {...} in the key."""
    assert state_key("acct-acct_1") == "stripe-sidecar:ratelimit:{acct-acct_1}"


def _throttle(lim: RateLimiter, clock: FakeClock, op: str, reason: str, n: int = 10) -> None:
    for _ in range(n):
        lim.on_rate_limited(op, reason)


def test_a_cut_is_reported_with_the_rate_stripe_accepted() -> None:
    """on_throttle hears each cut once, with the scope and the accepted rate; a held 429 burst reports nothing more."""
    clock = FakeClock()
    lim = RateLimiter(RateLimitSettings(), clock)
    cuts: list[tuple[str, float]] = []
    lim.on_throttle = lambda scope, rate: cuts.append((scope, rate))
    for _ in range(80):  # 80/s for a second, all sent
        assert lim.reserve("GET /v1/balance") == 0.0
        clock.advance(1 / 80)
    _throttle(lim, clock, "GET /v1/balance", "global-rate")
    _throttle(lim, clock, "GET /v1/balance", "endpoint-rate")
    assert [c[0] for c in cuts] == [GLOBAL_SCOPE, "GET /v1/balance"]
    assert cuts[0][1] == pytest.approx(cuts[1][1])
    assert 40 <= cuts[0][1] <= 90
    assert lim.rates()[GLOBAL_SCOPE] == pytest.approx(0.7 * cuts[0][1])


def test_applied_fleet_state_paces_at_the_weight_of_the_fleet_cubic() -> None:
    """A dormant limiter given the fleet's cubic and weight 0.25 limits at a quarter of it, regrowing with it."""
    clock = FakeClock()
    lim = RateLimiter(RateLimitSettings(), clock)
    k = (200.0 * 0.3 / 0.4) ** (1 / 3)
    state = SharedState(w_max=200.0, k=k, start=clock(), hold_until=clock() + 0.5,
                        last_throttle=clock(), weight=0.25)
    lim.apply_shared(GLOBAL_SCOPE, state)
    assert lim.rates()[GLOBAL_SCOPE] == pytest.approx(0.25 * 140.0)
    assert lim.state()[GLOBAL_SCOPE]["fleet_weight"] == 0.25
    clock.advance(k)  # the cubic is back at w_max
    assert lim.rates()[GLOBAL_SCOPE] == pytest.approx(0.25 * 200.0)
    assert lim.adaptive_scopes() == [GLOBAL_SCOPE]


def test_a_local_cut_under_a_weight_keeps_the_cubic_in_fleet_units() -> None:
    """With weight 0.5, a local cut from 28/s accepted paces at 0.7 x 28/s, its cubic at 56/s of fleet rate."""
    clock = FakeClock()
    lim = RateLimiter(RateLimitSettings(), clock)
    k = (100.0 * 0.3 / 0.4) ** (1 / 3)
    lim.apply_shared("GET /v1/balance", SharedState(100.0, k, clock() - k, clock() - k,
                                                    clock() - k, 0.5))
    assert lim.rates()["GET /v1/balance"] == pytest.approx(50.0)
    for _ in range(40):  # 40/s sent at the fleet share, for a second
        lim.reserve("GET /v1/balance")
        clock.advance(1 / 40)
    _throttle(lim, clock, "GET /v1/balance", "endpoint-rate", n=3)
    rate = lim.rates()["GET /v1/balance"]
    cubic = lim.state()["GET /v1/balance"]["rate_cubic"]
    # Accepted: the 10 sent in the last two slices less the 3 limited, over 0.25 s = 28/s.
    assert rate == pytest.approx(0.7 * 28.0)
    assert cubic["w_max"] == pytest.approx(28.0 / 0.5)


def test_a_scope_going_dormant_forgets_its_weight() -> None:
    """After quiet_period with no 429 the scope is dormant again, and alone (weight 1) if it wakes."""
    clock = FakeClock()
    lim = RateLimiter(RateLimitSettings(quiet_period=5.0), clock)
    lim.apply_shared(GLOBAL_SCOPE, SharedState(100.0, 3.0, clock(), clock(), clock(), 0.5))
    clock.advance(5.0)
    assert lim.rates() == {}
    assert lim.adaptive_scopes() == []
    assert lim._global.weight == 1.0


def test_demand_counts_refused_reservations_too() -> None:
    """The app's ask, not what was let through: refused reservations count in the scope's demand."""
    clock = FakeClock()
    lim = RateLimiter(RateLimitSettings(max_wait=0.1), clock)
    lim.apply_shared(GLOBAL_SCOPE, SharedState(10.0, 0.0, clock() - 1, clock(), clock(), 1.0))
    refused = 0
    for _ in range(100):
        if lim.reserve("GET /v1/balance") is None:
            refused += 1
        clock.advance(0.01)
    assert refused > 50
    assert lim.demand(GLOBAL_SCOPE) == pytest.approx(100.0, rel=0.05)
    assert lim.demand("GET /v1/balance") == pytest.approx(100.0, rel=0.05)
    assert lim.demand("GET /v1/never") == 0.0
    assert lim.accepted(GLOBAL_SCOPE) <= 25.0
