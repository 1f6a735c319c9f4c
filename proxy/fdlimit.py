"""The file-descriptor budget: raise the soft limit, then split it between clients and upstream.

Every client connection the sidecar accepts may need an upstream connection to forward its
request, so the client side gets at most half of what is left after a fixed reserve for the
process itself (listener, log, event loop, outbox). A few more descriptors are set aside for
connections over the bound, which are answered ``503 sidecar_overloaded`` and closed: they need
a descriptor for as long as it takes to read their request and answer it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

__all__ = ["FdPlan", "plan_connections", "raise_nofile_limit"]

# Descriptors the process needs besides connections: stdio, the event loop, the listener, the
# log, the outbox store, DNS look-ups, a TLS trust store being read.
PROCESS_RESERVE = 64
# Without a configured bound, never more client connections than this: the sidecar's clients
# are one pod's containers, and each open connection costs memory.
DEFAULT_CAP = 4096
# Linux refuses a soft limit above fs.nr_open (1,048,576 by default) even when the hard limit
# is "unlimited".
_FALLBACK_CEILING = 1 << 20


@dataclass(frozen=True, slots=True)
class FdPlan:
    """How many client connections to admit, how many over-bound ones to answer, and why."""

    max_connections: int
    overflow: int
    warning: str | None = None


def plan_connections(fd_limit: int, configured: int | None) -> FdPlan:
    """Split ``fd_limit`` descriptors: clients, the 503 overflow, and upstream's equal share.

    A configured bound above what the limit allows is reduced, with a warning saying so.
    """
    available = max(2, fd_limit - PROCESS_RESERVE)
    overflow = max(1, min(64, available // 16))
    allowed = max(1, (available - overflow) // 2)
    if configured is None:
        return FdPlan(min(allowed, DEFAULT_CAP), overflow)
    if configured > allowed:
        return FdPlan(
            allowed,
            overflow,
            f"server.max_connections {configured} reduced to {allowed}: the file-descriptor "
            f"limit ({fd_limit}) must also hold an upstream connection per client connection "
            f"and {PROCESS_RESERVE} for the process",
        )
    return FdPlan(configured, overflow)


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (soft before, soft now, hard).

    Descriptors are cheap and running out of them looks like an outage; the hard limit is the
    administrator's real bound.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = max(soft, _FALLBACK_CEILING) if soft != resource.RLIM_INFINITY else soft
    if target == soft:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        try:
            target = min(target, _FALLBACK_CEILING)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
        except (ValueError, OSError):
            return soft, soft, hard
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard
