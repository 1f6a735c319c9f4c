"""Waiting for a state in tests: poll a condition with a deadline, never sleep for a state."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any


async def poll(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Wait until ``cond()`` holds, failing after ``timeout`` seconds.

    The deadline only bounds how long a broken test takes: on a loaded CI machine a step that
    takes milliseconds alone can take seconds, so it is generous (a pass is as fast as ever).
    """
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def waits_for_the_client(sidecar: Any) -> bool:
    """An upstream attempt is armed with its deadline off: the client's turn, not Stripe's.

    Before a test moves a fake clock past a connect or attempt timeout during an upload, the
    sidecar must be here, not still connecting upstream (a busy machine takes a while).
    """
    armed = sidecar.deadlines._armed
    return bool(armed) and all(item.deadline == math.inf for item in armed)
