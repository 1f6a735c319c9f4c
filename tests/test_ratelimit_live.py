"""The adaptive limiter on real sockets against the simulator: out of the way when healthy, near the limit when not."""

from __future__ import annotations

from typing import Any

import pytest
from loadgen import offer

from proxy.simulator import FaultProfile, start_simulator


@pytest.mark.wallclock
async def test_healthy_upstream_300_per_second_passes_untouched(make_sidecar):
    """Default config, 300 req/s mixed for 3 s: every request is answered by Stripe, none refused or delayed."""
    async with start_simulator() as sim:
        sc = await make_sidecar(sim.url, ratelimit={"enabled": True})  # the shipped defaults
        run = await offer(sc.url, 300.0, 3.0)
    statuses = [r.status for r in run.results]
    assert len(statuses) == 900
    assert statuses.count(200) == 900, {s: statuses.count(s) for s in set(statuses)}
    assert sim.books()["requests"] == 900  # each one reached Stripe, once
    assert not sim.books()["rate_limited"]
    waited = sc.registry.get_sample_value("stripe_sidecar_ratelimit_waits_total", {"operation": "GET /v1/balance"})
    assert not waited  # never delayed by the limiter
    assert sc.forwarder.limiter.rates() == {}


def _share_limited(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int]:
    """(rate-limited answers, requests) the simulator counted between two snapshots of its books."""
    limited = sum(after["rate_limited"].values()) - sum(before["rate_limited"].values())
    return limited, after["requests"] - before["requests"]


@pytest.mark.wallclock
async def test_account_limit_is_found_and_used_through_the_sidecar(make_sidecar):
    """Account at 50/s, app offering 150/s for 10 s: after 4 s at most 10% of what reaches Stripe is limited, >= 80% of the limit succeeds."""
    async with start_simulator(profile=FaultProfile(account_rate=50.0)) as sim:
        sc = await make_sidecar(sim.url, ratelimit={"enabled": True})
        run = await offer(sc.url, 150.0, 10.0, mark=sim.books)
        end = sim.books()
    limited, reached = _share_limited(run.marks[4], end)  # type: ignore[arg-type]
    assert reached > 0
    assert limited / reached <= 0.10, (limited, reached)
    ok = sum(r.status == 200 for r in run.after(4.0))
    assert ok / 6.0 >= 0.8 * 50.0, ok
    refused = [r.code for r in run.results if r.status == 429]
    assert set(refused) <= {"sidecar_rate_limited", "rate_limit"}


