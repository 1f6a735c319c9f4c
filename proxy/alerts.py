"""Webhook notifications of diagnoses: raised, cleared, and reminders while one stays active.

The :class:`Notifier` subscribes to the diagnosis engine. A raise or clear is put on a bounded
queue (never awaited, never on the request path: the engine evaluates on its own timer) and a
background task delivers it to every configured webhook with httpx, retrying with exponential
backoff. Each (event, diagnosis) is sent once (deduplicated by kind and ``raised_at``); an
active diagnosis is re-sent every ``resend_interval`` seconds. Payloads are Slack-compatible
(``text`` and ``blocks``) or a generic JSON document. Webhook URLs are secrets (Slack's carry a
token): logs name the host only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from proxy import __version__
from proxy.diagnosis import Diagnosis, DiagnosisEngine, DiagnosisEvent
from proxy.log import Logger

__all__ = ["AlertSettings", "Notifier", "Webhook", "payload"]

_RANK = {"info": 0, "warning": 1, "critical": 2}
_ICON = {
    "critical": ":red_circle:",
    "warning": ":large_orange_circle:",
    "info": ":information_source:",
}
_MAX_BACKOFF = 60.0

Message = tuple[str, Diagnosis]  # ("raised" | "cleared" | "reminder", diagnosis)


@dataclass(frozen=True, slots=True)
class Webhook:
    """One receiver: a URL and the payload form it takes."""

    url: str = ""
    format: Literal["slack", "json"] = "json"


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """The ``alerts:`` section."""

    webhooks: tuple[Webhook, ...] = ()
    min_severity: Literal["critical", "warning", "info"] = "warning"
    resend_interval: float = 3600.0  # seconds; 0 sends each raise once only
    timeout: float = 5.0  # per delivery attempt
    max_attempts: int = 5
    backoff: float = 1.0  # seconds before the second attempt, doubling up to 60 s
    queue_size: int = 100


def payload(event: str, d: Diagnosis, fmt: str) -> dict[str, Any]:
    """The JSON body for one event in the webhook's format."""
    if fmt != "slack":
        return {"event": f"diagnosis_{event}", "diagnosis": d.as_dict(), "sidecar": __version__}
    verb = {"raised": "raised", "cleared": "cleared", "reminder": "still active"}[event]
    icon = ":white_check_mark:" if event == "cleared" else _ICON[d.severity]
    title = f"{icon} stripe-sidecar: *{d.kind}* {verb} ({d.severity})"
    ev = d.evidence
    facts = ", ".join(
        f"{k.replace('_', ' ')}: {ev[k]}"
        for k in ("count", "share", "window_seconds", "operations")
        if k in ev
    )
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{title}\n{d.summary}"}},
    ]
    if event != "cleared":
        advice = {"type": "mrkdwn", "text": f"*What to do:* {d.action}"}
        blocks.append({"type": "section", "text": advice})
    if facts:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": facts}]})
    return {"text": f"{title}: {d.summary}", "blocks": blocks}


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2] or "?"


class Notifier:
    """Delivers diagnosis events to webhooks from a background task."""

    def __init__(
        self,
        settings: AlertSettings,
        engine: DiagnosisEngine,
        *,
        log: Logger,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._log = log
        self._client = client
        self._own_client = client is None
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=settings.queue_size)
        self._seen: deque[tuple[str, str, float]] = deque(maxlen=256)
        self._last_sent: dict[str, float] = {}  # kind -> when it was last sent (clock)
        self._task: asyncio.Task[None] | None = None
        self._reminder: asyncio.Task[None] | None = None
        self.dropped = 0
        self.delivered = 0
        self._unsubscribe = engine.subscribe(self.on_event)

    def on_event(self, event: DiagnosisEvent) -> None:
        """Queue a raise or clear once; never blocks (a full queue drops the event, counted)."""
        d = event.diagnosis
        if _RANK[d.severity] < _RANK[self.settings.min_severity]:
            return
        key = (event.type, d.kind, d.raised_at)
        if key in self._seen:
            return
        self._seen.append(key)
        if event.type == "raised":
            self._last_sent[d.kind] = self._clock()
        else:
            self._last_sent.pop(d.kind, None)
        self._put(event.type, d)

    def _put(self, event: str, d: Diagnosis) -> None:
        try:
            self._queue.put_nowait((event, d))
        except asyncio.QueueFull:
            self.dropped += 1
            self._log.event("alert_dropped", "warning", kind=d.kind, alert=event)

    def remind(self) -> int:
        """Queue a reminder for each active diagnosis not sent for ``resend_interval``."""
        interval = self.settings.resend_interval
        if interval <= 0:
            return 0
        now = self._clock()
        queued = 0
        for kind, d in list(self._engine.active.items()):
            last = self._last_sent.get(kind)
            if last is not None and now - last >= interval:
                self._last_sent[kind] = now
                self._put("reminder", d)
                queued += 1
        return queued

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the delivery task (and the reminder timer)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.settings.timeout)
        self._task = asyncio.create_task(self._run())
        if self.settings.resend_interval > 0:
            self._reminder = asyncio.create_task(self._remind_loop())

    async def stop(self, grace: float = 2.0) -> None:
        """Deliver what is queued within ``grace`` seconds, then stop."""
        self._unsubscribe()
        if self._reminder is not None:
            self._reminder.cancel()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), grace)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_client and self._client is not None:
            await self._client.aclose()

    async def drain(self) -> None:
        """Wait until every queued event was delivered or given up (tests, shutdown)."""
        await self._queue.join()

    async def _remind_loop(self) -> None:
        # A plain timer: what it does is remind(), which takes the injected clock.
        interval = self.settings.resend_interval
        while True:
            await asyncio.sleep(min(interval, 60.0))
            self.remind()

    async def _run(self) -> None:
        while True:
            event, d = await self._queue.get()
            try:
                for hook in self.settings.webhooks:
                    await self.deliver(hook, event, d)
            except Exception as exc:  # a bug must not stop later alerts
                self._log.event("alert_failed", "error", kind=d.kind, error=repr(exc))
            finally:
                self._queue.task_done()

    async def deliver(self, hook: Webhook, event: str, d: Diagnosis) -> bool:
        """POST one event to one webhook, retrying with backoff; True if it was accepted."""
        assert self._client is not None
        body = payload(event, d, hook.format)
        s = self.settings
        error = ""
        for attempt in range(1, s.max_attempts + 1):
            try:
                resp = await self._client.post(hook.url, json=body, timeout=s.timeout)
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            else:
                if resp.is_success:
                    self.delivered += 1
                    self._log.event("alert_sent", kind=d.kind, alert=event, host=_host(hook.url))
                    return True
                error = f"HTTP {resp.status_code}"
                if resp.status_code < 500 and resp.status_code not in (408, 429):
                    break  # the receiver refuses this payload: repeating will not help
            if attempt < s.max_attempts:
                await self._sleep(min(_MAX_BACKOFF, s.backoff * 2 ** (attempt - 1)))
        self._log.event(
            "alert_failed", "warning", kind=d.kind, alert=event, host=_host(hook.url), error=error
        )
        return False
