"""The pipeline's fallback hook: store a write that cannot reach Stripe now, then answer 202.

Only operations configured ``fallback: queue`` carry a :class:`Capture` (``_Op.outbox`` in
``proxy.forward``); every other request pays one attribute test. A request is queued when

- its breaker or the host breaker refused it (``circuit_open``), or its retries ended on an
  outcome worth repeating (5xx, gateway errors, time-outs, resets, 409, 429);
- it is a POST with an Idempotency-Key (the app's, or the one the sidecar injects) and a body
  the sidecar holds (a streamed upload is never queued);
- the store confirms the write durably. Otherwise the app gets the answer it would have had.

What is stored: method, target, the end-to-end header lines and the body, under the key. The
app's ``Authorization`` line is stored with it, since the write must go with that key later;
when the sidecar holds the keys, no Authorization is stored at all and the active held key is
put on at delivery, as on any request. Stored secrets never leave the store: the API, logs and
metrics show header names and the key's scope hash only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.log import Logger
from proxy.outbox.policy import OutboxSettings, expiry
from proxy.outbox.store import NewItem, OutboxStore, StoreError
from proxy.retry import GiveUp

if TYPE_CHECKING:
    from proxy.forward import Call, Forwarder

__all__ = ["Capture", "DeliveryConnection"]

_AUTH = b"authorization:"
_ACCOUNT = b"stripe-account:"


class DeliveryConnection:
    """Stands in for the app's connection when the worker sends a stored item.

    The pipeline writes its answer here; the hook notes the request's :class:`Call` on it
    instead of queueing it again.
    """

    closed = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.call: Call | None = None
        self.aborted = False

    def keeps_alive(self, req: object) -> bool:
        """Always: there is no socket to close."""
        return True

    def finish(self, data: bytes, *, keep_alive: bool) -> None:
        """The whole answer."""
        self.parts.append(data)

    def start_stream(self, data: bytes) -> None:
        """Part of a streamed answer."""
        self.parts.append(data)

    def end_stream(self, data: bytes, *, keep_alive: bool) -> None:
        """The end of a streamed answer."""
        self.parts.append(data)

    def set_streaming(self, response: object) -> None:
        """Nothing to pause: the answer is collected in memory."""

    def abort(self) -> None:
        """A streamed answer was cut off."""
        self.aborted = True

    def answer(self) -> tuple[bytes, bytes]:
        """The answer's head and (de-chunked) body."""
        raw = b"".join(self.parts)
        head, _, body = raw.partition(b"\r\n\r\n")
        if b"\r\ntransfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return head, body


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return b"".join(out)
        try:
            size = int(data[pos:end].split(b";", 1)[0], 16)
        except ValueError:
            return b"".join(out)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        pos = end + 4 + size


class Capture:
    """Decides whether a finished call is queued, stores it, and answers 202."""

    def __init__(
        self,
        settings: OutboxSettings,
        *,
        store: Callable[[], OutboxStore | None],
        wall: Callable[[], float],
        log: Logger,
        keys_held: bool,
        on_queued: Callable[[str], None],
        on_store_error: Callable[[StoreError], None],
    ) -> None:
        self._settings = settings
        self._store = store  # None while the store is not open
        self._wall = wall
        self._log = log
        self._keys_held = keys_held
        self._on_queued = on_queued
        self._on_store_error = on_store_error

    async def offer(self, call: Call, refusal: str | None, fw: Forwarder) -> bool:
        """Queue the call and answer 202 (True), or leave the answer to the pipeline (False)."""
        conn: object = call.conn
        if type(conn) is DeliveryConnection:
            conn.call = call  # a delivery is never queued again
            return False
        if call.conn.closed:
            return False
        if refusal is not None:
            if refusal != "circuit_open":
                return False
        elif not call.verdict.retryable or call.step.give_up is GiveUp.CLIENT_GONE:
            return False
        req = call.req
        if req.method != "POST" or req.source is not None:
            return False
        if not call.has_key:
            fw.make_safe(call)  # a refused call has no injected key yet
        key = call.injected if call.injected is not None else req.idempotency_key
        store = self._store()
        if key is None or store is None:
            return False
        new = self._item(call, key)
        try:
            item, _ = await store.put(new)
        except StoreError as exc:
            self._on_store_error(exc)
            self._log.event(
                "outbox_store_failed", "error", operation=call.op.name, error=str(exc)
            )
            return False
        if item.fingerprint != new.fingerprint:
            return False  # the key was used for another request: Stripe's answer decides
        if call.resp is not None:
            call.resp.discard()
        fw.respond.queued(call, item.id, item.idempotency_key, item.state.value)
        if item.id == new.id:
            self._on_queued(call.op.name)
            self._log.event(
                "outbox_queued",
                operation=call.op.name,
                id=item.id,
                reason=refusal or call.verdict.outcome,
                attempts=call.attempt,
            )
        return True

    def _item(self, call: Call, key: bytes) -> NewItem:
        req = call.req
        lines = req.head
        account = b""
        auth = b""
        kept = []
        for line in lines:
            lower = line[:15].lower()
            if lower.startswith(_AUTH):
                auth += line
                if self._keys_held:
                    continue  # the held key in force at delivery goes on instead
            elif lower.startswith(_ACCOUNT):
                account = line
            kept.append(line)
        headers = b"".join(kept)
        scope = hashlib.sha256(
            (b"held" if self._keys_held else auth) + b"\0" + account.strip()
        ).hexdigest()[:24]
        fingerprint = hashlib.sha256(
            b"%s %s\n%s" % (req.method.encode(), req.target, req.body)
        ).hexdigest()[:24]
        now = self._wall()
        return NewItem(
            id="qr_" + os.urandom(12).hex(),
            operation=call.op.name,
            idempotency_key=key.decode("latin-1"),
            scope=scope,
            fingerprint=fingerprint,
            # Writes to one object (an ID in the path) are delivered in the order received.
            order_key=f"{scope}:{req.path}" if "{" in call.op.name else None,
            method=req.method,
            target=req.target.decode("latin-1"),
            headers=headers,
            body=req.body,
            received_at=now,
            expires_at=expiry(now, self._settings),
            attempts=call.attempt,
        )
