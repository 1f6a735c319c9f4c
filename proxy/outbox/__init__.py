"""The durable outbox: writes acknowledged ``202`` during an outage, performed exactly once later.

- :mod:`proxy.outbox.store`: the items, their states and the store protocol (``OutboxStore``).
- :mod:`proxy.outbox.policy`: the pure delivery decisions (what state next, expiry, backoff).
- :mod:`proxy.outbox.sqlite`: the embedded store (the default); ``redis://`` stores live in
  :mod:`proxy.outbox.redis_store`.
- :mod:`proxy.outbox.capture`: the pipeline's fallback hook (store, then answer 202).
- :mod:`proxy.outbox.worker`: the delivery worker; :mod:`proxy.outbox.service` wires it all.
"""

from __future__ import annotations

import importlib

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
        module = None
        for name in ("proxy.outbox.redis", "proxy.outbox.redis_store"):
            try:
                module = importlib.import_module(name)
                break
            except ModuleNotFoundError as exc:
                if exc.name != name:  # the module is there, something it needs is not
                    raise StoreError(f"the Redis outbox store cannot load: {exc}") from None
        if module is None:
            raise StoreError("a redis:// outbox store is not available in this build")
        store: OutboxStore = await module.RedisStore.open(url, now=now)
        return store
    raise StoreError(f"{redact_url(url)} is not a sqlite:/// or redis:// URL")
