"""GET /v1/account: the simulated account, so `stripe-sidecar doctor` can check a key."""

from __future__ import annotations

from typing import Final

from proxy.simulator.auth import ACCOUNT
from proxy.simulator.call import Call, Outcome
from proxy.simulator.store import Store

ACCOUNT_ID: Final = ACCOUNT


def retrieve(store: Store, call: Call) -> Outcome:
    """The account the key belongs to (the simulator's own unless a test set another)."""
    return Outcome.ok({
        "id": call.account,
        "object": "account",
        "business_profile": {"name": "Stripe simulator"},
        "charges_enabled": True,
        "country": "US",
        "default_currency": "usd",
        "email": "simulator@example.com",
        "livemode": call.livemode,
        "payouts_enabled": True,
        "settings": {"dashboard": {"display_name": "Stripe simulator"}},
        "type": "standard",
    })
