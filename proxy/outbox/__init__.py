"""The durable outbox: writes acknowledged ``202`` during an outage, performed exactly once later.

- :mod:`proxy.outbox.store`: the items, their states and the store protocol (``OutboxStore``).
- :mod:`proxy.outbox.policy`: the pure delivery decisions (what state next, expiry, backoff).
- :mod:`proxy.outbox.sqlite`: the embedded store (the default); ``redis://`` stores live in
  :mod:`proxy.outbox.redis_store`.
- :mod:`proxy.outbox.capture`: the pipeline's fallback hook (store, then answer 202).
- :mod:`proxy.outbox.worker`: the delivery worker; :mod:`proxy.outbox.service` wires it all.
"""

from __future__ import annotations

from proxy.outbox.store import (
    FINAL_STATES,
    Item,
    NewItem,
    NotAllowed,
    OutboxStore,
    Result,
    State,
    StoreError,
    Transition,
    redact_url,
)

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
    "open_store",
    "redact_url",
]


async def open_store(url: str, *, now: float) -> OutboxStore:
    """Open the store a URL names: ``sqlite:///path`` or ``redis://host:port/db``.

    StoreError when it cannot be opened (the message never shows a password).
    """
    if url.startswith("sqlite:"):
        from proxy.outbox.sqlite import SQLiteStore

        return await SQLiteStore.open(url, now=now)
    if url.startswith(("redis://", "rediss://")):
        try:
            from proxy.outbox.redis_store import RedisStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise StoreError(f"a redis:// outbox store is not available here: {exc}") from None
        store: OutboxStore = await RedisStore.open(url, now=now)
        return store
    raise StoreError(f"{redact_url(url)} is not a sqlite:/// or redis:// URL")
