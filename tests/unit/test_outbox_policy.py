"""The outbox's pure parts: expiry, backoff, the next state after a round, store URLs, redaction."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxy.classify import TransportError, classify_response, classify_transport_error
from proxy.outbox.capture import DeliveryConnection, _dechunk
from proxy.outbox.policy import (
    Answer,
    Next,
    OutboxSettings,
    after_round,
    backoff,
    before_round,
    expiry,
    store_url,
)
from proxy.outbox.service import public_item
from proxy.outbox.store import Item, Result, State, redact_url
from proxy.outbox.worker import round_answer

S = OutboxSettings()
T0 = 1_800_000_000.0


def _after(answer: Answer, *, rounds: int = 0, now: float = T0 + 10, retry_after: float = 0.0,
           rand: float = 1.0, expires_at: float | None = None):
    return after_round(
        answer, "detail", rounds=rounds, received_at=T0,
        expires_at=expiry(T0, S) if expires_at is None else expires_at, now=now,
        retry_after=retry_after, settings=S, rand=lambda: rand,
    )  # fmt: skip


def test_expiry_is_the_window_less_the_margin() -> None:
    """Stripe keeps keys 24 h: an item stops being sendable 23 h after it arrived (defaults)."""
    assert expiry(T0, S) == T0 + 23 * 3600


def test_before_round_expires_only_from_the_expiry_on() -> None:
    """Just before the expiry an item goes; at it, it expires with the reason, unsent."""
    end = expiry(T0, S)
    assert before_round(T0, end, end - 0.001) is None
    nxt = before_round(T0, end, end)
    assert nxt is not None and (nxt.state, nxt.next_at) == (State.EXPIRED, end)
    assert nxt.reason == (
        f"expired: received 23.00 h ago, past Stripe's idempotency window less the safety "
        f"margin (until {end:.0f}); a resend could be performed twice, so it is never sent again"
    )


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    """1, 2, 4 ... 60 s at the top of the jitter; half that at its bottom."""
    assert [backoff(r, S, lambda: 1.0) for r in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff(3, S, lambda: 0.0) == 4.0
    assert backoff(10_000, S, lambda: 1.0) == 60.0  # no overflow on a long-lived item
    huge = OutboxSettings(backoff_max=1e12)
    assert backoff(31, huge, lambda: 1.0) == 2.0**30  # the exponent stops at 30
    assert backoff(29, huge, lambda: 1.0) == 2.0**29


def test_success_delivers_and_terminal_fails() -> None:
    """2xx: delivered; Stripe's final error: failed, with what it was."""
    assert _after(Answer.SUCCESS) == Next(State.DELIVERED, T0 + 10, "delivered")
    assert _after(Answer.TERMINAL) == Next(
        State.FAILED, T0 + 10, "failed: Stripe's final answer (detail)"
    )


def test_retryable_backs_off_by_rounds_and_honours_retry_after() -> None:
    """A retryable round waits the backoff of its round count, or Retry-After when longer."""
    nxt = _after(Answer.RETRYABLE, rounds=2)
    assert (nxt.state, nxt.next_at) == (State.QUEUED, T0 + 10 + 4)
    assert _after(Answer.RETRYABLE, rounds=0, retry_after=30).next_at == T0 + 10 + 30
    assert nxt.reason == "retry later: detail"


def test_not_sent_waits_the_refusals_retry_after() -> None:
    """Held back by a breaker or the limiter: due again after its Retry-After (at least a poll)."""
    nxt = _after(Answer.NOT_SENT, retry_after=3)
    assert (nxt.state, nxt.next_at, nxt.reason) == (State.QUEUED, T0 + 13, "not sent: detail")
    assert _after(Answer.NOT_SENT, retry_after=0).next_at == T0 + 10 + S.poll_interval


def test_a_next_round_past_the_expiry_expires_now() -> None:
    """Waiting past the expiry would only hide the item: it expires at once."""
    end = T0 + 100
    nxt = _after(Answer.RETRYABLE, rounds=10, now=T0 + 50, expires_at=end)
    assert nxt.state is State.EXPIRED and nxt.next_at == T0 + 50
    assert nxt.reason.startswith("expired: received 0.01 h ago") and "never sent" in nxt.reason
    assert _after(Answer.RETRYABLE, rounds=0, now=T0 + 50, expires_at=end).state is State.QUEUED
    # Due exactly at the expiry is too late: nothing may be sent from that moment on.
    assert _after(Answer.RETRYABLE, rounds=0, now=end - 1.0, expires_at=end).state is State.EXPIRED
    assert _after(Answer.RETRYABLE, rounds=0, now=end - 1.001, expires_at=end).state is State.QUEUED


def test_store_url_order() -> None:
    """The environment's store, then the config's, then the state directory, then ./outbox.db."""
    cfg = OutboxSettings(store="sqlite:////cfg/o.db")
    assert store_url(cfg, {"STRIPE_SIDECAR_OUTBOX_STORE": "redis://r:6379/0"}) == "redis://r:6379/0"
    assert store_url(cfg, {}) == "sqlite:////cfg/o.db"
    assert store_url(S, {"STRIPE_SIDECAR_STATE_DIR": "/var/lib/s"}) == "sqlite:////var/lib/s/outbox.db"
    assert store_url(S, {}) == "sqlite:///./outbox.db"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:////var/lib/x/outbox.db", "sqlite:////var/lib/x/outbox.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """Passwords in store URLs are never shown."""
    assert redact_url(url) == shown


def test_public_item_shows_no_secret_and_no_body() -> None:
    """The API's view: safe header values, names of the rest, never Authorization or the body."""
    item = Item(
        id="qr_1", operation="POST /v1/customers", idempotency_key="k1", scope="s",
        fingerprint="f", order_key=None, method="POST", target="/v1/customers",
        headers=b"Authorization: Bearer sk_live_secret\r\nStripe-Account: acct_1\r\n"
        b"Idempotency-Key: k1\r\n",
        body=b"email=secret%40example.com", received_at=T0, expires_at=T0 + 1, attempts=2,
        state=State.FAILED, rounds=1, next_at=T0, lease_until=0, owner="", updated_at=T0,
        reason="failed", result=Result(402, b'{"error":{"code":"card_declined"}}', "req_1"),
    )  # fmt: skip
    full = public_item(item, full=True)
    text = repr(full)
    assert "sk_live_secret" not in text and "secret%40" not in text
    assert full["headers"] == {"Stripe-Account": "acct_1", "Idempotency-Key": "k1"}
    assert full["header_names"] == ["Authorization", "Stripe-Account", "Idempotency-Key"]
    assert full["result"] == {"status": 402, "request_id": "req_1",
                              "body": {"error": {"code": "card_declined"}}}
    assert full["body_bytes"] == 26 and full["next_attempt_at"] is None
    assert "headers" not in public_item(item)


def test_delivery_connection_collects_a_chunked_answer() -> None:
    """A streamed (chunked) answer written to the delivery connection reads back whole."""
    conn = DeliveryConnection()
    conn.start_stream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.start_stream(b"5\r\nhello\r\n")
    conn.start_stream(b"6\r\n world\r\n")
    conn.end_stream(b"0\r\n\r\n", keep_alive=True)
    head, body = conn.answer()
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello world"
    assert _dechunk(b"zz\r\n") == b""


def _call(attempt: int, outcome: str, status: int, verdict: Any) -> Any:
    return SimpleNamespace(attempt=attempt, outcome=outcome, status=status, verdict=verdict)


def test_round_answer_reads_the_finished_call() -> None:
    """Refused: not sent; 2xx: success; retryable: retryable; Stripe's final error: terminal."""
    ok = classify_response(200, None, None, None)
    saved_500 = classify_response(500, "false", None, b'{"error":{"type":"api_error"}}')
    gateway = classify_response(503, None, None, b"<html>")
    declined = classify_response(402, None, None, b'{"error":{"code":"card_declined"}}')
    assert round_answer(_call(0, "circuit_open", 503, ok)) == (Answer.NOT_SENT, "circuit_open")
    assert round_answer(_call(1, "success", 200, ok)) == (Answer.SUCCESS, "200")
    assert round_answer(_call(3, "gateway_error", 503, gateway)) == (Answer.RETRYABLE, "503 gateway_error")
    assert round_answer(_call(1, "card_declined", 402, declined)) == (Answer.TERMINAL, "402 card_declined")
    # A 500 Stripe saved under the key replays forever: final, never another round.
    assert round_answer(_call(1, "server_error", 500, saved_500))[0] is Answer.TERMINAL
    # The sidecar's own end (shutdown, a bug) after sending: another round, the key keeps it safe.
    assert round_answer(_call(1, "shutting_down", 503, gateway))[0] is Answer.RETRYABLE
    local = classify_transport_error(TransportError.LOCAL_RESOURCES)
    assert round_answer(_call(1, "local_resources", 503, local))[0] is Answer.NOT_SENT
