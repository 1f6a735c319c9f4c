"""Waiting for a state in tests: poll a condition with a deadline, never sleep for a state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def poll(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Wait until ``cond()`` holds, failing after ``timeout`` seconds.

    The deadline only bounds how long a broken test takes: on a loaded CI machine a step that
    takes milliseconds alone can take seconds, so it is generous (a pass is as fast as ever).
    """
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
