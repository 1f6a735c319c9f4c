"""The outbox in a running sidecar: its store, hook, worker, callback, metrics and API.

Nothing here runs unless the outbox is on: some operation has ``fallback: queue``, or a store
is named (``outbox.store`` or ``STRIPE_SIDECAR_OUTBOX_STORE``: items left by an earlier config
still get delivered). A store that cannot be opened at start (Redis down, say) is retried
every ``poll_interval``; meanwhile nothing is queued (the app gets the normal failure answer),
``stripe_sidecar_outbox_store_up`` is 0 and ``/diagnosis`` says so. ``/ready`` stays ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.config import Config
from proxy.log import Logger
from proxy.outbox import open_store
from proxy.outbox.callback import Callback
from proxy.outbox.capture import Capture
from proxy.outbox.policy import ENV_STORE, store_url
from proxy.outbox.store import (
    FINAL_STATES,
    Item,
    NotAllowed,
    OutboxStore,
    State,
    StoreError,
    header_names,
    redact_url,
)
from proxy.outbox.worker import DeliveryWorker

if TYPE_CHECKING:
    from proxy.forward import Forwarder

__all__ = ["Outbox", "public_item"]

# Header values shown to operators; every other header is shown by name only.
_SHOWN = frozenset(
    {"stripe-version", "stripe-account", "stripe-context", "content-type", "idempotency-key"}
)
_PRUNE_EVERY = 3600.0


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _answer_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None  # not JSON (compressed, or an HTML page): left out


def public_item(item: Item, *, full: bool = False) -> dict[str, Any]:
    """An item as operators see it: never an Authorization value, never the request body."""
    shown: dict[str, str] = {}
    for line in item.headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower().decode("latin-1") in _SHOWN:
            shown[name.strip().decode("latin-1")] = value.strip().decode("latin-1")
    out: dict[str, Any] = {
        "object": "sidecar.queued_request",
        "id": item.id,
        "idempotency_key": item.idempotency_key,
        "operation": item.operation,
        "method": item.method,
        "path": item.target,
        "state": item.state.value,
        "reason": item.reason,
        "received_at": _iso(item.received_at),
        "expires_at": _iso(item.expires_at),
        "updated_at": _iso(item.updated_at),
        "next_attempt_at": _iso(item.next_at) if item.state is State.QUEUED else None,
        "attempts": item.attempts,
        "rounds": item.rounds,
        "result": None,
    }
    if item.result is not None:
        out["result"] = {"status": item.result.status, "request_id": item.result.request_id}
    if full:
        out["headers"] = shown
        out["header_names"] = [n for n in header_names(item.headers)]
        out["body_bytes"] = len(item.body)
        if item.result is not None:
            out["result"]["body"] = _answer_body(item.result.body)
    return out


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    kind = "invalid_request_error" if status < 500 else "api_error"
    return status, {"error": {"type": kind, "code": f"sidecar_{code}", "message": message}}


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.items = Gauge(
            "stripe_sidecar_outbox_items", "Outbox items by state.", ["state"], registry=registry
        )
        self.oldest = Gauge(
            "stripe_sidecar_outbox_oldest_queued_age_seconds",
            "Age of the oldest queued outbox item (0 when nothing is queued).",
            registry=registry,
        )
        self.deliveries = Counter(
            "stripe_sidecar_outbox_deliveries",
            "Delivery rounds that sent to Stripe or settled an item, by result.",
            ["operation", "result"],
            registry=registry,
        )
        self.queued = Counter(
            "stripe_sidecar_outbox_queued",
            "Writes stored in the outbox and answered 202, by operation.",
            ["operation"],
            registry=registry,
        )
        self.store_up = Gauge(
            "stripe_sidecar_outbox_store_up",
            "1 when the outbox store answers, 0 when it does not.",
            registry=registry,
        )
        for state in State:
            self.items.labels(state.value).set(0)
        self.store_up.set(0)


class Outbox:
    """The outbox of one sidecar: ``capture`` goes to the forwarder, then ``await start()``."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry,
        log: Logger,
        environ: Mapping[str, str],
        keys_held: bool,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        report_store: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.settings = s = config.outbox
        # Tells the diagnosis engine whether the store answers: (url, error or None).
        self._report_store = report_store
        self.url = store_url(s, environ)
        self.enabled = (
            any(op.fallback == "queue" for op in config.operations.values())
            or s.store is not None
            or bool(environ.get(ENV_STORE))
        )
        self._log = log
        self._wall = wall
        self._rand = rand
        self.store: OutboxStore | None = None
        self.store_error: str | None = None
        self.worker: DeliveryWorker | None = None
        self.callback: Callback | None = None
        self._forwarder: Forwarder | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        self.counts: dict[str, int] = {state.value: 0 for state in State}
        self.oldest_age = 0.0
        self.metrics: _Metrics | None = None
        self.capture: Capture | None = None
        if self.enabled:
            self.metrics = _Metrics(registry)
            self.capture = Capture(
                s, store=self._usable_store, wall=wall, log=log, keys_held=keys_held,
                on_queued=self._queued, on_store_error=self._store_failed,
            )  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, forwarder: Forwarder) -> None:
        """Open the store (or keep trying), start the worker and the monitor."""
        if not self.enabled:
            return
        self._forwarder = forwarder
        if self.settings.callback_url is not None:
            self.callback = Callback(self.settings, log=self._log)
            self.callback.start()
        await self._open()
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _open(self) -> None:
        try:
            self.store = await open_store(self.url, now=self._wall())
        except StoreError as exc:
            self._store_failed(exc)
            self._log.event(
                "outbox_store_failed", "error", where="open", store=redact_url(self.url),
                error=str(exc),
            )  # fmt: skip
            return
        self._store_answers()
        assert self._forwarder is not None
        self._log.event("outbox_opened", store=redact_url(self.url))
        if getattr(self.store, "durable", None) is False:
            # A Redis without its append-only file loses acknowledged writes when it restarts.
            self._log.event(
                "outbox_store_not_durable", "warning", store=redact_url(self.url),
                advice="run Redis with appendonly yes and appendfsync always",
            )  # fmt: skip
        self.worker = DeliveryWorker(
            self.store, self._forwarder, self.settings, wall=self._wall, rand=self._rand,
            log=self._log, on_settled=self._settled,
        )  # fmt: skip
        self.worker.start()

    def stop_claiming(self) -> None:
        """At SIGTERM: deliver nothing new; rounds under way finish during the shutdown grace."""
        if self.worker is not None:
            self.worker.stop_claiming()

    async def stop(self, grace: float = 1.0) -> None:
        """Stop delivering (rounds under way get ``grace``), then close the store."""
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop(grace)
        if self.callback is not None:
            await self.callback.stop()
        if self.store is not None:
            with contextlib.suppress(StoreError):
                await self.store.close()
            self.store = None

    async def _watch(self) -> None:
        """Every poll interval: reopen a store that failed to open, refresh the gauges, prune."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            if self.store is None:
                await self._open()
                continue
            await self.refresh()

    async def refresh(self) -> None:
        """Read counts and the oldest item's age into the gauges; store_up follows."""
        if self.store is None or self.metrics is None:
            return
        try:
            counts = await self.store.counts()
            oldest = await self.store.oldest_queued()
            now = self._wall()
            if now - self._pruned_at >= _PRUNE_EVERY:
                self._pruned_at = now
                await self.store.prune(now - self.settings.retention)
        except StoreError as exc:
            self._store_failed(exc)
            return
        self._store_answers()
        for state, n in counts.items():
            self.counts[state.value] = n
            self.metrics.items.labels(state.value).set(n)
        self.oldest_age = max(0.0, now - oldest) if oldest is not None else 0.0
        self.metrics.oldest.set(self.oldest_age)

    def _usable_store(self) -> OutboxStore | None:
        """The store for a put, or None while it is not open or known to fail.

        After a failure nothing is queued until the monitor finds the store answering again
        (every poll_interval): a store that is down must not add its time-out to every write.
        """
        return self.store if self.store_error is None else None

    # -- events ---------------------------------------------------------------------------------
    def _queued(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.queued.labels(operation).inc()

    def _store_failed(self, exc: StoreError) -> None:
        self.store_error = str(exc)
        if self.metrics is not None:
            self.metrics.store_up.set(0)
        if self._report_store is not None:
            self._report_store(self.url, self.store_error)

    def _store_answers(self) -> None:
        self.store_error = None
        if self.metrics is not None:
            self.metrics.store_up.set(1)
        if self._report_store is not None:
            self._report_store(self.url, None)

    def _settled(self, item: Item, result: str) -> None:
        if self.metrics is not None:
            self.metrics.deliveries.labels(item.operation, result).inc()
        if self.callback is not None and item.state in FINAL_STATES:
            self.callback.tell(public_item(item, full=True))

    # -- surfaces -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The ``outbox`` part of /diagnosis (and of the status page)."""
        return {
            "enabled": self.enabled,
            "store": redact_url(self.url) if self.enabled else None,
            "store_up": self.enabled and self.store is not None and self.store_error is None,
            "error": self.store_error,
            "counts": dict(self.counts),
            "oldest_queued_age_seconds": round(self.oldest_age, 3),
        }

    async def api(self, method: str, path: str, query: str) -> tuple[int, dict[str, Any]]:
        """The /outbox endpoints: ``(status, JSON document)``."""
        if not self.enabled:
            return _error(404, "outbox_off", "The outbox is off: no operation has fallback: queue.")
        store = self.store
        if store is None:
            return _error(503, "outbox_unavailable", f"The outbox store is unreachable: "
                          f"{self.store_error}")  # fmt: skip
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        parts = path.strip("/").split("/")
        try:
            if parts == ["outbox"]:
                if method != "GET":
                    return _error(405, "method_not_allowed", "/outbox answers GET only.")
                return await self._list(store, params)
            if len(parts) == 2 and method == "GET":
                return await self._show(store, parts[1])
            if len(parts) == 2 and method == "DELETE":
                return await self._drop(store, parts[1], params.get("reason", ""))
            if len(parts) == 3 and parts[2] == "retry" and method == "POST":
                return await self._retry(store, parts[1])
        except StoreError as exc:
            self._store_failed(exc)
            return _error(503, "outbox_unavailable", f"The outbox store failed: {exc}")
        except NotAllowed as exc:
            return _error(409, "outbox_not_allowed", f"Not allowed: {exc}.")
        return _error(
            404, "not_found", "Unknown outbox endpoint: GET /outbox, GET /outbox/{id}, "
            "POST /outbox/{id}/retry, DELETE /outbox/{id}.",
        )  # fmt: skip

    async def _list(self, store: OutboxStore, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        state = None
        if "state" in params:
            try:
                state = State(params["state"])
            except ValueError:
                names = ", ".join(s.value for s in State)
                return _error(400, "invalid_filter", f"state must be one of {names}.")
        operation = params.get("operation") or None
        try:
            limit = min(1000, max(1, int(params.get("limit", "100"))))
        except ValueError:
            return _error(400, "invalid_filter", "limit must be an integer.")
        counts = await store.counts(operation=operation)
        items = await store.items(state=state, operation=operation, limit=limit)
        return 200, {
            "object": "list",
            "counts": {s.value: counts.get(s, 0) for s in State},
            "items": [public_item(i) for i in items],
        }

    async def _show(self, store: OutboxStore, item_id: str) -> tuple[int, dict[str, Any]]:
        item = await store.get(item_id)
        if item is None:
            return _error(404, "outbox_item_not_found", f"No outbox item {item_id!r}.")
        doc = public_item(item, full=True)
        doc["history"] = [
            {"at": _iso(t.at), "from": t.from_state, "to": t.to, "reason": t.reason}
            for t in await store.history(item_id)
        ]
        return 200, doc

    async def _retry(self, store: OutboxStore, item_id: str) -> tuple[int, dict[str, Any]]:
        item = await store.retry(item_id, at=self._wall(), reason="retry by operator")
        if item is None:
            return _error(404, "outbox_item_not_found", f"No outbox item {item_id!r}.")
        self._log.event("outbox_retry", "warning", id=item_id, operation=item.operation)
        if self.worker is not None:
            self.worker.wake()
        return 200, public_item(item, full=True)

    async def _drop(
        self, store: OutboxStore, item_id: str, why: str
    ) -> tuple[int, dict[str, Any]]:
        reason = "dropped by operator" + (f": {why[:200]}" if why else "")
        item = await store.drop(item_id, at=self._wall(), reason=reason)
        if item is None:
            return _error(404, "outbox_item_not_found", f"No outbox item {item_id!r}.")
        self._log.event(
            "outbox_dropped", "warning", id=item_id, operation=item.operation,
            state=item.state.value, reason=reason,
        )  # fmt: skip
        return 200, {"id": item_id, "object": "sidecar.queued_request", "deleted": True,
                     "item": public_item(item)}  # fmt: skip
