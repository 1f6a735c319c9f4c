"""The simulated Stripe account: objects in memory, and Stripe-like ids."""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.simulator.call import JsonObject, Params
from proxy.simulator.errors import invalid, invalid_integer

_ALPHABET: Final = string.ascii_letters + string.digits

# Suffix lengths as seen on real ids (cus_NffrFeUfNV2Hib, pi_3MtwBwLkdIwHu7ix28a3tqPa).
_SUFFIX: Final[dict[str, int]] = {"cus": 14, "req": 14, "acct": 16}


@dataclass(slots=True)
class Store:
    """Every object the simulator holds; `clear()` empties it."""

    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.time
    customers: dict[str, JsonObject] = field(default_factory=dict)
    deleted_customers: set[str] = field(default_factory=set)
    payment_intents: dict[str, JsonObject] = field(default_factory=dict)
    refunded: dict[str, int] = field(default_factory=dict)
    refunds: dict[str, JsonObject] = field(default_factory=dict)
    files: dict[str, JsonObject] = field(default_factory=dict)
    file_contents: dict[str, bytes] = field(default_factory=dict)
    balance: dict[str, int] = field(default_factory=dict)
    used_codes: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)
    meter_events: dict[str, JsonObject] = field(default_factory=dict)

    def new_id(self, prefix: str) -> str:
        """A fresh id like `cus_Nffr...`, random suffix of Stripe's usual length."""
        k = _SUFFIX.get(prefix, 24)
        return prefix + "_" + "".join(self.rng.choices(_ALPHABET, k=k))

    def now(self) -> int:
        """Unix seconds, for `created`."""
        return int(self.clock())

    def clear(self) -> None:
        """Forget every object."""
        for name in ("customers", "payment_intents", "refunded", "refunds", "files",
                     "file_contents", "balance", "meter_events"):
            getattr(self, name).clear()
        self.deleted_customers.clear()
        self.used_codes.clear()
        self.refresh_tokens.clear()


def list_page(objects: dict[str, JsonObject], params: Params, url: str, noun: str,
              keep: Callable[[JsonObject], bool] | None = None) -> JsonObject:
    """A Stripe list, newest first, honouring `limit` and `starting_after`."""
    limit = _limit(params)
    after = params.get("starting_after")
    if after is not None and after not in objects:
        raise invalid(f"No such {noun}: '{after}'", code="resource_missing",
                      param="starting_after")
    newest_first: Iterable[JsonObject] = reversed(objects.values())
    data: list[JsonObject] = []
    skipping = after is not None
    has_more = False
    for obj in newest_first:
        if skipping:
            skipping = obj["id"] != after
            continue
        if keep is not None and not keep(obj):
            continue
        if len(data) == limit:
            has_more = True
            break
        data.append(obj)
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def _limit(params: Params) -> int:
    value: Any = params.get("limit")
    if value is None or value == "":
        return 10
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise invalid_integer("limit", value) from None
    if not 1 <= limit <= 100:
        raise invalid("This value must be between 1 and 100.", param="limit")
    return limit
