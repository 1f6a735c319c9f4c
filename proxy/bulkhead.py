"""Bounded in-flight requests to Stripe, for the whole sidecar and per operation.

``try_enter`` is the synchronous fast path; ``enter`` waits (first come, first served) for at
most ``max_wait`` seconds. A slot is given back with ``leave``.
"""

from __future__ import annotations

import asyncio
import collections

__all__ = ["Bulkhead", "Compartment"]


class Compartment:
    """The in-flight count of one operation."""

    __slots__ = ("in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0


class Bulkhead:
    """Global and per-compartment limits on concurrent upstream requests."""

    def __init__(self, max_in_flight: int, max_wait: float) -> None:
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
            and not any(other.in_flight < other.limit for other, _ in self._waiters)
        ):
            self.in_flight += 1
            comp.in_flight += 1
            return True
        return False

    async def enter(self, comp: Compartment) -> bool:
        """Take a slot, waiting up to ``max_wait``; False if none came free in time."""
        if self.try_enter(comp):
            return True
        if self.max_wait <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        entry = (comp, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.max_wait):
                await waiter
            return True
        except TimeoutError:
            # A slot may have been handed over just as the wait ran out.
            return waiter.done() and not waiter.cancelled()
        finally:
            if (not waiter.done() or waiter.cancelled()) and entry in self._waiters:
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
