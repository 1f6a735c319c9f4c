"""PaymentIntents, refunds and the balance they move.

Test payment methods follow Stripe's: `pm_card_visa` (and any other `pm_...`) succeeds,
`pm_card_chargeDeclined*` declines with a 402 card_error carrying the PaymentIntent.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.simulator.call import (
    Call,
    JsonObject,
    Outcome,
    apply_metadata,
    boolean,
    integer,
    metadata_update,
    required,
)
from proxy.simulator.errors import ApiError, error, invalid, request_log_url, resource_missing
from proxy.simulator.store import Store, list_page

# decline_code and message per declining test payment method.
DECLINES: Final[dict[str, tuple[str, str]]] = {
    "pm_card_chargeDeclined": ("generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": ("insufficient_funds",
                                                "Your card has insufficient funds."),
    "pm_card_chargeDeclinedLostCard": ("lost_card", "Your card was declined."),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "Your card has expired."),
}
_CAPTURE_METHODS: Final = frozenset({"automatic", "automatic_async", "manual"})
_SETTABLE: Final = frozenset({"description", "receipt_email", "statement_descriptor",
                              "setup_future_usage", "shipping"})


def _payment_method(store: Store, call: Call) -> str | None:
    pm = call.params.get("payment_method")
    if pm in (None, ""):
        return None
    if not isinstance(pm, str) or not pm.startswith("pm_"):
        raise resource_missing("PaymentMethod", str(pm), param="payment_method")
    return pm


def _currency(call: Call, *, needed: bool) -> str | None:
    cur = required(call.params, "currency") if needed else call.params.get("currency")
    if cur is None:
        return None
    if not isinstance(cur, str) or len(cur) != 3 or not cur.isalpha():
        raise invalid(f"Invalid currency: {cur}.", param="currency")
    return cur.lower()


def _customer(store: Store, call: Call) -> str | None:
    cus = call.params.get("customer")
    if cus in (None, ""):
        return None
    if cus not in store.customers:
        raise resource_missing("customer", str(cus), param="customer")
    return str(cus)


def _capture_method(call: Call) -> str | None:
    method = call.params.get("capture_method")
    if method is not None and method not in _CAPTURE_METHODS:
        raise invalid(f"Invalid capture_method: {method}", param="capture_method")
    return method


def _existing(store: Store, pid: str, param: str = "id") -> JsonObject:
    obj = store.payment_intents.get(pid)
    if obj is None:
        raise resource_missing("payment_intent", pid, param=param)
    return obj


def create(store: Store, call: Call) -> Outcome:
    """POST /v1/payment_intents (amount and currency required; `confirm=true` charges)."""
    p = call.params
    amount = integer(p, "amount", minimum=1)
    if amount is None:
        required(p, "amount")
    currency = _currency(call, needed=True)
    pm = _payment_method(store, call)
    customer = _customer(store, call)
    capture_method = _capture_method(call) or "automatic_async"
    confirm = boolean(p, "confirm")
    meta = metadata_update(p)
    if confirm and pm is None:
        raise _missing_payment_method()
    pid = store.new_id("pi")
    obj: JsonObject = {
        "id": pid,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": 0,
        "application": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": capture_method,
        "client_secret": f"{pid}_secret_{store.new_id('s')[2:]}",
        "confirmation_method": "automatic",
        "created": store.now(),
        "currency": currency,
        "customer": customer,
        "description": None,
        "last_payment_error": None,
        "latest_charge": None,
        "livemode": call.livemode,
        "metadata": {},
        "payment_method": pm,
        "payment_method_types": ["card"],
        "receipt_email": None,
        "status": "requires_confirmation" if pm else "requires_payment_method",
    }
    obj.update({k: v for k, v in p.items() if k in _SETTABLE})
    apply_metadata(obj["metadata"], meta)
    store.payment_intents[pid] = obj
    if confirm and pm is not None:
        return _charge(store, call, obj, pm)
    return Outcome.ok(obj, wrote=True)


def retrieve(store: Store, call: Call) -> Outcome:
    """GET /v1/payment_intents/{id}."""
    return Outcome.ok(_existing(store, call.ids[0]))


def update(store: Store, call: Call) -> Outcome:
    """POST /v1/payment_intents/{id}."""
    obj = _existing(store, call.ids[0])
    p = call.params
    amount = integer(p, "amount", minimum=1)
    currency = _currency(call, needed=False)
    pm = _payment_method(store, call)
    customer = _customer(store, call)
    capture_method = _capture_method(call)
    meta = metadata_update(p)
    if obj["status"] in ("succeeded", "canceled", "processing") and (amount or currency or pm):
        return Outcome.failed(_unexpected_state(obj, "updated"))
    if amount is not None:
        obj["amount"] = amount
    if currency is not None:
        obj["currency"] = currency
    if customer is not None:
        obj["customer"] = customer
    if capture_method is not None:
        obj["capture_method"] = capture_method
    if pm is not None:
        obj["payment_method"] = pm
        if obj["status"] == "requires_payment_method":
            obj["status"] = "requires_confirmation"
    obj.update({k: v for k, v in p.items() if k in _SETTABLE})
    apply_metadata(obj["metadata"], meta)
    return Outcome.ok(obj, wrote=True)


def confirm(store: Store, call: Call) -> Outcome:
    """POST /v1/payment_intents/{id}/confirm."""
    obj = _existing(store, call.ids[0])
    pm = _payment_method(store, call) or obj["payment_method"]
    meta = metadata_update(call.params)
    if obj["status"] not in ("requires_payment_method", "requires_confirmation",
                             "requires_action"):
        return Outcome.failed(_unexpected_state(obj, "confirmed"))
    if pm is None:
        return Outcome.failed(_missing_payment_method())
    apply_metadata(obj["metadata"], meta)
    return _charge(store, call, obj, pm)


def capture(store: Store, call: Call) -> Outcome:
    """POST /v1/payment_intents/{id}/capture."""
    obj = _existing(store, call.ids[0])
    amount = integer(call.params, "amount_to_capture", minimum=1)
    meta = metadata_update(call.params)
    if obj["status"] != "requires_capture":
        return Outcome.failed(invalid(
            f"This PaymentIntent could not be captured because it has a status of "
            f"{obj['status']}. Only a PaymentIntent with one of the following statuses may be "
            "captured: requires_capture.",
            code="payment_intent_unexpected_state"))
    received = obj["amount"] if amount is None else min(amount, obj["amount"])
    obj.update(status="succeeded", amount_capturable=0, amount_received=received)
    store.balance[obj["currency"]] = store.balance.get(obj["currency"], 0) + received
    apply_metadata(obj["metadata"], meta)
    return Outcome.ok(obj, wrote=True)


def list_all(store: Store, call: Call) -> Outcome:
    """GET /v1/payment_intents, optionally filtered by `customer`."""
    cus = call.params.get("customer")
    keep = None if cus is None else (lambda pi: pi["customer"] == cus)
    return Outcome.ok(list_page(store.payment_intents, call.params, "/v1/payment_intents",
                                "payment_intent", keep))


def _charge(store: Store, call: Call, obj: JsonObject, pm: str) -> Outcome:
    """Run the payment on `pm`: success, manual-capture hold, or a 402 decline."""
    charge = store.new_id("ch")
    obj["latest_charge"] = charge
    decline = DECLINES.get(pm)
    if decline is not None:
        decline_code, message = decline
        pm_obj = _pm_object(store, pm, call.livemode)
        last_error: dict[str, Any] = {
            "charge": charge,
            "code": "card_declined",
            "decline_code": decline_code,
            "doc_url": "https://stripe.com/docs/error-codes/card-declined",
            "message": message,
            "payment_method": pm_obj,
            "type": "card_error",
        }
        obj.update(status="requires_payment_method", payment_method=None,
                   last_payment_error=last_error)
        err = error(402, "card_error", message, code="card_declined",
                    decline_code=decline_code, charge=charge, payment_intent=obj,
                    payment_method=pm_obj,
                    request_log_url=request_log_url(call.request_id, store.now(),
                                                    livemode=call.livemode))
        return Outcome.failed(err, wrote=True)
    obj.update(payment_method=pm, last_payment_error=None)
    if obj["capture_method"] == "manual":
        obj.update(status="requires_capture", amount_capturable=obj["amount"])
    else:
        obj.update(status="succeeded", amount_received=obj["amount"])
        store.balance[obj["currency"]] = store.balance.get(obj["currency"], 0) + obj["amount"]
    return Outcome.ok(obj, wrote=True)


def _pm_object(store: Store, pm: str, livemode: bool) -> JsonObject:
    return {
        "id": store.new_id("pm"),
        "object": "payment_method",
        "type": "card",
        "card": {"brand": "visa", "country": "US", "exp_month": 12, "exp_year": 2034,
                 "funding": "credit", "last4": "0002"},
        "created": store.now(),
        "customer": None,
        "livemode": livemode,
        "metadata": {},
    }


def _missing_payment_method() -> ApiError:
    return invalid(
        "You cannot confirm this PaymentIntent because it's missing a payment method. To "
        "confirm the PaymentIntent with a payment method, provide the payment_method parameter.",
        code="payment_intent_unexpected_state")


def _unexpected_state(obj: JsonObject, verb: str) -> ApiError:
    return invalid(
        f"This PaymentIntent's status is {obj['status']}, so it cannot be {verb}.",
        code="payment_intent_unexpected_state")


def refund(store: Store, call: Call) -> Outcome:
    """POST /v1/refunds (payment_intent required; amount defaults to what is left)."""
    p = call.params
    pid = required(p, "payment_intent")
    pi = _existing(store, str(pid), param="payment_intent")
    amount = integer(p, "amount", minimum=1)
    meta = metadata_update(p)
    if pi["status"] != "succeeded":
        return Outcome.failed(invalid(
            f"This PaymentIntent ({pid}) does not have a successful charge to refund.",
            code="charge_not_refundable", param="payment_intent"))
    left = pi["amount_received"] - store.refunded.get(pi["id"], 0)
    if left <= 0:
        return Outcome.failed(invalid(f"Charge {pi['latest_charge']} has already been refunded.",
                                      code="charge_already_refunded"))
    if amount is None:
        amount = left
    elif amount > left:
        return Outcome.failed(invalid(
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left}).",
            code="amount_too_large", param="amount"))
    store.refunded[pi["id"]] = store.refunded.get(pi["id"], 0) + amount
    store.balance[pi["currency"]] = store.balance.get(pi["currency"], 0) - amount
    rid = store.new_id("re")
    obj: JsonObject = {
        "id": rid,
        "object": "refund",
        "amount": amount,
        "balance_transaction": store.new_id("txn"),
        "charge": pi["latest_charge"],
        "created": store.now(),
        "currency": pi["currency"],
        "metadata": {},
        "payment_intent": pi["id"],
        "reason": p.get("reason"),
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": "succeeded",
        "transfer_reversal": None,
    }
    apply_metadata(obj["metadata"], meta)
    store.refunds[rid] = obj
    return Outcome.ok(obj, wrote=True)


def balance(store: Store, call: Call) -> Outcome:
    """GET /v1/balance: what succeeded payments minus refunds left, per currency."""
    amounts = store.balance or {"usd": 0}
    return Outcome.ok({
        "object": "balance",
        "available": [{"amount": amount, "currency": cur, "source_types": {"card": amount}}
                      for cur, amount in sorted(amounts.items())],
        "livemode": call.livemode,
        "pending": [{"amount": 0, "currency": cur, "source_types": {"card": 0}}
                    for cur in sorted(amounts)],
    })
