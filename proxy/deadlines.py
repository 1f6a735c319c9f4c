"""The one owner of time-outs: a single sweeper over every armed deadline, on the injected clock.

Client connections (head, body and keep-alive idle deadlines), upstream attempts, streamed
answers and connects are armed here instead of each holding a timer handle: arming is a set
insertion, and one periodic sweep expires whatever is due. Time is the sidecar's injected clock,
the same one the breakers, the limiter and the budget read, so a test that moves a fake clock and
calls :meth:`Deadlines.sweep` drives every time-out without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any, Protocol

__all__ = ["Canceller", "Deadlines", "Expiring"]


class Expiring(Protocol):
    """Something with a deadline (clock seconds; 0.0 = none) and what to do when it passes."""

    deadline: float

    def expire(self) -> None:
        """The deadline passed."""


class Deadlines:
    """Armed deadlines, swept every ``resolution`` seconds (so at most that late).

    Two ways in: :meth:`arm` one item for one deadline (an upstream attempt), or :meth:`watch` a
    whole collection whose members set their own ``deadline`` as they go (the client
    connections, whose one deadline means head, body, idle or linger in turn).
    """

    __slots__ = ("_armed", "_groups", "_handle", "_loop", "clock", "resolution")

    def __init__(self, clock: Callable[[], float], resolution: float) -> None:
        if resolution <= 0:
            raise ValueError(f"deadline resolution must be positive, not {resolution!r}")
        self.clock = clock
        self.resolution = resolution
        self._armed: set[Expiring] = set()
        self._groups: list[Collection[Expiring]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Begin sweeping on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.resolution, self._tick)

    def stop(self) -> None:
        """Stop sweeping (armed deadlines stay armed, and expire if swept by hand)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def watch(self, group: Collection[Expiring]) -> None:
        """Sweep every member of ``group`` too, for as long as it is in it (0.0: no deadline)."""
        self._groups.append(group)

    def arm(self, item: Expiring, seconds: float) -> None:
        """Expire ``item`` once ``seconds`` have passed (re-arming moves its deadline)."""
        self.arm_at(item, self.clock() + seconds)

    def arm_at(self, item: Expiring, when: float) -> None:
        """Expire ``item`` at clock time ``when``."""
        item.deadline = when
        self._armed.add(item)

    def disarm(self, item: Expiring) -> None:
        """Forget ``item``'s deadline."""
        item.deadline = 0.0
        self._armed.discard(item)

    def sweep(self) -> int:
        """Expire everything due now; returns how many expired."""
        now = self.clock()
        due = [item for item in self._armed if item.deadline <= now]
        for item in due:
            self._armed.discard(item)
        for group in self._groups:
            due += [item for item in group if 0.0 < item.deadline <= now]
        expired = 0
        for item in due:
            if item.deadline:  # 0.0: disarmed by an earlier expiry in this sweep
                item.deadline = 0.0
                item.expire()
                expired += 1
        return expired

    def _tick(self) -> None:
        self.sweep()
        assert self._loop is not None
        self._handle = self._loop.call_later(self.resolution, self._tick)

    def __len__(self) -> int:
        return len(self._armed)


class Canceller:
    """Cancels a future when its deadline passes: a wait or a connect bounded by a time-out.

    ``fired`` tells the awaiting code that the cancellation was the time-out, not its own task
    being cancelled (a shutdown).
    """

    __slots__ = ("_future", "deadline", "fired")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future
        self.deadline = 0.0
        self.fired = False

    def expire(self) -> None:
        """Cancel the future, if it is still pending."""
        if not self._future.done():
            self.fired = True
            self._future.cancel()
