"""Stripe's idempotency layer, as a pure in-memory store.

Semantics (docs.stripe.com/idempotency, /error-low-level): the first result for a key is
saved once the endpoint starts executing, 500s included, and replayed for the same key;
the same key with other parameters is an `idempotency_error`; the same key while the first
request runs is a 409. Nothing is saved when validation fails or on a conflict. Keys are
scoped per API key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

MAX_KEY_LENGTH: Final = 255


class Lookup(enum.Enum):
    """What the store says about an incoming (scope, key, fingerprint)."""

    NEW = "new"
    REPLAY = "replay"
    MISMATCH = "mismatch"
    IN_FLIGHT = "in_flight"


@dataclass(slots=True)
class Saved:
    """One key's entry: in flight until `done`, then the response to replay."""

    fingerprint: str
    done: bool = False
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"
    request_id: str = ""
    headers: tuple[tuple[str, str], ...] = ()


class IdempotencyStore:
    """Saved responses by (API key, idempotency key), oldest evicted past `max_keys`.

    Stripe prunes keys after at least 24 hours; a bounded store keeps a long benchmark's
    memory flat instead, which only forgets keys far older than any retry.
    """

    def __init__(self, max_keys: int = 200_000) -> None:
        self._entries: dict[tuple[str, str], Saved] = {}
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, scope: str, key: str, fingerprint: str) -> tuple[Lookup, Saved | None]:
        """Classify a request; the entry comes back for REPLAY."""
        entry = self._entries.get((scope, key))
        if entry is None:
            return Lookup.NEW, None
        if not entry.done:
            return Lookup.IN_FLIGHT, entry
        if entry.fingerprint != fingerprint:
            return Lookup.MISMATCH, entry
        return Lookup.REPLAY, entry

    def begin(self, scope: str, key: str, fingerprint: str) -> None:
        """Mark the key in flight: the endpoint starts executing now."""
        self._entries[(scope, key)] = Saved(fingerprint)
        if len(self._entries) > self._max_keys:
            del self._entries[next(iter(self._entries))]

    def finish(
        self,
        scope: str,
        key: str,
        *,
        status: int,
        body: bytes,
        content_type: str,
        request_id: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Save the response the endpoint produced, for replays."""
        entry = self._entries.get((scope, key))
        if entry is None:  # evicted or reset while running: nothing to replay to
            return
        entry.done = True
        entry.status = status
        entry.body = body
        entry.content_type = content_type
        entry.request_id = request_id
        entry.headers = headers

    def abandon(self, scope: str, key: str) -> None:
        """Forget an in-flight key that produced no saved result (cancelled mid-run)."""
        entry = self._entries.get((scope, key))
        if entry is not None and not entry.done:
            del self._entries[(scope, key)]

    def clear(self) -> None:
        """Forget every key."""
        self._entries.clear()
