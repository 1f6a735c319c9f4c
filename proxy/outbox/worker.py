"""The delivery worker: claims due items and sends each through the pipeline, then settles it.

Every round goes through :meth:`proxy.forward.Forwarder.deliver`, so the operation's breaker
and the host breaker, the bulkhead, the rate limiter, held keys and retries apply as to any
request, under the item's original Idempotency-Key: Stripe performs it at most once, however
many rounds it takes. What a round came to is decided by :mod:`proxy.outbox.policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.classify import Outcome
from proxy.log import Logger
from proxy.outbox.capture import DeliveryConnection
from proxy.outbox.policy import Answer, Next, OutboxSettings, after_round, before_round
from proxy.outbox.store import Item, OutboxStore, Result, State, StoreError
from proxy.server import Request

if TYPE_CHECKING:
    from proxy.forward import Call, Forwarder

__all__ = ["DeliveryWorker", "round_answer"]

_MAX_RESULT_BODY = 64 << 10  # Stripe's answers are a few KiB; the store keeps at most this
_NOT_STRIPES = frozenset({"shutting_down", "internal_error"})


def round_answer(call: Call) -> tuple[Answer, str]:
    """What a delivery round came to, from the finished call, and the outcome's name."""
    if call.attempt == 0:
        return Answer.NOT_SENT, call.outcome or "refused"
    if call.outcome in _NOT_STRIPES:
        return Answer.RETRYABLE, call.outcome  # it may have been sent: the key makes it safe
    verdict = call.verdict
    if verdict.outcome is Outcome.SUCCESS:
        return Answer.SUCCESS, f"{call.status}"
    if verdict.outcome is Outcome.LOCAL_RESOURCES:
        return Answer.NOT_SENT, verdict.outcome.value
    detail = f"{call.status} {verdict.error_code or verdict.outcome.value}"
    if call.status == 0:
        detail = verdict.outcome.value
    return (Answer.RETRYABLE if verdict.retryable else Answer.TERMINAL), detail


def _request(item: Item, client_auth: bytes | None) -> Request:
    """The stored item as a request read at the door."""
    req = Request()
    req.method = item.method
    req.target = item.target.encode("latin-1")
    req.path = req.target.split(b"?", 1)[0].decode("latin-1")
    req.head = [line + b"\r\n" for line in item.headers.split(b"\r\n") if line]
    req.body = item.body
    req.content_length = len(item.body)
    req.idempotency_key = item.idempotency_key.encode("latin-1")
    for i, line in enumerate(req.head):
        if line[:14].lower() == b"authorization:":
            req.auth_at = i if req.authorization is None else -2
            req.authorization = line[14:].strip()
    if client_auth is not None:
        # The sidecar holds the keys and asks apps for its client token: this request is the
        # sidecar's own, and the held key goes on at the make-safe stage.
        req.authorization = client_auth
    return req


def _retry_after(head: bytes) -> float:
    for line in head.split(b"\r\n"):
        if line[:12].lower() == b"retry-after:":
            try:
                return max(0.0, float(line[12:].strip()))
            except ValueError:
                return 0.0
    return 0.0


class DeliveryWorker:
    """Delivers due items, ``settings.concurrency`` at a time, until stopped."""

    def __init__(
        self,
        store: OutboxStore,
        forwarder: Forwarder,
        settings: OutboxSettings,
        *,
        wall: Callable[[], float],
        rand: Callable[[], float],
        log: Logger,
        on_settled: Callable[[Item, str], None],
    ) -> None:
        self.store = store
        self._fw = forwarder
        self._settings = settings
        self._wall = wall
        self._rand = rand
        self._log = log
        self._on_settled = on_settled  # (item, result): metrics and the callback
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        """Look for due items now (an operator's retry), not at the next poll."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """Claim nothing more; rounds under way go on (the sidecar is shutting down)."""
        self._stopping = True
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; rounds under way get ``grace`` seconds, then are cancelled.

        A cancelled round leaves its item delivering: it is claimed again after its lease
        (at once when a SQLite store is opened again), and resent under the same key.
        """
        self.stop_claiming()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        """Keep up to ``concurrency`` rounds going, claiming as slots free up."""
        s = self._settings
        host = self._fw.host_breaker if self._fw.config.host_breaker.enabled else None
        running: set[asyncio.Task[float | None]] = set()
        held_until = 0.0  # no claims before this (monotonic): the pipeline held rounds back
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if host is not None and not host.would_admit():
                    # Stripe as a whole is failing: every round would be refused. Wait it out.
                    await self._pause(min(s.poll_interval, max(host.retry_after(), 0.05)))
                    continue
                free = s.concurrency - len(running)
                items: list[Item] = []
                if free > 0 and loop.time() >= held_until:
                    items = await self._claim(min(s.batch, free))
                for item in items:
                    running.add(loop.create_task(self._deliver(item)))
                if items and len(items) == min(s.batch, free):
                    continue  # there may be more due: fill the free slots first
                if not running:
                    await self._pause(s.poll_interval)
                    continue
                self._wake.clear()
                waker = loop.create_task(self._wake.wait())
                done, _ = await asyncio.wait(
                    running | {waker}, timeout=s.poll_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                waker.cancel()
                for task in done - {waker}:
                    running.discard(task)
                    wait = task.result()
                    if wait is not None:
                        # Held back (an operation's breaker is open, the limiter is full):
                        # claiming more now would only churn the store.
                        pause = min(s.backoff_max, max(s.poll_interval, wait))
                        held_until = max(held_until, loop.time() + pause)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _claim(self, limit: int) -> list[Item]:
        s = self._settings
        try:
            return await self.store.claim(self._wall(), s.lease, limit, self.owner)
        except StoreError as exc:
            self._log.event("outbox_store_failed", "error", where="claim", error=str(exc))
        except Exception as exc:  # a bug must not stop deliveries for good
            self._log.event("internal_error", "error", where="outbox", error=repr(exc))
        return []

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _deliver(self, item: Item) -> float | None:
        """One round of one item; the wait asked for when the pipeline held it back, else None."""
        try:
            return await self._round(item)
        except StoreError as exc:
            self._log.event(
                "outbox_store_failed", "error", where="settle", id=item.id, error=str(exc)
            )
        except Exception as exc:  # the lease brings the item back
            self._log.event("internal_error", "error", where="outbox", error=repr(exc))
        return None

    async def _round(self, item: Item) -> float | None:
        expired = before_round(item.received_at, item.expires_at, self._wall())
        if expired is not None:
            await self._settle(item, expired, 0, None)
            return None
        keys = self._fw.keys
        conn = DeliveryConnection()
        call = await self._fw.deliver(
            _request(item, keys.client_auth if keys is not None else None), conn
        )
        answer, detail = round_answer(call)
        head, body = conn.answer()
        retry_after = _retry_after(head)
        after = after_round(
            answer,
            detail,
            rounds=item.rounds,
            received_at=item.received_at,
            expires_at=item.expires_at,
            now=self._wall(),
            retry_after=retry_after,
            settings=self._settings,
            rand=self._rand,
        )
        result = None
        if answer in (Answer.SUCCESS, Answer.TERMINAL):
            resp = call.resp
            result = Result(
                call.status,
                body[:_MAX_RESULT_BODY],
                resp.request_id if resp is not None else None,
            )
        await self._settle(item, after, call.attempt, result)
        return retry_after if answer is Answer.NOT_SENT else None

    async def _settle(self, item: Item, after: Next, sent: int, result: Result | None) -> None:
        now = self._wall()
        if after.state is State.QUEUED:
            done = await self.store.release(
                item.id, self.owner, at=now, next_at=after.next_at, reason=after.reason, sent=sent
            )
            outcome = "retry"
        else:
            done = await self.store.complete(
                item.id, self.owner, after.state, at=now, reason=after.reason, sent=sent,
                result=result,
            )  # fmt: skip
            outcome = after.state.value
        if done is None:
            # The lease ran out and another deliverer holds the item now: its result counts.
            self._log.event("outbox_lease_lost", "warning", id=item.id, operation=item.operation)
            return
        if sent or outcome != "retry":
            self._on_settled(done, outcome)
        level = "warning" if after.state in (State.FAILED, State.EXPIRED) else "info"
        if not sent and after.state is State.QUEUED:
            level = "debug"  # held back by a breaker or the limiter: no news
        self._log.event(
            "outbox_delivery",
            level,
            id=item.id,
            operation=item.operation,
            result=outcome,
            state=done.state.value,
            attempts=sent,
            reason=after.reason,
        )
