"""Tells the app of each final result: ``POST outbox.callback_url``, from a background task.

The body is ``{"event": "outbox_item_final", "item": {...}}`` (the item as ``GET /outbox/{id}``
shows it, with Stripe's answer). A failed POST is retried with exponential backoff
(1 s, 2 s, 4 s... up to ``callback_attempts``); the queue is bounded, and a result that cannot
be told is logged (``outbox_callback_failed``) and stays readable on ``/outbox/{id}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from proxy.log import Logger
from proxy.outbox.policy import OutboxSettings

__all__ = ["Callback"]

_QUEUE = 10_000


class Callback:
    """A bounded queue of final results and the task that POSTs them."""

    def __init__(
        self,
        settings: OutboxSettings,
        *,
        log: Logger,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert settings.callback_url is not None
        self._url = settings.callback_url
        self._settings = settings
        self._log = log
        self._sleep = sleep
        self._transport = transport
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the sender in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def tell(self, item: dict[str, Any]) -> None:
        """Queue one final result (dropped, and logged, when the queue is full)."""
        try:
            self._queue.put_nowait({"event": "outbox_item_final", "item": item})
        except asyncio.QueueFull:
            self._log.event("outbox_callback_failed", "error", id=item["id"], error="queue full")

    async def stop(self, grace: float = 2.0) -> None:
        """Send what is queued for up to ``grace`` seconds, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        s = self._settings
        async with httpx.AsyncClient(timeout=s.callback_timeout, transport=self._transport) as http:
            while True:
                body = await self._queue.get()
                try:
                    await self._send(http, body)
                finally:
                    self._queue.task_done()

    async def _send(self, http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        attempts = self._settings.callback_attempts
        error = ""
        for attempt in range(1, attempts + 1):
            try:
                resp = await http.post(self._url, json=body)
                if resp.status_code < 300:
                    return
                error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            if attempt < attempts:
                await self._sleep(min(60.0, 2.0 ** (attempt - 1)))
        self._log.event(
            "outbox_callback_failed", "error", id=body["item"]["id"], attempts=attempts,
            error=error,
        )  # fmt: skip
