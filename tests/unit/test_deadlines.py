"""The one sweeper over every deadline, on an injected clock."""

from __future__ import annotations

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
