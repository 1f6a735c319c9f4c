"""Bounded in-flight requests to Stripe, for the whole sidecar and per operation.

``try_enter`` is the synchronous fast path; ``enter`` waits (first come, first served) for at
most ``max_wait`` seconds, timed by the sidecar's one :class:`~proxy.deadlines.Deadlines`. A slot
is given back with ``leave``.
"""

from __future__ import annotations

import asyncio
import collections

from proxy.deadlines import Canceller, Deadlines

__all__ = ["Bulkhead", "Compartment"]


class Compartment:
    """The in-flight count of one operation, and its peak since the healer last looked."""

    __slots__ = ("in_flight", "limit", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.peak = 0  # reset by proxy.healing each evaluation; sizes a tightened bound


class Bulkhead:
    """Global and per-compartment limits on concurrent upstream requests."""

    def __init__(
        self, max_in_flight: int, max_wait: float, deadlines: Deadlines
    ) -> None:
        self._deadlines = deadlines  # times waits for a slot: the sidecar's one sweeper
        self.limit = max_in_flight
        self.in_flight = 0
        self.max_wait = max_wait
        self._waiters: collections.deque[tuple[Compartment, asyncio.Future[None]]] = (
            collections.deque()
        )

    def try_enter(self, comp: Compartment) -> bool:
        """Take a slot now if both limits allow and nobody is queued ahead."""
        if (
            self.in_flight < self.limit
            and comp.in_flight < comp.limit
            # Queued requests go first, but only those that could take a slot now: one waiting
            # for its own full compartment must not hold up other operations.
            and not (
                self._waiters and any(other.in_flight < other.limit for other, _ in self._waiters)
            )
        ):
            self.in_flight += 1
            comp.in_flight += 1
            if comp.in_flight > comp.peak:
                comp.peak = comp.in_flight
            return True
        return False

    async def enter(self, comp: Compartment) -> bool:
        """Take a slot, waiting up to ``max_wait``; False if none came free in time."""
        if self.try_enter(comp):
            return True
        if self.max_wait <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (comp, waiter)
        self._waiters.append(entry)
        timer = Canceller(waiter)
        self._deadlines.arm(timer, self.max_wait)
        try:
            await waiter
            return True
        except asyncio.CancelledError:
            if timer.fired:
                return False  # max_wait passed with no slot free
            if waiter.done() and not waiter.cancelled():
                self.leave(comp)  # handed a slot just as the request was cancelled: give it back
            raise
        finally:
            self._deadlines.disarm(timer)
            if entry in self._waiters:
                self._waiters.remove(entry)

    def leave(self, comp: Compartment) -> None:
        """Give a slot back and hand it to the first waiter that fits."""
        self.in_flight -= 1
        comp.in_flight -= 1
        for entry in self._waiters:
            other, waiter = entry
            if self.in_flight >= self.limit:
                break
            if other.in_flight < other.limit and not waiter.done():
                self._waiters.remove(entry)
                self.in_flight += 1
                other.in_flight += 1
                waiter.set_result(None)
                break
