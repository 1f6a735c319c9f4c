"""Waiting for a state in tests: poll a condition with a deadline, never sleep for a state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def poll(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until ``cond()`` holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
