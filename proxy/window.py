"""Counts over a sliding window of whole seconds, shared by the breaker and the retry budget."""

from __future__ import annotations

import math

__all__ = ["SecondBuckets"]


class SecondBuckets:
    """Parallel rings of per-second counters (one ring per series) over ``window`` seconds.

    The caller counts into ``ring[buckets.idx]`` after calling :meth:`advance` whenever
    ``now >= buckets.edge``; the window is the current, partial second plus the ones before it.
    """

    __slots__ = ("_n", "_sec", "edge", "idx", "rings")

    def __init__(self, window: float, series: int, now: float) -> None:
        self._n = max(1, math.ceil(window))
        self.rings = tuple([0] * self._n for _ in range(series))
        self._sec = math.floor(now)
        self.idx = self._sec % self._n
        self.edge = self._sec + 1.0

    def advance(self, now: float) -> None:
        """Move to the second holding ``now``, zeroing the buckets of the seconds passed."""
        sec = math.floor(now)
        n = self._n
        steps = sec - self._sec
        if steps >= n:
            self.clear()
        else:
            for k in range(1, steps + 1):
                i = (self._sec + k) % n
                for ring in self.rings:
                    ring[i] = 0
        self._sec = sec
        self.idx = sec % n
        self.edge = sec + 1.0

    def clear(self) -> None:
        """Zero every bucket."""
        for ring in self.rings:
            for i in range(self._n):
                ring[i] = 0
