"""Customers: create, retrieve, update, delete, list."""

from __future__ import annotations

from typing import Any, Final

from proxy.simulator.call import (
    Call,
    JsonObject,
    Outcome,
    apply_metadata,
    integer,
    metadata_update,
)
from proxy.simulator.errors import invalid, resource_missing
from proxy.simulator.store import Store, list_page

# Fields a create or update may set directly; anything else (expand, ...) is ignored.
_SETTABLE: Final = frozenset({
    "address", "description", "email", "name", "phone", "preferred_locales", "shipping",
    "tax_exempt", "invoice_settings",
})


def _checked(call: Call) -> tuple[dict[str, Any], dict[str, str] | None, int | None]:
    params = call.params
    email = params.get("email")
    if email not in (None, "") and (not isinstance(email, str) or "@" not in email):
        raise invalid(f"Invalid email address: {email}", code="email_invalid", param="email")
    fields = {k: v for k, v in params.items() if k in _SETTABLE}
    return fields, metadata_update(params), integer(params, "balance")


def create(store: Store, call: Call) -> Outcome:
    """POST /v1/customers."""
    fields, meta, balance = _checked(call)
    cid = store.new_id("cus")
    obj: JsonObject = {
        "id": cid,
        "object": "customer",
        "address": None,
        "balance": balance or 0,
        "created": store.now(),
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": None,
        "invoice_prefix": cid[4:12].upper(),
        "invoice_settings": {"custom_fields": None, "default_payment_method": None,
                             "footer": None, "rendering_options": None},
        "livemode": call.livemode,
        "metadata": {},
        "name": None,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }
    obj.update(fields)
    apply_metadata(obj["metadata"], meta)
    store.customers[cid] = obj
    return Outcome.ok(obj, wrote=True)


def _existing(store: Store, cid: str) -> JsonObject:
    obj = store.customers.get(cid)
    if obj is None:
        raise resource_missing("customer", cid)
    return obj


def retrieve(store: Store, call: Call) -> Outcome:
    """GET /v1/customers/{id}; a deleted customer comes back as a `deleted` stub, like Stripe."""
    cid = call.ids[0]
    if cid in store.deleted_customers:
        return Outcome.ok({"id": cid, "object": "customer", "deleted": True})
    return Outcome.ok(_existing(store, cid))


def update(store: Store, call: Call) -> Outcome:
    """POST /v1/customers/{id}."""
    obj = _existing(store, call.ids[0])
    fields, meta, balance = _checked(call)
    obj.update(fields)
    if balance is not None:
        obj["balance"] = balance
    apply_metadata(obj["metadata"], meta)
    return Outcome.ok(obj, wrote=True)


def delete(store: Store, call: Call) -> Outcome:
    """DELETE /v1/customers/{id}."""
    cid = call.ids[0]
    _existing(store, cid)
    del store.customers[cid]
    store.deleted_customers.add(cid)
    return Outcome.ok({"id": cid, "object": "customer", "deleted": True}, wrote=True)


def list_all(store: Store, call: Call) -> Outcome:
    """GET /v1/customers, optionally filtered by `email`."""
    email = call.params.get("email")
    keep = None if email is None else (lambda c: c["email"] == email)
    return Outcome.ok(list_page(store.customers, call.params, "/v1/customers", "customer", keep))
