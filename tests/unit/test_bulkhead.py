"""Bulkhead: the global and per-operation bounds on requests in flight, and fair waiting."""

from __future__ import annotations

import asyncio

from fakeclock import FakeClock

from proxy.bulkhead import Bulkhead, Compartment
from proxy.deadlines import Deadlines


def test_compartment_starts_empty_with_its_limit() -> None:
    """A new compartment holds its limit and nothing in flight."""
    comp = Compartment(4)
    assert (comp.limit, comp.in_flight) == (4, 0)


def test_try_enter_takes_slots_up_to_the_global_limit() -> None:
    """try_enter admits up to max_in_flight across compartments, counting both levels."""
    bulkhead = Bulkhead(2, 1.0, Deadlines(FakeClock(), 0.05))
    a, b = Compartment(5), Compartment(5)
    assert (bulkhead.limit, bulkhead.in_flight, bulkhead.max_wait) == (2, 0, 1.0)
    assert [bulkhead.try_enter(a), bulkhead.try_enter(b), bulkhead.try_enter(a)] == [True, True, False]
    assert (bulkhead.in_flight, a.in_flight, b.in_flight) == (2, 1, 1)


def test_try_enter_respects_the_compartment_limit() -> None:
    """A full compartment refuses while the global bound still has room."""
    bulkhead = Bulkhead(10, 1.0, Deadlines(FakeClock(), 0.05))
    a, b = Compartment(1), Compartment(1)
    assert [bulkhead.try_enter(a), bulkhead.try_enter(a), bulkhead.try_enter(b)] == [True, False, True]
    assert (bulkhead.in_flight, a.in_flight, b.in_flight) == (2, 1, 1)


def test_leave_gives_the_slot_back() -> None:
    """leave() frees one slot at both levels."""
    bulkhead = Bulkhead(1, 1.0, Deadlines(FakeClock(), 0.05))
    a = Compartment(1)
    assert bulkhead.try_enter(a)
    bulkhead.leave(a)
    assert (bulkhead.in_flight, a.in_flight) == (0, 0)
    assert bulkhead.try_enter(a)


async def test_enter_without_wait_refuses_at_once() -> None:
    """With max_wait 0 a full bulkhead refuses immediately and queues nothing."""
    bulkhead = Bulkhead(1, 0.0, Deadlines(FakeClock(), 0.05))
    a = Compartment(1)
    assert await bulkhead.enter(a)
    assert not await bulkhead.enter(a)
    assert len(bulkhead._waiters) == 0
    assert (bulkhead.in_flight, a.in_flight) == (1, 1)


async def test_a_waiter_gets_the_slot_handed_over() -> None:
    """A request waiting in enter() takes the slot the moment another leaves; counts stay exact."""
    bulkhead = Bulkhead(1, 30.0, Deadlines(FakeClock(), 0.05))
    a = Compartment(2)
    assert await bulkhead.enter(a)
    waiting = asyncio.create_task(bulkhead.enter(a))
    await asyncio.sleep(0)
    assert not waiting.done() and len(bulkhead._waiters) == 1
    bulkhead.leave(a)
    assert await waiting
    assert (bulkhead.in_flight, a.in_flight, len(bulkhead._waiters)) == (1, 1, 0)


async def test_waiters_are_served_first_come_first_served() -> None:
    """Two waiters get freed slots in the order they came; a newcomer does not jump the queue."""
    bulkhead = Bulkhead(1, 30.0, Deadlines(FakeClock(), 0.05))
    a = Compartment(5)
    assert bulkhead.try_enter(a)
    order: list[str] = []

    async def wait(name: str) -> None:
        assert await bulkhead.enter(a)
        order.append(name)

    first = asyncio.create_task(wait("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)
    assert not bulkhead.try_enter(a)  # queued requests go first
    bulkhead.leave(a)
    await first
    bulkhead.leave(a)
    await second
    assert order == ["first", "second"]


async def test_a_waiter_for_a_full_compartment_does_not_block_others() -> None:
    """A request queued for its own full compartment neither takes a freed slot nor holds up
    another operation's try_enter."""
    bulkhead = Bulkhead(3, 30.0, Deadlines(FakeClock(), 0.05))
    full, other = Compartment(1), Compartment(5)
    assert bulkhead.try_enter(full)
    assert bulkhead.try_enter(other)
    queued = asyncio.create_task(bulkhead.enter(full))
    await asyncio.sleep(0)
    assert bulkhead.try_enter(other)  # the queue holds only a request that could not go anyway
    bulkhead.leave(other)  # a global slot frees, but `full` is still at its limit
    await asyncio.sleep(0)
    assert not queued.done()
    assert (bulkhead.in_flight, full.in_flight, other.in_flight) == (2, 1, 1)
    bulkhead.leave(full)
    assert await queued
    assert (bulkhead.in_flight, full.in_flight) == (2, 1)


async def test_wait_that_times_out_refuses_and_leaves_the_queue() -> None:
    """A waiter not served within max_wait (on the injected clock) gets False and leaves the queue."""
    clock = FakeClock()
    deadlines = Deadlines(clock, 0.05)
    bulkhead = Bulkhead(1, 1.0, deadlines)
    a = Compartment(1)
    assert bulkhead.try_enter(a)
    waiting = asyncio.create_task(bulkhead.enter(a))
    await asyncio.sleep(0)
    clock.advance(0.99)
    assert deadlines.sweep() == 0 and not waiting.done()
    clock.advance(0.01)
    assert deadlines.sweep() == 1
    assert await waiting is False
    assert len(bulkhead._waiters) == 0 and len(deadlines) == 0
    assert (bulkhead.in_flight, a.in_flight) == (1, 1)
    bulkhead.leave(a)
    assert bulkhead.try_enter(a)


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    """A request cancelled while waiting is removed, so it never receives a slot."""
    bulkhead = Bulkhead(1, 30.0, Deadlines(FakeClock(), 0.05))
    a = Compartment(1)
    assert bulkhead.try_enter(a)
    waiting = asyncio.create_task(bulkhead.enter(a))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()  # the caller's cancellation propagates; it is not a time-out
    assert len(bulkhead._waiters) == 0
    bulkhead.leave(a)
    assert (bulkhead.in_flight, a.in_flight) == (0, 0)


async def test_a_short_max_wait_still_waits_for_a_slot() -> None:
    """With max_wait under a second (the default is 1 s) a waiter is still served, not refused."""
    bulkhead = Bulkhead(1, 0.5, Deadlines(FakeClock(), 0.05))
    a = Compartment(1)
    assert bulkhead.try_enter(a)
    waiting = asyncio.create_task(bulkhead.enter(a))
    await asyncio.sleep(0)
    bulkhead.leave(a)
    assert await waiting


async def test_hand_over_adds_to_the_waiters_compartment_count() -> None:
    """A slot freed by one operation and handed to another adds one to that one's count."""
    bulkhead = Bulkhead(3, 30.0, Deadlines(FakeClock(), 0.05))
    a, b = Compartment(5), Compartment(5)
    assert bulkhead.try_enter(a) and bulkhead.try_enter(a) and bulkhead.try_enter(b)
    waiting = asyncio.create_task(bulkhead.enter(a))
    await asyncio.sleep(0)
    bulkhead.leave(b)
    assert await waiting
    assert (bulkhead.in_flight, a.in_flight, b.in_flight) == (3, 3, 0)


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_gives_it_back() -> None:
    """A slot handed to a waiter that is cancelled before it resumes goes back to the bulkhead."""
    bulkhead = Bulkhead(1, 30.0, Deadlines(FakeClock(), 0.05))
    a = Compartment(1)
    assert bulkhead.try_enter(a)
    waiting = asyncio.create_task(bulkhead.enter(a))
    await asyncio.sleep(0)
    bulkhead.leave(a)  # handed over to the waiter...
    waiting.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    assert (bulkhead.in_flight, a.in_flight) == (0, 0)
