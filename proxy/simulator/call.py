"""What an endpoint gets (`Call`) and gives back (`Outcome`).

The contract that makes idempotency honest: an endpoint that *raises* `ApiError` failed
validation and changed nothing (nothing is saved under the idempotency key); one that
*returns* an `Outcome` executed, whatever its status, and its answer is saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from proxy.simulator.errors import ApiError, invalid, invalid_integer, parameter_missing

Params = dict[str, Any]
JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """One parsed API request, as an endpoint sees it."""

    ids: tuple[str, ...]
    params: Params
    livemode: bool
    base_url: str
    request_id: str
    account: str = "acct_simulator"  # the account the request's key belongs to


@dataclass(frozen=True, slots=True)
class Outcome:
    """An executed endpoint's answer; `wrote` says whether it had a side effect."""

    status: int
    body: JsonObject | bytes
    wrote: bool = False
    content_type: str = "application/json"

    @classmethod
    def ok(cls, body: JsonObject, *, wrote: bool = False) -> Outcome:
        """A 200 with a JSON object."""
        return cls(200, body, wrote)

    @classmethod
    def failed(cls, err: ApiError, *, wrote: bool = False) -> Outcome:
        """An error that happened after execution began, so it is saved and replayed."""
        return cls(err.status, err.body, wrote)


def required(params: Params, name: str) -> Any:
    """The value of a required parameter (400 parameter_missing when absent or empty)."""
    value = params.get(name)
    if value is None or value == "":
        raise parameter_missing(name)
    return value


def integer(params: Params, name: str, *, minimum: int | None = None) -> int | None:
    """An optional integer parameter, sent as a form string or a JSON number."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise invalid_integer(name, value)
    try:
        number = int(value)
    except ValueError:
        raise invalid_integer(name, value) from None
    if minimum is not None and number < minimum:
        raise invalid(f"This value must be greater than or equal to {minimum}.",
                      code="parameter_invalid_integer", param=name)
    return number


def boolean(params: Params, name: str) -> bool:
    """An optional boolean parameter (`true`/`false` in forms)."""
    value = params.get(name)
    if value is None or value == "" or value is False or value == "false":
        return False
    if value is True or value == "true":
        return True
    raise invalid(f"Invalid boolean: {value}", param=name)


# `metadata=""` (Stripe's "unset everything"); recognised by identity, not by value.
CLEAR_METADATA: Final[dict[str, str]] = {}


def metadata_update(params: Params) -> dict[str, str] | None:
    """Validated `metadata` param: a dict of strings ("" deletes a key), or None if absent."""
    value = params.get("metadata")
    if value is None:
        return None
    if value == "":
        return CLEAR_METADATA
    if not isinstance(value, dict):
        raise invalid("Invalid object", param="metadata")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise invalid("Invalid metadata value: must be a string", param=f"metadata[{k}]")
        out[str(k)] = str(v)
    return out


def apply_metadata(target: dict[str, str], update: dict[str, str] | None) -> None:
    """Merge a `metadata_update` into an object's metadata, Stripe-style."""
    if update is None:
        return
    if update is CLEAR_METADATA:
        target.clear()
        return
    for k, v in update.items():
        if v == "":
            target.pop(k, None)
        else:
            target[k] = v


def ref_of(params: Params) -> str | None:
    """The client's `metadata[ref]` tag of a logical write, if any."""
    meta = params.get("metadata")
    if isinstance(meta, dict):
        ref = meta.get("ref")
        if isinstance(ref, str | int) and ref != "":
            return str(ref)
    return None
