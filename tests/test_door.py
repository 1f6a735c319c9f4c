"""Strict at the door: bad requests get a precise Stripe-shaped error and are never forwarded."""

from __future__ import annotations

import asyncio
import json

import pytest
from rawclient import exchange, open_raw
from rawupstream import json_answer

OK = json_answer(200, b"{}")


def _assert_stripe_error(answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.header("Content-Type") == b"application/json"
    err = answer.json()["error"]
    assert err["code"] == code
    assert err["type"] in ("invalid_request_error", "api_error")
    assert isinstance(err["message"], str) and err["message"]


REFUSED = [
    (b"GET http://evil.example/v1/customers HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400, "sidecar_absolute_target_refused"),
    (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405, "sidecar_method_not_allowed"),
    (b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 404, "sidecar_not_a_stripe_path"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404, "sidecar_not_a_stripe_path"),
    (b"GET /v3/customers HTTP/1.1\r\nHost: x\r\n\r\n", 404, "sidecar_not_a_stripe_path"),
    (b"GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n", 404, "sidecar_not_a_stripe_path"),
    (b"GET /v1/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/%2E%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/./customers HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/customers/.. HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/customers/%2f..%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/customers%5c..%5cadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400, None),
    (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, None),
    (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400, None),
    (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400, None),
    (b"GET /v1/customers HTTP/1.1\r\nHost: x\rX-Evil: 1\r\n\r\n", 400, None),
    (b"GET /v1/customers HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400, None),
    (b"GET /v1/customers HTTP/1.1\nHost: x\n\n", 400, None),
    (b"GET /v1/customers FOO/1.1\r\nHost: x\r\n\r\n", 400, None),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, None),
    (b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400, None),
    (b"GET /v1/customers HTTP/2.0\r\nHost: x\r\n\r\n", 505, "sidecar_http_version_not_supported"),
    (b"GET /v1/customers HTTP/0.9\r\nHost: x\r\n\r\n", 505, "sidecar_http_version_not_supported"),
    # Kept alive by a Connection or Proxy-Connection field, as only HTTP/1.1 is by default.
    (b"GET /v1/customers HTTP/2.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", 505, "sidecar_http_version_not_supported"),
    (b"GET /v1/customers HTTP/2.0\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\r\n", 505, "sidecar_http_version_not_supported"),
    (b"GET /v1/customers HTTP/0.9\r\nHost: x\r\nproxy-connection: Keep-Alive\r\n\r\n", 505, "sidecar_http_version_not_supported"),
    (b"GET /v1/customers\r\nHost: x\r\n\r\n", 505, "sidecar_http_version_not_supported"),
    (b"GET /v1/customers HTTP/1.2\r\nHost: x\r\n\r\n", 400, None),
    (b"GET /v1/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/%c0%ae%c0%ae/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/%c0%afadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/%e0%80%ae%e0%80%ae/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
    (b"GET /v1/%252e%252e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "sidecar_unsafe_path"),
]


@pytest.mark.parametrize(("raw", "status", "code"), REFUSED, ids=[r[0][:40].decode("latin-1") for r in REFUSED])
async def test_bad_requests_are_refused_and_never_forwarded(raw_upstream, make_sidecar, raw, status, code):
    """Each malformed, ambiguous or non-Stripe request gets its error and reaches no upstream."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, closed = await exchange(sc.port, raw, check_closed=True)
    assert answers, "no answer"
    a = answers[0]
    assert a.status == status
    err = a.json()["error"]
    assert err["code"].startswith("sidecar_")
    if code is not None:
        _assert_stripe_error(a, status, code)
    assert closed
    assert up.received == []


async def test_oversized_headers_get_431(raw_upstream, make_sidecar):
    """Headers past the limit get 431 at once."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_header_bytes": 2048})
    raw = b"GET /v1/customers HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    answers, closed = await exchange(sc.port, raw, check_closed=True)
    _assert_stripe_error(answers[0], 431, "sidecar_headers_too_large")
    assert closed and up.received == []


async def test_oversized_body_gets_413_without_reading_it(raw_upstream, make_sidecar):
    """A declared body over the limit is refused as soon as the head arrives; the body is never sent."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_body_bytes": 1000})
    reader, writer = await open_raw(sc.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
    async with asyncio.timeout(5):
        data = await reader.read()  # the sidecar answers and closes without waiting for 50 MB
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"sidecar_body_too_large" in data
    writer.close()
    assert up.received == []


async def test_chunked_body_over_limit_gets_413(raw_upstream, make_sidecar):
    """A chunked body that grows past the limit is cut off with 413."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url, server={"max_body_bytes": 1000}, retry={"max_replay_body": 100})
    chunk = b"a" * 600
    raw = b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%b\r\n" % (len(chunk), chunk)) * 3 + b"0\r\n\r\n"
    reader, writer = await open_raw(sc.port)
    writer.write(raw)
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    # Either the 413 or a cut connection (if the upload had already started upstream); never a 2xx.
    assert not data.startswith(b"HTTP/1.1 2")
    assert all(len(r.body) <= 1000 for r in up.received)


# A head that stops arriving (408 at header_timeout): tests/test_timeouts.py.


async def test_secrets_never_reach_logs_metrics_or_errors(raw_upstream, make_sidecar):
    """API keys and Authorization values appear in no log line, metric or sidecar error."""
    secret = b"sk_test_51SuperSecretKeyValue"
    up = await raw_upstream(lambda r: None)  # drop: forces sidecar-made errors
    sc = await make_sidecar(up.url, retry={"base_delay": 0.001, "max_delay": 0.002})
    for raw in (
        b"GET /v1/customers/cus_1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\r\n\r\n",
        b"POST /v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + secret + b"\r\nContent-Length: 0\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\r\n\r\n",
    ):
        answers, _ = await exchange(sc.port, raw)
        assert secret not in answers[0].body
        assert all(secret not in v for _, v in answers[0].headers)
    metrics, _ = await exchange(sc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert secret not in metrics[0].body
    sc.log.flush()
    logs = sc.log._stream.getvalue()
    assert '"event":"request"' in logs
    assert secret.decode() not in logs
    assert "cus_1" not in logs  # raw IDs never become labels or log fields


async def test_held_keys_never_reach_logs_metrics_or_errors(raw_upstream, make_sidecar):
    """Keys the sidecar holds appear in no log line, metric or sidecar error, with a client token
    refused, an upstream that drops every call (key checks included) and an app key sent."""
    held = ("sk_test_51HeldPrimaryKeyValue", "sk_test_51HeldSecondKeyValue")
    token = "client-token-0123456789abcdef"
    up = await raw_upstream(lambda r: None)  # drop: forces sidecar-made errors
    sc = await make_sidecar(up.url, retry={"base_delay": 0.001, "max_delay": 0.002},
                            secret_keys=list(held), client_token=token)
    for auth in (b"Bearer " + token.encode(), b"Bearer sk_test_wrong", b"Basic " + token.encode()):
        answers, _ = await exchange(
            sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\n\r\n"
        )
        assert answers[0].status in (401, 502)
        for key in held:
            assert key.encode() not in answers[0].body
            assert all(key.encode() not in v for _, v in answers[0].headers)
    metrics, _ = await exchange(sc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    diagnosis, _ = await exchange(sc.port, b"GET /diagnosis HTTP/1.1\r\nHost: x\r\n\r\n")
    sc.log.flush()
    logs = sc.log._stream.getvalue()
    assert '"event":"request"' in logs and '"event":"key_check_failed"' in logs
    for key in held:
        for text in (metrics[0].body.decode(), diagnosis[0].body.decode(), logs):
            assert key not in text and key[8:] not in text and key[-8:] not in text


async def test_keys_quoted_back_in_errors_and_logs_are_redacted(raw_upstream, make_sidecar):
    """A key the client put in a path is masked in the sidecar's error body, its metrics and its
    logs; Bearer/Basic values in a logged error too (fails with redaction turned off)."""
    up = await raw_upstream(lambda r: OK)
    sc = await make_sidecar(up.url)
    answers, _ = await exchange(sc.port, b"GET /sk_test_51SuperSecretKeyValue HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers[0].status == 404
    assert answers[0].json() == {"error": {
        "type": "invalid_request_error",
        "code": "sidecar_not_a_stripe_path",
        "message": "Unrecognized request URL (GET: /sk_test_[redacted]). The sidecar forwards only Stripe API paths (/v1/, /v2/, /oauth/).",
    }}
    metrics, _ = await exchange(sc.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"SuperSecret" not in metrics[0].body
    sc.log.event("internal_error", "error", error="AuthenticationError('rk_live_51Abc', 'Authorization: Basic c2tfdGVzdF8xMjM6', 'Bearer sk_test_9xyz')")
    sc.log.flush()
    line = sc.log_stream.getvalue().splitlines()[-1]
    assert json.loads(line)["error"] == "AuthenticationError('rk_live_[redacted]', 'Authorization: Basic [redacted]', 'Bearer [redacted]')"
    assert "SuperSecret" not in sc.log_stream.getvalue()
