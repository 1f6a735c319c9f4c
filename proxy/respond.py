"""The respond stage: turn a finished call into the answer the app receives.

Stripe's answer passes through unchanged (status, headers, body) plus the sidecar's own headers;
when the sidecar retried or could have, the answer says ``Stripe-Should-Retry: false`` so SDKs do
not retry on top. A load balancer's HTML page on the last attempt, a transport failure and the
sidecar's own refusals become Stripe-shaped JSON errors. Every method sets ``call.status`` and
``call.outcome`` for the record stage.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from typing import TYPE_CHECKING

from proxy.classify import Outcome, TransportError
from proxy.deadlines import Deadlines
from proxy.replies import error_response
from proxy.server import ClientConnection
from proxy.upstream import Response, StreamEnd

if TYPE_CHECKING:
    from proxy.forward import Call

__all__ = ["Responder"]

_NO_BODY_STATUS = frozenset({204, 304})
_SHOULD_RETRY = b"stripe-should-retry:"
_NO_RETRY = b"Stripe-Should-Retry: false\r\n"


class _StreamSink:
    """Writes a streamed upstream body to the client (how the stream ended comes from upstream)."""

    __slots__ = ("_chunked", "_conn", "_keep_alive")

    def __init__(self, conn: ClientConnection, chunked: bool, keep_alive: bool) -> None:
        self._conn = conn
        self._chunked = chunked
        self._keep_alive = keep_alive

    def body(self, chunk: bytes) -> None:
        if self._chunked:
            self._conn.start_stream(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._conn.start_stream(chunk)

    def end(self) -> None:
        self._conn.end_stream(b"0\r\n\r\n" if self._chunked else b"", keep_alive=self._keep_alive)

    def fail(self) -> None:
        self._conn.abort()


def _settle(ended: asyncio.Future[str | None], stream: asyncio.Future[StreamEnd]) -> None:
    """None for a stream that went out whole, else the cut's outcome (never a success)."""
    end = stream.result()
    if not ended.done():
        ended.set_result(_CUT_OUTCOME.get(end, end.value))


# How a cut stream is recorded: an upstream that broke off is a connection error like any other;
# client_stalled and client_gone keep their own names.
_CUT_OUTCOME: dict[StreamEnd, str | None] = {
    StreamEnd.FINISHED: None,
    StreamEnd.UPSTREAM_BROKE_OFF: Outcome.CONNECTION_ERROR,
}


class Responder:
    """Writes answers to the app's connection; one per sidecar."""

    def __init__(
        self,
        *,
        sidecar_headers: bool,
        stream_idle: float,
        deadlines: Deadlines,
    ) -> None:
        self._sidecar_headers = sidecar_headers
        self._stream_idle = stream_idle
        self._deadlines = deadlines
        self._lines_cache: dict[tuple[int, str], bytes] = {}
        self._status_lines: dict[tuple[int, bytes], bytes] = {}
        # "Sidecar-Diagnosis: <kinds>\r\n" while critical diagnoses are active, else b"";
        # set by the diagnosis engine's subscriber on raise and clear, read on every answer.
        self.diagnosis_line = b""

    def _sidecar_lines(self, call: Call, outcome: str, echoed: bool) -> bytes:
        if not self._sidecar_headers:
            return b""
        lines = self._attempt_lines(call.attempt, outcome)
        if call.injected is not None and not echoed:
            lines += b"Idempotency-Key: " + call.injected + b"\r\n"
        return lines

    def _status_line(self, status: int, reason: bytes) -> bytes:
        """The status line passed on, made once per status and reason (bounded)."""
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(self._status_lines) < 64:
            self._status_lines[status, reason] = line
        return line

    def _attempt_lines(self, attempt: int, outcome: str) -> bytes:
        """``Sidecar-Attempts`` and ``Sidecar-Outcome``, made once per pair (bounded)."""
        key = (attempt, outcome)
        lines = self._lines_cache.get(key)
        if lines is None:
            lines = b"Sidecar-Attempts: %d\r\nSidecar-Outcome: %s\r\n" % (attempt, outcome.encode())
            if len(self._lines_cache) < 256:
                self._lines_cache[key] = lines
        return lines

    # -- Stripe's answer ------------------------------------------------------------------------
    def upstream(self, call: Call, resp: Response) -> asyncio.Future[str | None] | None:
        """Pass Stripe's answer on; a streamed one returns a future that resolves at its end."""
        verdict = call.verdict
        conn = call.conn
        req = call.req
        status = resp.status
        call.status, call.outcome = status, verdict.outcome
        headers = resp.headers
        keep_alive = conn.keeps_alive(req)
        if verdict.retryable and call.settled:
            if (
                verdict.outcome is Outcome.GATEWAY_ERROR
                and resp.complete
                and not resp.body_bytes().lstrip().startswith(b"{")
            ):
                # A load balancer's HTML page. SDKs that cannot parse a body retry it whatever
                # Stripe-Should-Retry says (stripe-go does), so the final answer is made
                # Stripe-shaped instead.
                self._gateway_page(call, resp.status, keep_alive)
                return None
            headers = [h for h in headers if not h[:20].lower().startswith(_SHOULD_RETRY)]
            headers.append(_NO_RETRY)
        # The answer in pieces, joined once: no formatted intermediate heads. (A join of more
        # than ten pieces allocates, so pieces are few.)
        line = self._status_lines.get((status, resp.reason))
        if line is None:
            line = self._status_line(status, resp.reason)
        parts = [line, *headers]
        if self._sidecar_headers:
            # The cache read inline: _attempt_lines is called only to fill it.
            lines = self._lines_cache.get((call.attempt, verdict.outcome))
            if lines is None:
                lines = self._attempt_lines(call.attempt, verdict.outcome)
            parts.append(lines)
            if call.injected is not None and resp.idempotency_key is None:
                parts.append(call.key_line)
        if self.diagnosis_line:
            parts.append(self.diagnosis_line)
        if not resp.complete and resp.content_length is None and not req.http11:
            keep_alive = False  # HTTP/1.0 knows no chunking: the end of the body is the close
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        if req.method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            if resp.content_length is not None and status != 204:
                parts.append(b"Content-Length: %d\r\n" % resp.content_length)
            parts.append(b"\r\n")
            conn.finish(b"".join(parts), keep_alive=keep_alive)
            resp.discard()
            return None
        if resp.complete:
            body = resp.body
            size = len(body[0]) if len(body) == 1 else sum(map(len, body))
            parts.append(b"Content-Length: %d\r\n\r\n" % size)
            parts += body
            conn.finish(b"".join(parts), keep_alive=keep_alive)
            return None
        return self._stream(call, resp, b"".join(parts), keep_alive)

    def _stream(
        self, call: Call, resp: Response, head: bytes, keep_alive: bool
    ) -> asyncio.Future[str | None]:
        """A large answer: stream it, framed by the upstream's length or re-chunked."""
        conn = call.conn
        ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if resp.content_length is not None:
            conn.start_stream(head + b"Content-Length: %d\r\n\r\n" % resp.content_length)
            sink = _StreamSink(conn, False, keep_alive)
        elif not call.req.http11:
            conn.start_stream(head + b"\r\n")
            sink = _StreamSink(conn, False, False)
        else:
            conn.start_stream(head + b"Transfer-Encoding: chunked\r\n\r\n")
            sink = _StreamSink(conn, True, keep_alive)
        conn.set_streaming(resp)
        upstream = resp.conn
        if upstream is not None and not resp.complete:
            # A streamed answer that goes silent for an attempt timeout is cut off, so neither
            # side waits forever; each chunk moves the deadline on.
            upstream.stream_idle = self._stream_idle
            self._deadlines.arm(upstream, upstream.stream_idle)
        resp.stream(sink).add_done_callback(functools.partial(_settle, ended))
        return ended

    def _gateway_page(self, call: Call, status: int, keep_alive: bool) -> None:
        extra = self._sidecar_lines(call, call.verdict.outcome, False) + _NO_RETRY
        extra += self.diagnosis_line
        message = (
            f"Stripe's edge answered {status} with a page that is not a Stripe API answer, "
            f"on every attempt ({call.attempt})."
        )
        call.conn.finish(
            error_response(
                status, "upstream_gateway_error", message, extra=extra, close=not keep_alive
            ),
            keep_alive=keep_alive,
        )

    # -- the sidecar's own answers --------------------------------------------------------------
    def failure(self, call: Call, client_caused: bool, detail: str) -> None:
        """No usable answer came from Stripe (or the client stalled its body)."""
        source = call.req.source
        if client_caused and source is not None and source.refusal is not None:
            # The door refused the body mid-stream (framing, size, stall): its answer, once.
            call.conn.finish(source.refusal, keep_alive=False)
            call.status = source.refusal_status
            call.outcome = call.verdict.outcome
            return
        type_ = "api_error"
        settled = call.settled
        kind = call.error.kind if call.error is not None else None
        extra = b""
        if client_caused:
            status, code, type_ = 408, "body_timeout", "invalid_request_error"
            message = "The request body did not arrive in time (or the client stopped sending it)."
            settled = False
        elif kind is TransportError.LOCAL_RESOURCES:
            status, code = 503, "overloaded"
            message = "The sidecar is out of local resources; this request was not sent to Stripe."
            extra = b"Retry-After: 1\r\n"
        elif kind is TransportError.BAD_RESPONSE:
            status, code = 502, "upstream_bad_response"
            message = f"Stripe's answer was not valid HTTP ({call.attempt} attempt(s)): {detail}."
        elif call.verdict.outcome is Outcome.TIMEOUT:
            status, code = 504, "upstream_timeout"
            message = f"Stripe did not answer in time ({call.attempt} attempt(s))."
        else:
            status, code = 502, "upstream_unreachable"
            message = f"Stripe could not be reached ({call.attempt} attempt(s)): {detail}."
        extra += self._sidecar_lines(call, call.verdict.outcome, False)
        if settled:
            extra += _NO_RETRY
        self._error(call, status, code, message, type_, extra)
        call.outcome = call.verdict.outcome

    def refusal(self, call: Call, reason: str, retry_after: float) -> None:
        """The sidecar answers without calling Stripe: failing fast or shedding load."""
        op = call.op.name
        if reason == "circuit_open":
            status, type_ = 503, "api_error"
            message = (
                f"The circuit breaker for {op} is open after repeated upstream failures; "
                f"failing fast. Try again in {retry_after:.1f} s."
            )
        elif reason == "rate_limited":
            status, type_ = 429, "invalid_request_error"
            message = (
                "Answered by the sidecar, not Stripe: Stripe rate limited recent requests, "
                "so the sidecar paces them and this one would have waited longer than "
                "ratelimit.max_wait. It was not sent to Stripe."
            )
        else:
            status, type_ = 503, "api_error"
            message = "Too many requests are in flight to Stripe; this request was not sent."
        extra = b"Retry-After: %d\r\n" % max(1, math.ceil(retry_after)) + _NO_RETRY
        if self._sidecar_headers:
            extra += b"Sidecar-Attempts: 0\r\nSidecar-Outcome: %s\r\n" % reason.encode()
        self._error(call, status, reason, message, type_, extra)
        call.outcome = reason

    def queued(self, call: Call, item_id: str, key: str, state: str) -> None:
        """202: the write is stored in the outbox and will be sent to Stripe later."""
        body = json.dumps(
            {
                "object": "sidecar.queued_request",
                "id": item_id,
                "idempotency_key": key,
                "operation": call.op.name,
                "state": state,
            },
            separators=(",", ":"),
        ).encode()
        keep_alive = call.conn.keeps_alive(call.req)
        head = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
        head += b"Idempotency-Key: %s\r\n" % key.encode("latin-1")
        if self._sidecar_headers:
            head += b"Sidecar-Attempts: %d\r\nSidecar-Outcome: queued\r\n" % call.attempt
        head += self.diagnosis_line
        if not keep_alive:
            head += b"Connection: close\r\n"
        call.conn.finish(
            head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body), keep_alive=keep_alive
        )
        call.status, call.outcome = 202, "queued"

    def client_token_required(self, call: Call) -> None:
        """401: the sidecar holds the Stripe keys and the app did not present its client token."""
        message = (
            "Answered by the sidecar, not Stripe: the sidecar holds this app's Stripe keys, so "
            "use the sidecar's client token (STRIPE_SIDECAR_CLIENT_TOKEN) as the API key."
        )
        extra = b"Sidecar-Attempts: 0\r\nSidecar-Outcome: client_token_required\r\n"
        self._error(
            call, 401, "client_token_required", message, "invalid_request_error",
            extra if self._sidecar_headers else b"",
        )  # fmt: skip
        call.outcome = "client_token_required"

    def shutting_down(self, call: Call) -> None:
        """The shutdown grace ran out on this call: 503 with its Idempotency-Key, or a cut.

        The request may have reached Stripe, so the app gets the key it was sent with (its own
        or the injected one) to retry or reconcile with; an SDK's retry would not carry an
        injected key, so that answer says not to retry. An answer already under way (streaming)
        can only be cut.
        """
        conn = call.conn
        call.outcome = "shutting_down"
        if call.status:  # the answer's head is out already
            conn.abort()
            return
        key = call.injected if call.injected is not None else call.req.idempotency_key
        extra = b""
        if key is not None:
            extra = b"Idempotency-Key: " + key + b"\r\n"
            if call.injected is not None:
                extra += _NO_RETRY
        if self._sidecar_headers:
            extra += b"Sidecar-Attempts: %d\r\nSidecar-Outcome: shutting_down\r\n" % call.attempt
        message = (
            "The sidecar is shutting down and its grace period ran out before Stripe answered; "
            "the request may or may not have been executed. Retry it with the same "
            "Idempotency-Key, if it has one."
        )
        conn.finish(
            error_response(503, "shutting_down", message, extra=extra, close=True),
            keep_alive=False,
        )
        call.status = 503

    def internal_error(self, call: Call) -> None:
        """A bug cost this request; the connection is closed after the answer."""
        call.conn.finish(
            error_response(
                500, "internal_error", "The sidecar failed to handle this request.", close=True
            ),
            keep_alive=False,
        )
        call.status, call.outcome = 500, "internal_error"

    def _error(
        self, call: Call, status: int, code: str, message: str, type_: str, extra: bytes
    ) -> None:
        keep_alive = call.conn.keeps_alive(call.req)
        extra += self.diagnosis_line
        call.conn.finish(
            error_response(status, code, message, type_=type_, extra=extra, close=not keep_alive),
            keep_alive=keep_alive,
        )
        call.status = status
