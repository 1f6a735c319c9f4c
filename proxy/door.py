"""The door's checks: pure functions over a request's version, method, target and framing headers.

Each check returns a :class:`Refusal` (status, ``sidecar_`` code without its prefix, message) or
None. No I/O and no state: ``proxy.server`` calls them while parsing and renders a refusal with
:func:`proxy.replies.error_response`; the request is then never forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = [
    "API_PREFIXES",
    "Refusal",
    "check_content_length",
    "check_framing",
    "check_request",
    "check_target",
    "check_transfer_encoding",
    "check_version",
    "is_unsafe_path",
    "request_path",
]

API_PREFIXES = ("/v1/", "/v2/", "/oauth/")
# IIS-style %uXXXX escapes: a server that decodes them could turn %u002e into a dot.
_PERCENT_U = re.compile(rb"%u[0-9a-f]{4}", re.IGNORECASE)
# How many rounds of percent-decoding are inspected: a backend that decodes twice (%252e) is
# covered; a target still changing after that is refused outright.
_DECODE_ROUNDS = 3
# Padding around a segment that some servers trim (Java's String.trim() drops every byte up to
# and including space): "%0b.." must not hide a "..".
_PADDING = bytes(range(0x21))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused at the door: status, code (``sidecar_`` is added) and message."""

    status: int
    code: str
    message: str


def check_version(version: str) -> Refusal | None:
    """HTTP/1.1 and HTTP/1.0 only: anything else (HTTP/2.0 over plain text, 0.9) gets a 505.

    httptools reports a request line with no version at all as ``"0.9"``.
    """
    if version == "1.1" or version == "1.0":
        return None
    shown = "no HTTP version (HTTP/0.9)" if version == "0.9" else f"HTTP/{version}"
    return Refusal(
        505,
        "http_version_not_supported",
        f"The request line has {shown}; the sidecar speaks HTTP/1.1 (and HTTP/1.0).",
    )


def request_path(target: bytes) -> str:
    """The path part of a request target (before ``?``), as text."""
    return target.split(b"?", 1)[0].decode("latin-1")


def check_target(method: str, path: str, operator_paths: Container[str]) -> Refusal | None:
    """No CONNECT, origin-form targets only, Stripe's API prefixes or an operator path, no tricks.

    ``path`` is :func:`request_path` of the target: an absolute target (``http://...``) does not
    start with ``/``.
    """
    if method == "CONNECT":
        return Refusal(
            405, "method_not_allowed", "CONNECT is not supported: this is not an open proxy."
        )
    if not path.startswith("/"):
        return Refusal(
            400,
            "absolute_target_refused",
            "Only origin-form request targets (/v1/...) are accepted: this is not an open proxy.",
        )
    if not path.startswith(API_PREFIXES) and path not in operator_paths:
        return Refusal(
            404,
            "not_a_stripe_path",
            f"Unrecognized request URL ({method}: {_printable(path)}). The sidecar forwards only "
            "Stripe API paths (/v1/, /v2/, /oauth/).",
        )
    if is_unsafe_path(path):
        return Refusal(
            400,
            "unsafe_path",
            "The request path contains dot segments (plain, percent-encoded or overlong), "
            "encoded slashes, backslashes or control characters, which are refused.",
        )
    return None


def check_request(
    method: str,
    target: bytes,
    operator_paths: Container[str],
    chunked: bool,
    content_length: int | None,
    max_body: int,
) -> tuple[str, Refusal | None]:
    """:func:`request_path` of ``target``, and :func:`check_target` or :func:`check_framing`.

    One call for what every request goes through: a plain Stripe API path (printable ASCII, no
    ``.``, ``%`` or ``\\``, so nothing :func:`is_unsafe_path` would decode) with unambiguous
    framing within ``max_body`` is let through here; anything else takes the full checks.
    """
    path = target.partition(b"?")[0].decode("latin-1")
    if (
        path.startswith(API_PREFIXES)
        and path.isascii()
        and path.isprintable()
        and "." not in path
        and "%" not in path
        and "\\" not in path
        and method != "CONNECT"
        and (content_length is None or (not chunked and content_length <= max_body))
    ):
        return path, None
    return path, (
        check_target(method, path, operator_paths)
        or check_framing(chunked, content_length, max_body)
    )


def is_unsafe_path(path: str) -> bool:
    """Whether a server behind Stripe's edge could normalise ``path`` into another path.

    Refused: control characters; backslashes; dot segments (``.``/``..``, also with ``;params``
    as in ``..;``), raw or percent-encoded up to double encoding; encoded slashes, backslashes
    and NUL; invalid UTF-8 after decoding (overlong forms of dot and slash such as ``%c0%ae``,
    ``%e0%80%ae``); ``%uXXXX`` escapes.
    """
    if not path.isprintable():
        return True
    if path.isascii() and "." not in path and "%" not in path and "\\" not in path:
        return False  # the common case: nothing that could be decoded or normalised
    raw = path.encode("latin-1")
    for _ in range(_DECODE_ROUNDS):
        if b"\\" in raw or b"\x00" in raw or _has_dot_segment(raw):
            return True
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return True  # overlong or otherwise invalid encodings of '.', '/' and friends
        if b"%" not in raw:
            return False
        decoded = unquote_to_bytes(raw)
        if decoded == raw:
            return _PERCENT_U.search(raw) is not None
        if decoded.count(b"/") != raw.count(b"/"):
            return True  # an encoded slash
        raw = decoded
    return True


def _has_dot_segment(raw: bytes) -> bool:
    if b"." not in raw:
        return False
    for segment in raw.split(b"/"):
        # Path parameters (Tomcat's "..;jsessionid") and padding do not hide a dot segment.
        bare = segment.split(b";", 1)[0].strip(_PADDING)
        if bare and not bare.strip(b"."):
            return True
    return False


def check_content_length(value: bytes, seen: int | None) -> Refusal | None:
    """One Content-Length of plain digits (a second one, even equal, is refused)."""
    if seen is not None:
        return _ambiguous("more than one Content-Length")
    if not value.isdigit():
        return _ambiguous("a Content-Length that is not a number")
    return None


def check_transfer_encoding(value: bytes, chunked_already: bool) -> Refusal | None:
    """Exactly one Transfer-Encoding, and it is ``chunked``."""
    if chunked_already or value.strip().lower() != b"chunked":
        return _ambiguous("a Transfer-Encoding other than one 'chunked'")
    return None


def check_framing(chunked: bool, content_length: int | None, max_body: int) -> Refusal | None:
    """Not both Content-Length and chunked; a declared length within ``max_body``."""
    if chunked and content_length is not None:
        return _ambiguous("both Content-Length and Transfer-Encoding")
    if content_length is not None and content_length > max_body:
        return Refusal(
            413,
            "body_too_large",
            f"The request body ({content_length} bytes) exceeds the sidecar's limit of "
            f"{max_body} bytes.",
        )
    return None


def _ambiguous(what: str) -> Refusal:
    return Refusal(
        400,
        "ambiguous_framing",
        f"The request has {what}; refused because its framing is ambiguous.",
    )


def _printable(path: str) -> str:
    return path[:200].encode("ascii", "backslashreplace").decode("ascii")
