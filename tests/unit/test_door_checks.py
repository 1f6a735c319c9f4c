"""The door's checks as pure functions: versions, targets, path tricks and framing, no sockets."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from proxy import door
from proxy.replies import error_response, reason_phrase

OPERATOR = frozenset({"/health", "/ready", "/metrics"})


def code(refusal: door.Refusal | None) -> tuple[int, str] | None:
    """The (status, code) of a refusal, or None."""
    return None if refusal is None else (refusal.status, refusal.code)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_http_1x_is_accepted(version: str) -> None:
    """HTTP/1.1 and HTTP/1.0 pass."""
    assert door.check_version(version) is None


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2", "3.0", "2.1"])
def test_other_versions_get_505(version: str) -> None:
    """Any other version (and no version, reported as 0.9) is refused with 505, never forwarded."""
    assert code(door.check_version(version)) == (505, "http_version_not_supported")


def test_no_version_says_so() -> None:
    """A request line without a version is named as such in the message."""
    refusal = door.check_version("0.9")
    assert refusal is not None and "no HTTP version" in refusal.message


def test_request_path_drops_the_query() -> None:
    """The path is the target before '?', as text."""
    assert door.request_path(b"/v1/customers?limit=3&x=/../") == "/v1/customers"
    assert door.request_path(b"/v1/customers") == "/v1/customers"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/customers",
        "/v1/customers/cus_123",
        "/v2/core/events",
        "/oauth/token",
        "/health",
        "/v1/files/file_1/contents",
        "/v1/customers/cus%5F1",  # a harmless escape
        "/v1/customers/cus_1.json",  # a dot inside a segment
        "/v1/prices/search",
        "/v1/customers/caf%C3%A9",  # valid UTF-8
    ],
)
def test_stripe_paths_pass(path: str) -> None:
    """Stripe API and operator paths without tricks are accepted."""
    assert door.check_target("GET", path, OPERATOR) is None


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("CONNECT", "evil.example:443", (405, "method_not_allowed")),
        ("CONNECT", "/v1/customers", (405, "method_not_allowed")),
        ("GET", "http://evil.example/v1/customers", (400, "absolute_target_refused")),
        ("GET", "*", (400, "absolute_target_refused")),
        ("GET", "/admin", (404, "not_a_stripe_path")),
        ("GET", "/", (404, "not_a_stripe_path")),
        ("GET", "/v1", (404, "not_a_stripe_path")),
        ("GET", "/v3/customers", (404, "not_a_stripe_path")),
        ("GET", "/healthz", (404, "not_a_stripe_path")),
    ],
)
def test_targets_outside_the_allowlist_are_refused(method: str, path: str, expected: tuple[int, str]) -> None:
    """CONNECT, absolute targets and non-Stripe paths are refused with their own status."""
    assert code(door.check_target(method, path, OPERATOR)) == expected


UNSAFE = [
    "/v1/../admin",
    "/v1/./customers",
    "/v1/customers/..",
    "/v1/customers/.",
    "/v1/%2e%2e/admin",
    "/v1/%2E%2e/admin",
    "/v1/.%2e/admin",
    "/v1/%2e./admin",
    "/v1/%2e/customers",
    "/v1/..;/admin",
    "/v1/..;jsessionid=1/admin",
    "/v1/.;/customers",
    "/v1/%2e%2e;/admin",
    "/v1/..%3b/admin",
    "/v1/customers/%2f..%2fadmin",
    "/v1/customers%2Fadmin",
    "/v1/customers%5c..%5cadmin",
    "/v1/customers\\..\\admin",
    "/v1/customers/%00",
    "/v1/%c0%ae%c0%ae/admin",
    "/v1/%C0%AE/customers",
    "/v1/customers%c0%afadmin",
    "/v1/%e0%80%ae%e0%80%ae/admin",
    "/v1/%e0%80%af",
    "/v1/%f0%80%80%ae",
    "/v1/%c1%9c",
    "/v1/%252e%252e/admin",
    "/v1/%252f",
    "/v1/%25252e%25252e/admin",
    "/v1/%u002e%u002e/admin",
    "/v1/%U002F",
    "/v1/.. /admin",
    "/v1/.../admin",
    "/v1/customers/\x7f",
    "/v1/customers/\x00",
    "/v1/\xc0\xae\xc0\xae/admin",  # raw overlong bytes, as llhttp hands them over (latin-1)
]


def _shown(path: str) -> str:
    """A test id without backslashes (mutmut selects tests by node id, which cannot hold them)."""
    return "".join(c if c.isascii() and c.isprintable() and c != "\\" else f"<{ord(c):02x}>" for c in path)


@pytest.mark.parametrize("path", UNSAFE, ids=[_shown(p) for p in UNSAFE])
def test_path_tricks_are_refused(path: str) -> None:
    """Dot segments in every spelling, encoded separators, overlong UTF-8 and controls get 400."""
    assert door.is_unsafe_path(path)
    assert code(door.check_target("GET", path, OPERATOR)) == (400, "unsafe_path")


@pytest.mark.parametrize(
    ("value", "seen", "refused"),
    [
        (b"12", None, False),
        (b"0", None, False),
        (b"12", 12, True),  # a second Content-Length, even an equal one
        (b"+3", None, True),
        (b"-1", None, True),
        (b"3 ", None, True),
        (b"0x10", None, True),
        (b"", None, True),
        (b"1,1", None, True),
    ],
)
def test_content_length_must_be_one_number(value: bytes, seen: int | None, refused: bool) -> None:
    """Only one Content-Length made of digits is accepted."""
    refusal = door.check_content_length(value, seen)
    assert (refusal is not None) is refused
    if refusal is not None:
        assert code(refusal) == (400, "ambiguous_framing")


@pytest.mark.parametrize(
    ("value", "already", "refused"),
    [
        (b"chunked", False, False),
        (b"Chunked ", False, False),
        (b"chunked", True, True),
        (b"gzip, chunked", False, True),
        (b"identity", False, True),
        (b"chunked, chunked", False, True),
        (b"", False, True),
    ],
)
def test_transfer_encoding_must_be_one_chunked(value: bytes, already: bool, refused: bool) -> None:
    """Only a single 'chunked' Transfer-Encoding is accepted."""
    refusal = door.check_transfer_encoding(value, already)
    assert (refusal is not None) is refused
    if refusal is not None:
        assert code(refusal) == (400, "ambiguous_framing")


def test_framing_refuses_length_and_chunked_together() -> None:
    """Content-Length together with chunked is ambiguous: refused."""
    assert code(door.check_framing(True, 3, 1000)) == (400, "ambiguous_framing")


def test_framing_refuses_a_declared_length_over_the_limit() -> None:
    """A declared body over the limit gets 413 before it is read; at the limit it passes."""
    assert code(door.check_framing(False, 1001, 1000)) == (413, "body_too_large")
    assert door.check_framing(False, 1000, 1000) is None
    assert door.check_framing(True, None, 1000) is None
    assert door.check_framing(False, None, 1000) is None


def test_error_response_is_framed_once_with_the_standard_reason() -> None:
    """A refusal renders as one complete HTTP/1.1 answer with a Stripe-shaped body and its length."""
    raw = error_response(505, "http_version_not_supported", "no", type_="invalid_request_error", close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 505 HTTP Version Not Supported"
    assert b"Connection: close" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert json.loads(body) == {
        "error": {"type": "invalid_request_error", "code": "sidecar_http_version_not_supported", "message": "no"}
    }


def test_reason_phrases_come_from_http_status() -> None:
    """Reason phrases are the standard ones, with a neutral word for unregistered codes."""
    assert reason_phrase(408) == b"Request Timeout"
    assert reason_phrase(431) == b"Request Header Fields Too Large"
    assert reason_phrase(599) == b"Error"


def test_refusals_carry_their_exact_messages() -> None:
    """Each refusal's message (what the client reads in the Stripe-shaped error) is exactly this."""
    assert door.check_version("2.0") == door.Refusal(
        505,
        "http_version_not_supported",
        "The request line has HTTP/2.0; the sidecar speaks HTTP/1.1 (and HTTP/1.0).",
    )
    assert door.check_version("0.9") == door.Refusal(
        505,
        "http_version_not_supported",
        "The request line has no HTTP version (HTTP/0.9); the sidecar speaks HTTP/1.1 (and HTTP/1.0).",
    )
    assert door.check_target("CONNECT", "evil.example:443", OPERATOR) == door.Refusal(
        405, "method_not_allowed", "CONNECT is not supported: this is not an open proxy."
    )
    assert door.check_target("GET", "http://evil.example/", OPERATOR) == door.Refusal(
        400,
        "absolute_target_refused",
        "Only origin-form request targets (/v1/...) are accepted: this is not an open proxy.",
    )
    assert door.check_target("POST", "/admin", OPERATOR) == door.Refusal(
        404,
        "not_a_stripe_path",
        "Unrecognized request URL (POST: /admin). The sidecar forwards only Stripe API paths "
        "(/v1/, /v2/, /oauth/).",
    )
    assert door.check_target("GET", "/v1/../admin", OPERATOR) == door.Refusal(
        400,
        "unsafe_path",
        "The request path contains dot segments (plain, percent-encoded or overlong), "
        "encoded slashes, backslashes or control characters, which are refused.",
    )


@pytest.mark.parametrize(
    ("check", "what"),
    [
        (lambda: door.check_content_length(b"3", 3), "more than one Content-Length"),
        (lambda: door.check_content_length(b"x", None), "a Content-Length that is not a number"),
        (lambda: door.check_transfer_encoding(b"gzip", False), "a Transfer-Encoding other than one 'chunked'"),
        (lambda: door.check_framing(True, 3, 1000), "both Content-Length and Transfer-Encoding"),
    ],
)
def test_framing_refusals_name_what_was_ambiguous(check: Callable[[], door.Refusal | None], what: str) -> None:
    """An ambiguous-framing refusal says exactly which header problem it saw."""
    assert check() == door.Refusal(
        400, "ambiguous_framing", f"The request has {what}; refused because its framing is ambiguous."
    )


def test_body_too_large_names_the_length_and_the_limit() -> None:
    """A 413 tells the client its declared length and the sidecar's limit."""
    assert door.check_framing(False, 1001, 1000) == door.Refusal(
        413, "body_too_large", "The request body (1001 bytes) exceeds the sidecar's limit of 1000 bytes."
    )


def test_not_a_stripe_path_shows_the_path_escaped_and_cut_at_200() -> None:
    """The 404 message shows the path as ASCII (escapes for the rest) and at most 200 characters."""
    refusal = door.check_target("GET", "/caf\xe9", OPERATOR)
    assert refusal is not None and "(GET: /caf\\xe9)." in refusal.message
    long = "/x" + "y" * 300
    refusal = door.check_target("GET", long, OPERATOR)
    assert refusal is not None and f"(GET: {long[:200]})." in refusal.message


def test_request_path_stops_at_the_first_question_mark() -> None:
    """A '?' inside the query does not make more of the target the path."""
    assert door.request_path(b"/v1/customers?q=a?b") == "/v1/customers"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/customers\\admin",  # a backslash without any dot or escape
        "/v1/..;a;b/admin",  # more than one path parameter after a dot segment
        "/v1/%01../admin",  # a dot segment padded with an encoded control character
        "/v1/..%0b/admin",
    ],
)
def test_more_path_tricks_are_refused(path: str) -> None:
    """Backslashes alone, several ';' parameters and control-character padding still get 400."""
    assert code(door.check_target("GET", path, OPERATOR)) == (400, "unsafe_path")


@pytest.mark.parametrize("path", ["/v1/customers/X..", "/v1/customers/.X.", "/v1/files/X.X"])
def test_segments_with_dots_and_other_characters_pass(path: str) -> None:
    """A segment of dots and letters is a name, not a dot segment."""
    assert door.check_target("GET", path, OPERATOR) is None


_TARGETS = [
    *UNSAFE,
    "/v1/customers",
    "/v1/customers/cus_123?expand[]=x&q=/../",
    "/v2/core/events",
    "/oauth/token",
    "/health",
    "/healthz",
    "/admin",
    "/",
    "*",
    "/v1",
    "http://evil.example/v1/customers",
    "evil.example:443",
    "/v1/customers/cus%5F1",
    "/v1/customers/caf\xe9",
    "/v1/customers/X..",
]
_FRAMINGS = [(False, None), (False, 0), (False, 10), (False, 11), (True, None), (True, 3)]


@pytest.mark.parametrize("method", ["GET", "POST", "CONNECT"])
@pytest.mark.parametrize("target", _TARGETS, ids=[_shown(t) for t in _TARGETS])
def test_check_request_decides_as_the_checks_it_folds(method: str, target: str) -> None:
    """check_request's answer (its common case included) is request_path's path and the refusal
    of check_target, else of check_framing, for every path trick and framing."""
    raw = target.encode("latin-1")
    for chunked, length in _FRAMINGS:
        path = door.request_path(raw)
        expected = door.check_target(method, path, OPERATOR) or door.check_framing(chunked, length, 10)
        assert door.check_request(method, raw, OPERATOR, chunked, length, 10) == (path, expected)
