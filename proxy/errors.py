"""The sidecar's exception tree and its Stripe-shaped error answers.

Exceptions::

    SidecarError                 base of everything the sidecar raises on purpose
    ├── ConfigError              bad configuration; lists every problem with its key path
    ├── ClientGone               the client went away before sending its whole request body
    └── UpstreamError            an attempt to reach Stripe failed (kind: TransportError);
                                 ``caused_by_client`` when the client's body was the trouble

Errors the sidecar answers itself are rendered by :func:`error_body` in Stripe's shape,
``{"error": {"type": ..., "code": "sidecar_...", "message": ...}}``, so every SDK raises a
clean, readable exception instead of a parse failure.
"""

from __future__ import annotations

import json

from proxy.classify import TransportError
from proxy.log import redact

__all__ = ["ClientGone", "ConfigError", "SidecarError", "UpstreamError", "error_body"]


class SidecarError(Exception):
    """Base class of the sidecar's own exceptions."""


class ConfigError(SidecarError):
    """A configuration was rejected; ``problems`` lists each problem with its key path."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class ClientGone(SidecarError):
    """The client disconnected (or its body broke off) while its body was being forwarded."""


class UpstreamError(SidecarError):
    """One attempt to reach the upstream failed before a complete answer arrived."""

    def __init__(
        self,
        kind: TransportError,
        message: str,
        *,
        response_started: bool = False,
        caused_by_client: bool = False,
        step: str | None = None,
    ):
        self.kind = kind
        self.step = step  # for CONNECT: the step that failed, "dns", "connect" or "tls"
        self.response_started = response_started
        # The client stalled or vanished mid-body: not Stripe's fault, so no breaker counts it.
        self.caused_by_client = caused_by_client
        super().__init__(message)


def error_body(code: str, message: str, *, type_: str = "api_error") -> bytes:
    """Render a Stripe-shaped error body for an answer the sidecar produces itself.

    The message may quote what the client sent (a path, a parse error): keys in it are masked.
    """
    return json.dumps(
        {"error": {"type": type_, "code": f"sidecar_{code}", "message": redact(message)}},
        separators=(",", ":"),
    ).encode()
