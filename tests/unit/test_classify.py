"""Classification of Stripe answers and transport failures."""

from __future__ import annotations

import json

import pytest

from proxy import classify
from proxy.classify import (
    Outcome,
    TransportError,
    Verdict,
    classify_response,
    classify_transport_error,
)


def stripe_error(error_type: str, code: str | None = None, **extra: str) -> bytes:
    """A Stripe-shaped error body."""
    error: dict[str, str] = {"type": error_type, "message": "x", **extra}
    if code is not None:
        error["code"] = code
    return json.dumps({"error": error}).encode()


@pytest.fixture(autouse=True)
def empty_verdict_cache() -> None:
    """Each test starts with an empty shared verdict cache, whatever ran before (in this process
    or, under mutation testing, in the parent that forked it)."""
    classify._DETAILED.clear()


HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
INVALID = stripe_error("invalid_request_error", "resource_missing")
API_ERROR = stripe_error("api_error")

# status, Stripe-Should-Retry, Stripe-Rate-Limited-Reason, body -> outcome, retryable, failure
TABLE = [
    pytest.param(200, None, None, None, Outcome.SUCCESS, False, False, id="200"),
    pytest.param(
        201, None, None, b"{not json", Outcome.SUCCESS, False, False, id="201-body-unread"
    ),
    pytest.param(302, None, None, None, Outcome.SUCCESS, False, False, id="302"),
    pytest.param(200, "true", None, None, Outcome.SUCCESS, False, False, id="200-should-retry"),
    pytest.param(400, None, None, INVALID, Outcome.VALIDATION, False, False, id="400"),
    pytest.param(400, None, None, None, Outcome.VALIDATION, False, False, id="400-no-body"),
    pytest.param(
        400,
        None,
        None,
        stripe_error("idempotency_error"),
        Outcome.IDEMPOTENCY_MISMATCH,
        False,
        False,
        id="400-idempotency_error",
    ),
    pytest.param(401, None, None, INVALID, Outcome.AUTHENTICATION, False, False, id="401"),
    pytest.param(
        402,
        None,
        None,
        stripe_error("card_error", "card_declined", decline_code="insufficient_funds"),
        Outcome.CARD_DECLINED,
        False,
        False,
        id="402",
    ),
    pytest.param(
        402, None, None, HTML_502, Outcome.CARD_DECLINED, False, False, id="402-html-body"
    ),
    pytest.param(
        402,
        None,
        None,
        stripe_error("idempotency_error"),
        Outcome.CARD_DECLINED,
        False,
        False,
        id="402-idempotency-body",
    ),
    pytest.param(403, None, None, INVALID, Outcome.PERMISSION, False, False, id="403"),
    pytest.param(404, None, None, INVALID, Outcome.VALIDATION, False, False, id="404"),
    pytest.param(
        409,
        None,
        None,
        stripe_error("idempotency_error", "idempotency_key_in_use"),
        Outcome.IN_FLIGHT_CONFLICT,
        True,
        False,
        id="409-key-in-use",
    ),
    pytest.param(
        409,
        None,
        None,
        stripe_error("invalid_request_error", "lock_timeout"),
        Outcome.IN_FLIGHT_CONFLICT,
        True,
        False,
        id="409-lock",
    ),
    pytest.param(
        429,
        None,
        None,
        stripe_error("invalid_request_error", "lock_timeout"),
        Outcome.LOCK_TIMEOUT,
        True,
        False,
        id="429-lock_timeout",
    ),
    pytest.param(
        429,
        None,
        "endpoint-rate",
        stripe_error("invalid_request_error", "lock_timeout"),
        Outcome.LOCK_TIMEOUT,
        True,
        False,
        id="429-lock_timeout-code-wins",
    ),
    pytest.param(429, None, None, None, Outcome.LOCK_TIMEOUT, True, False, id="429-no-reason"),
    pytest.param(429, None, "", None, Outcome.LOCK_TIMEOUT, True, False, id="429-empty-reason"),
    pytest.param(
        429,
        None,
        "global-rate",
        stripe_error("invalid_request_error", "rate_limit"),
        Outcome.RATE_LIMITED,
        True,
        False,
        id="429-rate-limited",
    ),
    pytest.param(
        429, None, "resource-specific", None, Outcome.RATE_LIMITED, True, False, id="429-resource"
    ),
    pytest.param(500, None, None, API_ERROR, Outcome.SERVER_ERROR, True, True, id="500"),
    pytest.param(501, None, None, None, Outcome.SERVER_ERROR, True, True, id="501"),
    pytest.param(502, None, None, HTML_502, Outcome.GATEWAY_ERROR, True, True, id="502-html"),
    pytest.param(502, None, None, API_ERROR, Outcome.GATEWAY_ERROR, True, True, id="502-json"),
    pytest.param(503, None, None, b"", Outcome.GATEWAY_ERROR, True, True, id="503-empty"),
    pytest.param(504, None, None, None, Outcome.GATEWAY_ERROR, True, True, id="504"),
    pytest.param(405, None, None, None, Outcome.CLIENT_ERROR, False, False, id="405"),
    pytest.param(413, None, None, HTML_502, Outcome.CLIENT_ERROR, False, False, id="413"),
    pytest.param(424, None, None, INVALID, Outcome.CLIENT_ERROR, False, False, id="424"),
    # Stripe-Should-Retry decides when present, both ways, any case.
    pytest.param(
        500, "false", None, API_ERROR, Outcome.SERVER_ERROR, False, True, id="500-sr-false"
    ),
    pytest.param(
        502, "False", None, HTML_502, Outcome.GATEWAY_ERROR, False, True, id="502-sr-false"
    ),
    pytest.param(409, "false", None, None, Outcome.IN_FLIGHT_CONFLICT, False, False, id="409-sr-f"),
    pytest.param(429, "FALSE", "global-rate", None, Outcome.RATE_LIMITED, False, False, id="429-f"),
    pytest.param(400, "true", None, INVALID, Outcome.VALIDATION, True, False, id="400-sr-true"),
    pytest.param(424, " TRUE ", None, None, Outcome.CLIENT_ERROR, True, False, id="424-sr-true"),
    pytest.param(401, "true", None, None, Outcome.AUTHENTICATION, True, False, id="401-sr-true"),
    pytest.param(500, "maybe", None, None, Outcome.SERVER_ERROR, True, True, id="500-sr-garbage"),
    pytest.param(400, "yes", None, None, Outcome.VALIDATION, False, False, id="400-sr-garbage"),
]


@pytest.mark.parametrize(
    ("status", "should_retry", "reason", "body", "outcome", "retryable", "failure"), TABLE
)
def test_classify_response_table(
    status: int,
    should_retry: str | None,
    reason: str | None,
    body: bytes | None,
    outcome: Outcome,
    retryable: bool,
    failure: bool,
) -> None:
    """Each row of the classification rules gives its outcome, retryability and breaker flag."""
    verdict = classify_response(status, should_retry, reason, body)
    assert (verdict.outcome, verdict.retryable, verdict.upstream_failure) == (
        outcome,
        retryable,
        failure,
    )
    assert verdict.sent is True


def test_success_is_a_shared_singleton() -> None:
    """A 2xx allocates nothing: every success is the same preallocated verdict."""
    assert classify_response(200, None, None, None) is classify_response(204, None, None, b"{}")


def test_plain_errors_are_shared_singletons() -> None:
    """An error without details (HTML 502) reuses a preallocated verdict."""
    first = classify_response(502, None, None, HTML_502)
    assert first is classify_response(503, None, None, None)
    assert (first.error_type, first.error_code) == (None, None)


def test_error_fields_are_extracted() -> None:
    """error.type and error.code from a Stripe body end up on the verdict."""
    verdict = classify_response(402, None, None, stripe_error("card_error", "expired_card"))
    assert verdict == Verdict(
        Outcome.CARD_DECLINED, False, False, error_type="card_error", error_code="expired_card"
    )


def test_leading_whitespace_and_repeats() -> None:
    """A body with leading whitespace is still parsed; a repeated error reuses its verdict."""
    body = b"\n  " + stripe_error("idempotency_error", "idempotency_key_reused")
    first = classify_response(400, None, None, body)
    assert (first.outcome, first.error_code) == (
        Outcome.IDEMPOTENCY_MISMATCH,
        "idempotency_key_reused",
    )
    assert classify_response(400, None, None, body) is first


def test_many_distinct_codes_stay_correct() -> None:
    """Past the verdict cache's bound, verdicts are still built correctly."""
    for i in range(2000):
        verdict = classify_response(429, None, None, stripe_error("x", f"code_{i}"))
        assert (verdict.outcome, verdict.error_code) == (Outcome.LOCK_TIMEOUT, f"code_{i}")
    assert len(classify._DETAILED) <= classify._MAX_DETAILED  # junk codes cannot grow memory


def test_a_full_verdict_cache_still_shares_a_repeated_error() -> None:
    """After the cache filled with other codes, a repeated error still reuses one verdict."""
    for i in range(classify._MAX_DETAILED + 10):
        classify_response(429, None, None, stripe_error("x", f"filler_{i}"))
    body = stripe_error("card_error", "expired_card_after_fill")  # seen by no other test
    first = classify_response(402, None, None, body)
    assert first.error_code == "expired_card_after_fill"
    assert classify_response(402, None, None, body) is first


def test_long_codes_are_not_cached() -> None:
    """A junk multi-kilobyte code is reported but not kept in the shared verdict cache."""
    body = stripe_error("api_error", "x" * 5000)
    first = classify_response(500, None, None, body)
    assert first.error_code == "x" * 5000
    assert classify_response(500, None, None, body) is not first


def test_oauth_string_error_becomes_the_code() -> None:
    """An OAuth answer ({"error": "invalid_grant"}) reports its error string as the code."""
    verdict = classify_response(400, None, None, b'{"error": "invalid_grant"}')
    assert (verdict.outcome, verdict.error_type, verdict.error_code) == (
        Outcome.VALIDATION,
        None,
        "invalid_grant",
    )


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"error": 5}',
        b'{"error": {"type": 5, "code": ["x"]}}',
        b"\xff\xfe",
        b'{"a":' * 13_000,
        b'{"error": {"type": "idempotency_error"}' + b" " * (1 << 17) + b"}",
    ],
    ids=["list", "error-int", "fields-not-str", "bad-utf8", "deep-nesting", "oversized"],
)
def test_odd_bodies_are_ignored(body: bytes) -> None:
    """Bodies that are not Stripe errors (or too big to be) leave the fields empty, never raise."""
    verdict = classify_response(400, None, None, body)
    assert (verdict.outcome, verdict.error_type, verdict.error_code) == (
        Outcome.VALIDATION,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("kind", "outcome", "sent"),
    [
        (TransportError.CONNECT, Outcome.CONNECTION_ERROR, False),
        (TransportError.RESET, Outcome.CONNECTION_ERROR, True),
        (TransportError.TIMEOUT, Outcome.TIMEOUT, True),
        (TransportError.BAD_RESPONSE, Outcome.GATEWAY_ERROR, True),
    ],
)
def test_transport_errors(kind: TransportError, outcome: Outcome, sent: bool) -> None:
    """Transport failures are retryable upstream failures; only CONNECT is known unsent."""
    verdict = classify_transport_error(kind)
    assert verdict == Verdict(outcome, retryable=True, upstream_failure=True, sent=sent)
    assert verdict is classify_transport_error(kind)


def test_local_resource_exhaustion_is_not_stripes_failure() -> None:
    """The sidecar's own EMFILE/ENOMEM never counts against a breaker and is not retried at once."""
    verdict = classify_transport_error(TransportError.LOCAL_RESOURCES)
    assert verdict.outcome is Outcome.LOCAL_RESOURCES
    assert not verdict.upstream_failure
    assert not verdict.retryable
    assert not verdict.sent


def test_upstream_failure_only_for_server_side_outcomes() -> None:
    """No 4xx (429 included) or 402 answer ever counts against the breakers."""
    for status in range(400, 500):
        for reason in (None, "global-rate"):
            verdict = classify_response(status, "true", reason, API_ERROR)
            assert not verdict.upstream_failure, status
    for status in range(500, 600):
        assert classify_response(status, "false", None, None).upstream_failure, status


def test_outcome_labels() -> None:
    """Outcome values are the stable metric labels."""
    assert [o.value for o in Outcome] == [
        "success",
        "validation",
        "card_declined",
        "authentication",
        "permission",
        "idempotency_mismatch",
        "in_flight_conflict",
        "lock_timeout",
        "rate_limited",
        "server_error",
        "gateway_error",
        "timeout",
        "connection_error",
        "client_error",
        "local_resources",
    ]


def test_type_without_code_keeps_its_type() -> None:
    """An error with a type and no code reports the type (it is not folded into a plain verdict)."""
    verdict = classify_response(500, None, None, API_ERROR)
    assert (verdict.outcome, verdict.error_type, verdict.error_code) == (Outcome.SERVER_ERROR, "api_error", None)


def test_verdict_cache_takes_type_and_code_under_128_characters_only() -> None:
    """Type + code of 127 characters is shared; of exactly 128 it is built anew each time."""
    short = stripe_error("t", "c" * 126)
    assert classify_response(400, None, None, short) is classify_response(400, None, None, short)
    long = stripe_error("t", "d" * 127)
    assert classify_response(400, None, None, long) is not classify_response(400, None, None, long)


def test_error_body_of_exactly_the_parse_limit_is_read() -> None:
    """A body of exactly 64 KiB is still parsed; one byte more is not."""
    base = stripe_error("api_error", "padded")
    exact = base[:-1] + b" " * ((1 << 16) - len(base)) + b"}"
    assert len(exact) == 1 << 16
    assert classify_response(500, None, None, exact).error_code == "padded"
    assert classify_response(500, None, None, exact + b" ").error_code is None


def test_one_byte_body_is_not_an_error_document() -> None:
    """A body of a single "{" is classified by status alone, without a parse failure."""
    verdict = classify_response(500, None, None, b"{")
    assert (verdict.outcome, verdict.error_type, verdict.error_code) == (Outcome.SERVER_ERROR, None, None)


def test_error_param_is_reported_and_part_of_the_shared_verdict() -> None:
    """error.param is reported when it is a string, and verdicts differing only in it differ."""
    amount = classify_response(400, None, None, stripe_error("invalid_request_error", "parameter_missing", param="amount"))
    currency = classify_response(400, None, None, stripe_error("invalid_request_error", "parameter_missing", param="currency"))
    assert (amount.error_code, amount.error_param, currency.error_param) == ("parameter_missing", "amount", "currency")
    odd = json.dumps({"error": {"type": "invalid_request_error", "code": "x", "param": 7}}).encode()
    assert classify_response(400, None, None, odd).error_param is None


def test_a_long_param_keeps_the_verdict_out_of_the_cache() -> None:
    """Type + code + param of 128 characters or more is built anew each time."""
    body = stripe_error("t", "c", param="p" * 200)
    assert classify_response(400, None, None, body) is not classify_response(400, None, None, body)
