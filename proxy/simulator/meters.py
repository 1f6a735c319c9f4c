"""API v2 `POST /v2/billing/meter_events` (JSON in, JSON out)."""

from __future__ import annotations

from datetime import UTC, datetime

from proxy.simulator.call import Call, Outcome, required
from proxy.simulator.errors import invalid
from proxy.simulator.store import Store


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def create(store: Store, call: Call) -> Outcome:
    """Record one meter event; `identifier` defaults to a fresh one."""
    p = call.params
    event_name = required(p, "event_name")
    payload = required(p, "payload")
    if not isinstance(event_name, str):
        raise invalid("event_name must be a string.", param="event_name")
    if not isinstance(payload, dict):
        raise invalid("payload must be an object.", param="payload")
    now = _iso(store.clock())
    identifier = str(p.get("identifier") or store.new_id("mtr_evt"))
    obj = {
        "object": "v2.billing.meter_event",
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": call.livemode,
        "payload": payload,
        "timestamp": str(p.get("timestamp") or now),
    }
    store.meter_events[identifier] = obj
    return Outcome.ok(obj, wrote=True)
