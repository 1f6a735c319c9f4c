"""Every answer the sidecar frames itself: reason phrases and Stripe-shaped error answers.

Reason phrases come from :class:`http.HTTPStatus`, resolved once into a table; the error body is
:func:`proxy.errors.error_body` (``{"error": {"type", "code": "sidecar_...", "message"}}``).
"""

from __future__ import annotations

from http import HTTPStatus

from proxy.errors import error_body

__all__ = ["error_response", "reason_phrase"]

_REASONS = {int(s): s.phrase.encode("ascii") for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (``b"Error"`` for an unregistered code)."""
    return _REASONS.get(status, b"Error")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    type_: str = "api_error",
    extra: bytes = b"",
    close: bool = False,
) -> bytes:
    """A complete HTTP/1.1 answer carrying a Stripe-shaped error body."""
    body = error_body(code, message, type_=type_)
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b%b\r\n%b"
        % (status, _REASONS.get(status, b"Error"), len(body), extra, conn, body)
    )
