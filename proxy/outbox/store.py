"""What the outbox keeps, and the protocol every store (SQLite, Redis) implements.

An :class:`Item` is one write the sidecar acknowledged ``202`` and must perform later: the
request as it would go to Stripe (method, target, end-to-end header lines, body) under its
Idempotency-Key, plus where it stands (:class:`State`) and every transition it made
(:class:`Transition`, the audit trail).

The life of an item::

    put -> queued --claim--> delivering --release--> queued            (another round later)
                                        --complete-> delivered | failed | expired
    operator: retry (queued|failed -> queued), drop (deleted; the audit trail stays)

A store is durable at ``put``: when it returns, the item survives a SIGKILL of the process.
``claim`` hands due items out with a visibility timeout (``lease``): an item whose deliverer
died is claimed again once its lease has run out. ``release`` and ``complete`` take the
``owner`` the claim gave, so a deliverer whose lease ran out cannot overwrite a newer
deliverer's result (fencing). Items with the same ``order_key`` (the same Stripe object) are
handed out one at a time, in the order they were put.

Times are wall-clock seconds (``time.time()``), passed in by the caller, never read here: the
store decides nothing about time on its own.

The contract every implementation must keep is tested by ``tests/outbox_contract.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "FINAL_STATES",
    "Item",
    "NewItem",
    "NotAllowed",
    "OutboxStore",
    "Result",
    "State",
    "StoreError",
    "Transition",
]


class State(enum.StrEnum):
    """Where an item stands; the value is its name in the API, metrics and stores."""

    QUEUED = "queued"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"


FINAL_STATES = frozenset({State.DELIVERED, State.FAILED, State.EXPIRED})


class StoreError(Exception):
    """The store could not be reached or did not confirm a write (nothing may be assumed)."""


class NotAllowed(Exception):
    """An operator action the item's state does not allow (``str(exc)`` says why)."""


@dataclass(frozen=True, slots=True)
class Result:
    """Stripe's answer to a delivery: status, ``Request-Id`` and the body (JSON bytes)."""

    status: int
    body: bytes
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """One step of an item's audit trail; ``to`` is ``dropped`` for an operator's drop."""

    at: float
    from_state: str | None  # None for the put
    to: str
    reason: str


@dataclass(frozen=True, slots=True)
class NewItem:
    """A write to keep: everything needed to send it again, exactly as the app sent it.

    ``headers`` are the end-to-end request header lines (``b"Name: value\\r\\n"`` each), the
    ``Authorization`` line included when the app's own key must go with it: a store holds
    secrets and must be protected like the keys themselves. ``scope`` tells apart the same
    Idempotency-Key sent by two accounts (Stripe's keys are per account): a put with a
    ``(scope, idempotency_key)`` already stored returns that item instead of a new one.
    ``fingerprint`` identifies the request's content, so a reused key with another body is
    told apart from a resend.
    """

    id: str
    operation: str
    idempotency_key: str
    scope: str
    fingerprint: str
    order_key: str | None
    method: str
    target: str
    headers: bytes
    body: bytes
    received_at: float
    expires_at: float  # never sent from this moment on (Stripe's idempotency window)
    attempts: int  # sends to Stripe before it was queued


@dataclass(frozen=True, slots=True)
class Item:
    """A stored item as it stands now."""

    id: str
    operation: str
    idempotency_key: str
    scope: str
    fingerprint: str
    order_key: str | None
    method: str
    target: str
    headers: bytes
    body: bytes
    received_at: float
    expires_at: float
    attempts: int  # sends to Stripe in all, before queueing and in every delivery round
    state: State
    rounds: int  # delivery rounds that sent something
    next_at: float  # not claimed before this time
    lease_until: float  # while delivering: claimable again from this time
    owner: str  # the deliverer holding the lease ("" when none)
    updated_at: float
    reason: str  # why it is in its state (the last transition's reason)
    result: Result | None  # Stripe's final answer (delivered, failed)


class OutboxStore(Protocol):
    """A durable outbox. Every method may raise :class:`StoreError`."""

    url: str  # for people: the store's URL with any password removed

    async def put(self, item: NewItem) -> tuple[Item, bool]:
        """Store a new item durably (state queued, due at once); ``(item, created)``.

        When ``(scope, idempotency_key)`` is stored already, nothing is written and the
        stored item comes back with ``created`` False, whatever its state.
        """
        ...

    async def claim(self, now: float, lease: float, limit: int, owner: str) -> list[Item]:
        """Hand out up to ``limit`` due items, oldest first, as ``delivering`` under ``owner``.

        Due: queued with ``next_at <= now``, or delivering with ``lease_until <= now`` (its
        deliverer is presumed dead). An item is skipped while an item put before it with the
        same ``order_key`` is queued or delivering.
        """
        ...

    async def release(
        self,
        item_id: str,
        owner: str,
        *,
        at: float,
        next_at: float,
        reason: str,
        sent: int,
    ) -> Item | None:
        """Put a delivering item back to ``queued`` until ``next_at``; ``sent`` attempts made.

        None (nothing changed) unless the item is delivering under ``owner``.
        """
        ...

    async def complete(
        self,
        item_id: str,
        owner: str,
        state: State,
        *,
        at: float,
        reason: str,
        sent: int,
        result: Result | None,
    ) -> Item | None:
        """Move a delivering item to a final state with Stripe's answer (None: no answer).

        None (nothing changed) unless the item is delivering under ``owner``.
        """
        ...

    async def get(self, item_id: str) -> Item | None:
        """One item, or None."""
        ...

    async def history(self, item_id: str) -> list[Transition]:
        """The audit trail of an item, oldest first (kept after a drop)."""
        ...

    async def items(
        self, *, state: State | None = None, operation: str | None = None, limit: int = 100
    ) -> list[Item]:
        """Items oldest first, optionally of one state and/or operation."""
        ...

    async def counts(self, *, operation: str | None = None) -> Mapping[State, int]:
        """How many items are in each state (every state present, 0 included)."""
        ...

    async def oldest_queued(self) -> float | None:
        """``received_at`` of the oldest queued item, or None."""
        ...

    async def retry(self, item_id: str, *, at: float, reason: str) -> Item | None:
        """Queue a ``queued`` or ``failed`` item again, due at ``at``; None if unknown.

        :class:`NotAllowed` for ``delivering`` (it is being sent), ``delivered`` (Stripe
        performed it) and ``expired`` (a resend could perform it twice).
        """
        ...

    async def drop(self, item_id: str, *, at: float, reason: str) -> Item | None:
        """Delete an item (the audit trail records it); the item as it was, or None.

        :class:`NotAllowed` while it is ``delivering``.
        """
        ...

    async def prune(self, before: float) -> int:
        """Delete final items last changed before ``before`` (and their trails); how many."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...


def redact_url(url: str) -> str:
    """A store URL safe to show: any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"***@{host}"
    return f"{scheme}://{netloc}{slash}{path}"


def header_names(headers: bytes) -> Sequence[str]:
    """The header names in stored header lines (for people: no values)."""
    return [line.split(b":", 1)[0].decode("latin-1") for line in headers.split(b"\r\n") if line]
