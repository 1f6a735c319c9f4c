"""Outcome records: what the pipeline tells observers about every attempt and every answer.

The pipeline produces one immutable :class:`AttemptRecord` per send to Stripe and one
:class:`RequestRecord` per client request answered, and hands each to its observers in turn.
Metrics and the access log are observers (``proxy.observers``); diagnosis, tracing and the outbox
subscribe the same way, without touching the pipeline. Records carry labels and Stripe's own
identifiers only, never keys, headers or bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple, Protocol, cast

__all__ = ["AttemptRecord", "Observer", "RequestRecord", "new_attempt", "new_request"]


class AttemptRecord(NamedTuple):
    """One send to Stripe and what it came to."""

    operation: str  # the operation template, e.g. "POST /v1/customers/{customer}"
    attempt: int  # 1 for the first send
    outcome: str  # an Outcome value
    status: int  # the HTTP status; 0 when no answer came (see ``transport``)
    error_code: str | None  # Stripe's error.code, when the answer carried one
    rate_limited_reason: str | None  # Stripe-Rate-Limited-Reason
    request_id: str | None  # Stripe's Request-Id
    transport: str | None  # a TransportError value when no answer came
    duration: float  # seconds, until the answer's head or the failure
    retry_in: float | None  # seconds until the next attempt; None when this one is final
    error_param: str | None = None  # Stripe's error.param (which parameter a 400 was about)
    transport_step: str | None = None  # where a connect failed: "dns", "connect" or "tls"


class RequestRecord(NamedTuple):
    """One client request and the answer it got."""

    operation: str
    method: str
    status: int  # the status the app received
    outcome: str  # an Outcome value, or the sidecar's own reason (circuit_open, ...)
    attempts: int  # sends to Stripe; 0 when the sidecar answered alone
    duration: float  # seconds from the request's head to the end of its answer
    request_id: str | None  # Stripe's Request-Id of the answer passed on
    error_code: str | None  # Stripe's error.code of that answer
    key_injected: bool  # the sidecar added an Idempotency-Key
    give_up: str | None  # a GiveUp value: why the last answer was final
    limiter_wait: float  # seconds spent waiting for a rate token at admission


class Observer(Protocol):
    """Receives records; must be quick and must not raise (it runs on the request path)."""

    def attempt(self, record: AttemptRecord) -> None:
        """One attempt ended."""

    def request(self, record: RequestRecord) -> None:
        """One client request was answered."""


# Build a record from a tuple of all its fields in C (no Python-level ``__new__`` frame): the
# pipeline makes two per request. Every field must be given, in order.
new_attempt = cast(
    "Callable[[tuple[object, ...]], AttemptRecord]", partial(tuple.__new__, AttemptRecord)
)
new_request = cast(
    "Callable[[tuple[object, ...]], RequestRecord]", partial(tuple.__new__, RequestRecord)
)
