"""A monotonic clock for tests: it moves only when told, or when a test's sleep "waits"."""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """An ``asyncio.sleep`` stand-in for the code under test: the time passes at once."""
        self.now += seconds
        await asyncio.sleep(0)
