"""The simulator's Stripe API surface: path templates, body kinds and endpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from proxy.simulator import account, customers, files, meters, oauth, payments
from proxy.simulator.call import Call, Outcome
from proxy.simulator.store import Store

BodyKind = Literal["form", "json", "multipart", "query"]
Endpoint = Callable[[Store, Call], Outcome]


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: `operation` is the bounded label ("POST /v1/customers/{id}")."""

    method: str
    template: str
    body: BodyKind
    endpoint: Endpoint
    operation: str
    segments: tuple[str | None, ...]  # None where the template has "{id}"

    @property
    def writes(self) -> bool:
        """Whether the operation changes state (and so counts as a side effect)."""
        return self.method != "GET"


def _route(method: str, template: str, body: BodyKind, endpoint: Endpoint) -> Route:
    segments = tuple(None if s.startswith("{") else s for s in template.strip("/").split("/"))
    return Route(method, template, body, endpoint, f"{method} {template}", segments)


ROUTES: Final[tuple[Route, ...]] = (
    _route("POST", "/v1/customers", "form", customers.create),
    _route("GET", "/v1/customers", "query", customers.list_all),
    _route("GET", "/v1/customers/{id}", "query", customers.retrieve),
    _route("POST", "/v1/customers/{id}", "form", customers.update),
    _route("DELETE", "/v1/customers/{id}", "query", customers.delete),
    _route("POST", "/v1/payment_intents", "form", payments.create),
    _route("GET", "/v1/payment_intents", "query", payments.list_all),
    _route("GET", "/v1/payment_intents/{id}", "query", payments.retrieve),
    _route("POST", "/v1/payment_intents/{id}", "form", payments.update),
    _route("POST", "/v1/payment_intents/{id}/confirm", "form", payments.confirm),
    _route("POST", "/v1/payment_intents/{id}/capture", "form", payments.capture),
    _route("POST", "/v1/refunds", "form", payments.refund),
    _route("GET", "/v1/balance", "query", payments.balance),
    _route("GET", "/v1/account", "query", account.retrieve),
    _route("POST", "/v1/files", "multipart", files.create),
    _route("GET", "/v1/files/{id}", "query", files.retrieve),
    _route("GET", "/v1/files/{id}/contents", "query", files.contents),
    _route("POST", "/oauth/token", "form", oauth.token),
    _route("POST", "/v2/billing/meter_events", "json", meters.create),
)

_BY_SHAPE: Final[dict[tuple[str, int], tuple[Route, ...]]] = {}
for _r in ROUTES:
    _BY_SHAPE[(_r.method, len(_r.segments))] = (
        *_BY_SHAPE.get((_r.method, len(_r.segments)), ()), _r)


def match(method: str, path: str) -> tuple[Route, tuple[str, ...]] | None:
    """The route for `method path` and the ids taken from it, or None."""
    parts = path.strip("/").split("/")
    for route in _BY_SHAPE.get((method, len(parts)), ()):
        ids: list[str] = []
        for want, got in zip(route.segments, parts, strict=True):
            if want is None:
                if not got:
                    break
                ids.append(got)
            elif want != got:
                break
        else:
            return route, tuple(ids)
    return None
