"""The simulator's Stripe-like rate limiters: a bucket per API key, optionally per endpoint."""

from __future__ import annotations

from fakeclock import FakeClock

from proxy.simulator.limits import AccountLimits


def limits(clock: FakeClock, **rates: float | None) -> AccountLimits:
    """Account limits on a fake clock (every rate off unless given)."""
    args: dict[str, float | None] = {
        "account_rate": None, "account_burst": None, "endpoint_rate": None, "endpoint_burst": None,
    }
    args.update(rates)
    return AccountLimits(clock=clock, **args)  # type: ignore[arg-type]


def test_off_by_default() -> None:
    """With no rate set nothing is ever refused."""
    lim = limits(FakeClock())
    assert not lim.enabled
    assert {lim.check("sk_test_a", "GET /v1/balance") for _ in range(10_000)} == {None}


def test_account_bucket_refuses_past_its_burst_and_refills_at_its_rate() -> None:
    """50/s with a burst of 5: five pass at once, the sixth is global-rate; 0.1 s later five more."""
    clock = FakeClock()
    lim = limits(clock, account_rate=50.0, account_burst=5.0)
    assert [lim.check("sk_test_a", "GET /v1/balance") for _ in range(6)] == [None] * 5 + ["global-rate"]
    clock.advance(0.1)
    assert [lim.check("sk_test_a", "POST /v1/customers") for _ in range(6)] == [None] * 5 + ["global-rate"]


def test_burst_defaults_to_one_second_and_keys_are_separate_accounts() -> None:
    """Without a burst the bucket holds one second's worth; another key has its own bucket."""
    clock = FakeClock()
    lim = limits(clock, account_rate=20.0)
    assert sum(lim.check("sk_test_a", None) is None for _ in range(30)) == 20
    assert sum(lim.check("sk_test_b", None) is None for _ in range(30)) == 20


def test_endpoint_bucket_limits_each_operation() -> None:
    """endpoint_rate: one operation exhausts its bucket (endpoint-rate) while another still passes."""
    clock = FakeClock()
    lim = limits(clock, endpoint_rate=2.0)
    assert [lim.check("sk_test_a", "GET /v1/balance") for _ in range(3)] == [None, None, "endpoint-rate"]
    assert lim.check("sk_test_a", "GET /v1/customers/{customer}") is None
