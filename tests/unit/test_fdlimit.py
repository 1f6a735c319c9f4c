"""The file-descriptor budget: client connections bounded by the limit, with room for upstream."""

from __future__ import annotations

import resource

from proxy.fdlimit import DEFAULT_CAP, PROCESS_RESERVE, plan_connections, raise_nofile_limit


def test_every_admitted_client_has_room_for_its_upstream_connection():
    """Clients + one upstream connection each + the 503 overflow + the process reserve fit the limit."""
    for limit in (80, 256, 1024, 4096, 9000):
        plan = plan_connections(limit, None)
        assert plan.warning is None
        assert 2 * plan.max_connections + plan.overflow + PROCESS_RESERVE <= limit
        assert plan.max_connections == min(DEFAULT_CAP, (limit - PROCESS_RESERVE - plan.overflow) // 2)


def test_default_bound_at_256_is_90_with_12_overflow():
    """ulimit -n 256: 90 clients, 12 over-bound connections answered 503."""
    plan = plan_connections(256, None)
    assert (plan.max_connections, plan.overflow) == (90, 12)


def test_a_large_limit_is_capped_by_default_but_not_when_configured():
    """A million descriptors give the default cap, and a configured bound that fits is kept as is."""
    assert plan_connections(1 << 20, None).max_connections == DEFAULT_CAP
    assert plan_connections(1 << 20, 20_000).max_connections == 20_000
    assert plan_connections(1 << 20, 20_000).warning is None


def test_a_configured_bound_above_the_limit_is_reduced_with_a_warning():
    """server.max_connections 1000 under ulimit 256 becomes 90, and the warning names the key and both numbers."""
    plan = plan_connections(256, 1000)
    assert plan.max_connections == 90
    assert plan.warning is not None
    assert "server.max_connections 1000 reduced to 90" in plan.warning and "(256)" in plan.warning


def test_a_tiny_limit_still_admits_one_connection():
    """Below the process reserve the sidecar still serves one client rather than none."""
    plan = plan_connections(10, None)
    assert plan.max_connections >= 1 and plan.overflow >= 1


def test_raise_nofile_limit_reaches_the_hard_limit():
    """The soft limit ends at the hard limit (or stays where it was when it is there already)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft == hard and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
        before, now, reported_hard = raise_nofile_limit()
        assert reported_hard == hard
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if hard != resource.RLIM_INFINITY:
            assert now == hard and before <= now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
