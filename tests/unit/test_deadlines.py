"""The one sweeper over every deadline, on an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from fakeclock import FakeClock

from proxy.deadlines import Deadlines


class Item:
    """Something that notes when it expired."""

    def __init__(self, clock: FakeClock) -> None:
        self.deadline = 0.0
        self.clock = clock
        self.expired_at: list[float] = []

    def expire(self) -> None:
        self.expired_at.append(self.clock())


def test_only_what_is_due_expires_and_only_once() -> None:
    """An item expires at the first sweep at or after its deadline, once; others wait."""
    clock = FakeClock(100.0)
    deadlines = Deadlines(clock, 0.1)
    soon, later = Item(clock), Item(clock)
    deadlines.arm(soon, 1.0)
    deadlines.arm(later, 5.0)
    assert soon.deadline == 101.0 and len(deadlines) == 2
    clock.advance(0.999)
    assert deadlines.sweep() == 0
    clock.advance(0.001)
    assert deadlines.sweep() == 1
    assert soon.expired_at == [101.0] and soon.deadline == 0.0
    assert deadlines.sweep() == 0 and soon.expired_at == [101.0]
    clock.advance(4.0)
    deadlines.sweep()
    assert later.expired_at == [105.0] and len(deadlines) == 0


def test_rearming_moves_the_deadline_and_disarming_forgets_it() -> None:
    """Arming again pushes the deadline out; a disarmed item never expires."""
    clock = FakeClock()
    deadlines = Deadlines(clock, 0.1)
    moved, dropped = Item(clock), Item(clock)
    deadlines.arm(moved, 1.0)
    deadlines.arm(dropped, 1.0)
    clock.advance(0.5)
    deadlines.arm(moved, 1.0)
    deadlines.disarm(dropped)
    assert dropped.deadline == 0.0
    clock.advance(0.6)
    deadlines.sweep()
    assert moved.expired_at == [] and dropped.expired_at == []
    clock.advance(0.4)
    deadlines.sweep()
    assert moved.expired_at == [clock()]


def test_resolution_must_be_positive() -> None:
    """A zero resolution would spin the loop."""
    with pytest.raises(ValueError, match="resolution"):
        Deadlines(FakeClock(), 0.0)


def test_watched_members_expire_by_their_own_deadline_while_in_the_group() -> None:
    """Members of a watched collection expire when due; a member that left is never swept."""
    clock = FakeClock()
    deadlines = Deadlines(clock, 0.1)
    group: set[Item] = set()
    deadlines.watch(group)
    stays, leaves, idle = Item(clock), Item(clock), Item(clock)
    group |= {stays, leaves, idle}
    stays.deadline = clock() + 1.0
    leaves.deadline = clock() + 1.0
    group.discard(leaves)
    clock.advance(1.0)
    assert deadlines.sweep() == 1
    assert stays.expired_at == [clock()] and leaves.expired_at == [] and idle.expired_at == []
    assert stays in group  # watching never removes members: they set their next deadline


class FakeHandle:
    """A timer handle that notes its cancellation."""

    def __init__(self, delay: float, callback: Callable[[], None]) -> None:
        self.delay = delay
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The one loop method the sweeper uses, recording each timer instead of waiting."""

    def __init__(self) -> None:
        self.timers: list[FakeHandle] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(delay, callback)
        self.timers.append(handle)
        return handle


def test_started_sweeper_sweeps_every_resolution_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """start() schedules a sweep after `resolution`; each sweep schedules the next; stop() cancels it."""
    loop = FakeLoop()
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: loop)
    clock = FakeClock()
    deadlines = Deadlines(clock, 0.25)
    deadlines.stop()  # stopping a sweeper that never started is harmless
    item = Item(clock)
    deadlines.arm(item, 0.2)
    deadlines.start()
    assert [(t.delay, t.cancelled) for t in loop.timers] == [(0.25, False)]
    clock.advance(0.25)
    loop.timers[0].callback()
    assert item.expired_at == [clock()]
    assert [(t.delay, t.cancelled) for t in loop.timers] == [(0.25, False), (0.25, False)]
    loop.timers[1].callback()
    assert len(loop.timers) == 3
    deadlines.stop()
    deadlines.stop()
    assert [t.cancelled for t in loop.timers] == [False, False, True]


def test_sweep_counts_armed_and_watched_items_together() -> None:
    """One sweep expires due armed items and due group members alike and counts them all."""
    clock = FakeClock(0.5)
    deadlines = Deadlines(clock, 0.1)
    armed, member, idle = Item(clock), Item(clock), Item(clock)
    group = {member, idle}
    deadlines.watch(group)
    deadlines.arm(armed, 0.1)
    member.deadline = 0.75  # a deadline below 1.0 is still a deadline
    clock.advance(0.5)
    assert deadlines.sweep() == 2
    assert armed.expired_at == [1.0] and member.expired_at == [1.0] and idle.expired_at == []


def test_disarmed_item_is_no_longer_counted() -> None:
    """Disarming forgets the item, so it no longer counts as armed."""
    clock = FakeClock()
    deadlines = Deadlines(clock, 0.1)
    item = Item(clock)
    deadlines.arm(item, 1.0)
    deadlines.disarm(item)
    assert len(deadlines) == 0
