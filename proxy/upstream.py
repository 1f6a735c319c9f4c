"""The only module that talks to Stripe: keep-alive pools of HTTP/1.1 connections.

Each connection is an asyncio protocol that parses answers with httptools (llhttp). An answer is
buffered up to ``buffer_limit`` bytes so the pipeline can classify it and, if it must, try again;
a larger one is handed over part-read and then streamed to a sink with backpressure both ways.
Transport failures become :class:`~proxy.errors.UpstreamError` here and nowhere else.

A connection is trusted only as far as its answers are exact: a status outside 100-599, a control
character in the reason phrase, a head over ``max_header_bytes`` or ``max_headers`` fields is a
bad answer (:attr:`TransportError.BAD_RESPONSE`); a byte received beyond the framed answer, or
while pooled, closes the connection, so an extra answer can never be read as the next request's.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import math
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from proxy.classify import TransportError
from proxy.deadlines import Canceller, Deadlines
from proxy.errors import ClientGone, UpstreamError

__all__ = ["Connection", "Origin", "Pool", "Response", "Sink", "StreamEnd", "UpstreamError"]

# Connecting failed for want of the sidecar's own resources: not Stripe's fault (nor a reason to
# try again at once).
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Control characters a reason phrase must not carry (RFC 9112 4: HTAB, SP, VCHAR, obs-text only).
_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search

# Response headers that describe one hop, not the message (RFC 9110 7.6.1); never passed on.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
    }
)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one upstream lives: scheme, host, port and the Host header to send."""

    scheme: str
    host: str
    port: int
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Origin:
        """Build an origin from ``https://api.stripe.com`` or ``http://127.0.0.1:12111``."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        header = shown if port == default else f"{shown}:{port}"
        return cls(parts.scheme, host, port, header.encode("ascii"))

    @property
    def url(self) -> str:
        """The origin as a URL, for logs and status."""
        return f"{self.scheme}://{self.host_header.decode()}"


class StreamEnd(enum.StrEnum):
    """How a streamed answer ended; anything but FINISHED means the client got a cut body."""

    FINISHED = "finished"
    UPSTREAM_BROKE_OFF = "upstream_broke_off"  # failed, went silent, or sent a bad frame
    CLIENT_STALLED = "client_stalled"  # took nothing for the write timeout
    CLIENT_GONE = "client_gone"  # the client disconnected


class _BadAnswer(Exception):
    """Raised in a parser callback: the answer breaks HTTP (stops the parse at once)."""


class _Extra(Exception):
    """Raised in a parser callback: bytes beyond the framed answer (the connection is poisoned)."""


class Sink(Protocol):
    """Receives the rest of a streamed answer."""

    def body(self, chunk: bytes) -> None:
        """One more piece of the body."""

    def end(self) -> None:
        """The body is complete."""

    def fail(self) -> None:
        """The upstream broke off mid-body."""


class Response:
    """An upstream answer: status, headers to pass on, and the body read so far."""

    __slots__ = (
        "body",
        "complete",
        "conn",
        "content_length",
        "failed",
        "headers",
        "idempotency_key",
        "rate_limited_reason",
        "reason",
        "request_id",
        "retry_after",
        "should_retry",
        "status",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        # Pass-through header lines, already encoded as b"Name: value\r\n".
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.complete = False
        self.content_length: int | None = None
        self.should_retry: str | None = None
        self.rate_limited_reason: str | None = None
        self.retry_after: str | None = None
        self.request_id: str | None = None
        self.idempotency_key: bytes | None = None
        self.conn: Connection | None = None
        self.failed = False

    def body_bytes(self) -> bytes:
        """The whole buffered body (only meaningful when ``complete``)."""
        body = self.body
        return body[0] if len(body) == 1 else b"".join(body)

    def stream(self, sink: Sink) -> asyncio.Future[StreamEnd]:
        """Deliver the body read so far and then the rest of the answer to ``sink``.

        The future resolves when the stream has ended, with how it ended: record the request
        only then (a cut stream is never a success).
        """
        body, self.body = self.body, []
        for chunk in body:
            sink.body(chunk)
        if self.failed or self.complete:
            done: asyncio.Future[StreamEnd] = asyncio.get_running_loop().create_future()
            if self.failed:
                sink.fail()
                done.set_result(StreamEnd.UPSTREAM_BROKE_OFF)
            else:
                sink.end()
                done.set_result(StreamEnd.FINISHED)
            return done
        assert self.conn is not None
        return self.conn.attach(sink)

    def discard(self) -> None:
        """Abandon an answer; if it is still arriving its connection is closed, never reused.

        Called when the client went away: a stream in progress ends as ``CLIENT_GONE``.
        """
        if not self.complete and self.conn is not None:
            self.conn.drop_stream()


class BodySource(Protocol):
    """A request body that arrives while it is being sent (larger than the replay cap)."""

    chunked: bool

    async def read(self) -> bytes:
        """The next piece, ``b""`` at the end; raises ClientGone if the client went away."""
        ...


class Connection(asyncio.Protocol):
    """One keep-alive connection to an origin and the parser for its answers."""

    __slots__ = (
        "_buffered",
        "_chunked",
        "_drain_waiter",
        "_fields_counted",
        "_framing",
        "_head_request",
        "_head_room",
        "_in_head",
        "_loop",
        "_parser",
        "_pool",
        "_reading_paused",
        "_release_pending",
        "_reset_parser",
        "_resp",
        "_sending",
        "_sink",
        "_stream_end",
        "_transport",
        "_waiter",
        "_write_paused",
        "closed",
        "deadline",
        "idle_since",
        "keep_alive",
        "reused",
        "stream_idle",
    )

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._resp: Response | None = None
        self._buffered = 0
        self._sink: Sink | None = None
        self._stream_end: asyncio.Future[StreamEnd] | None = None
        self._head_request = False
        self._chunked = False
        self._reset_parser = False
        self._in_head = False  # the final answer's head is still arriving
        self._head_room = 0  # bytes the head may still take
        # Fields counted against max_headers besides the lines of the head being read: dropped
        # ones, interim answers', trailers (on_header runs per field, so it keeps no count).
        self._fields_counted = 0
        self._framing = 0  # chunked: bytes received since the last body byte (sizes, trailers)
        self._reading_paused = False
        self._sending = False  # a streamed request body is still being sent
        self._release_pending = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.deadline = 0.0  # clock time by which the current attempt must be answered
        self.stream_idle = 0.0  # while streaming an answer: the longest silence allowed
        self.keep_alive = True

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._resp is None:
            # Nothing was asked (pooled, or the answer already ended): whatever this is, it
            # would be read as the next request's answer. Never reuse the connection.
            self.abort()
            return
        if self._in_head:
            # Counted per read, partial lines included, so a head that never ends is cut at the
            # limit instead of being buffered by the parser.
            room = self._head_room - len(data)
            if room < 0:
                self._feed_past_room(data, self._head_room)
                return
            self._head_room = room
            # What _feed does, inline: an answer usually arrives in this one read.
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
                self._feed_failed(exc)
                return
            if self._in_head and self._head_fields() > self._pool.max_headers:
                self._too_many_fields()  # a head that never ends is cut at the field limit
            return
        if self._chunked:
            # Chunk sizes and trailers are bounded like a head: reset by every body byte.
            self._framing += len(data)
            self._feed(data)
            if self._framing > self._pool.max_header_bytes and self._resp is not None:
                self._fail(
                    TransportError.BAD_RESPONSE,
                    "bad answer from upstream: chunk framing or trailers over the header limit",
                    started=True,
                )
            return
        self._feed(data)

    def _feed_past_room(self, data: bytes, room: int) -> None:
        self._head_room = 0
        self._feed(data[:room])
        if self.closed:
            return
        if self._in_head and self._head_fields() > self._pool.max_headers:
            self._too_many_fields()
            return
        if self._in_head:
            self._fail(
                TransportError.BAD_RESPONSE,
                f"bad answer from upstream: head over {self._pool.max_header_bytes} bytes",
                started=True,
            )
            return
        self.data_received(data[room:])

    def _head_fields(self) -> int:
        """Fields received so far, while a head is read (on_header counts none itself)."""
        assert self._resp is not None  # while a head is read
        return len(self._resp.headers) + self._fields_counted

    def _too_many_fields(self) -> None:
        self._fail(
            TransportError.BAD_RESPONSE,
            f"bad answer from upstream: more than {self._pool.max_headers} header fields",
            started=True,
        )

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            self._feed_failed(exc)

    def _feed_failed(self, exc: Exception) -> None:
        if self._in_head and self._head_fields() > self._pool.max_headers:
            self._too_many_fields()  # what the head broke after that limit is beside the point
        elif isinstance(exc, httptools.HttpParserUpgrade):
            self._fail(
                TransportError.BAD_RESPONSE, "upstream tried to switch protocols", started=True
            )
        else:
            cause = exc.__context__
            if isinstance(cause, _Extra):
                self.abort()  # the answer itself was whole; what followed it poisons the connection
            elif isinstance(cause, _BadAnswer):
                self._fail(
                    TransportError.BAD_RESPONSE, f"bad answer from upstream: {cause}", started=True
                )
            else:
                self._fail(
                    TransportError.BAD_RESPONSE,
                    f"unparseable answer from upstream: {exc}",
                    started=True,
                )

    def eof_received(self) -> bool | None:
        # A body with neither length nor chunking ends at EOF (RFC 9112 6.3); llhttp cannot be
        # told so, so the answer is completed here. Anything else cut short is a broken answer.
        resp = self._resp
        if resp is not None and resp.status and resp.content_length is None and not self._chunked:
            self.keep_alive = False
            self._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)  # the sender sees the failure through its waiter
        self._fail(TransportError.RESET, "upstream closed the connection")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._resp is None:
            # A second answer to one request, caught at its first byte: even a partial one left
            # in the parser would swallow the next request's answer.
            raise _Extra

    def on_status(self, reason: bytes) -> None:
        if self._resp is not None:
            self._resp.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Runs per field, so a head's fields are not counted here: each is a line of the head or
        # counted in _fields_counted, and checked at the head's end and after each read.
        if not self._in_head:
            # A trailer: counted with the head's fields, never a header of the answer.
            self._fields_counted += 1
            if self._fields_counted > self._pool.max_headers:
                raise _BadAnswer(f"more than {self._pool.max_headers} header fields")
            return
        resp = self._resp
        assert resp is not None  # while a head is read
        # Stripe's fields in the case Stripe writes them: a set look-up or a comparison, no
        # lower-casing.
        if name in _PASS_EXACT:
            resp.headers.append(b"".join((name, b": ", value, b"\r\n")))
            return
        if name == b"Request-Id":
            resp.request_id = value.decode("latin-1")
            resp.headers.append(b"".join((name, b": ", value, b"\r\n")))
            return
        lname = b"content-length" if name == b"Content-Length" else name.lower()
        if lname == b"content-length":
            self._fields_counted += 1
            try:
                resp.content_length = int(value)
            except ValueError:
                resp.content_length = None
            return  # the sidecar frames the answer itself
        if lname in _HOP_BY_HOP:
            self._fields_counted += 1
            if lname == b"transfer-encoding":
                self._chunked = True
            return
        noted = _NOTED.get(lname)
        if noted is not None:
            if noted == "idempotency_key":
                resp.idempotency_key = value
            else:
                setattr(resp, noted, value.decode("latin-1"))
        resp.headers.append(b"".join((name, b": ", value, b"\r\n")))

    def on_headers_complete(self) -> None:
        resp = self._resp
        if resp is None:
            return
        counted = self._fields_counted + len(resp.headers)
        if counted > self._pool.max_headers:
            raise _BadAnswer(f"more than {self._pool.max_headers} header fields")
        self._fields_counted = counted  # the head's lines are kept, but trailers count on
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            raise _BadAnswer(f"status {status:03d} is outside 100-599")
        reason = resp.reason
        if reason != b"OK" and _BAD_REASON(reason) is not None:
            raise _BadAnswer("a control character in the reason phrase")
        resp.status = status
        if status < 200:
            # Interim answer (100 Continue, 103 Early Hints): wait for the final one.
            self._resp = Response()
            return
        self._in_head = False
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_request:
            # llhttp cannot be told a HEAD answer has no body; end it here and parse afresh.
            self._reset_parser = True
            self._finish()

    def on_body(self, chunk: bytes) -> None:
        self._framing = 0
        sink = self._sink
        if sink is not None:
            if self.deadline and not self._reading_paused:
                self.deadline = self._pool.clock() + self.stream_idle  # a byte came: not stuck
            sink.body(chunk)
            return
        resp = self._resp
        if resp is None:
            raise _Extra  # a body after a HEAD answer's head
        resp.body.append(chunk)
        buffered = self._buffered = self._buffered + len(chunk)
        if buffered > self._pool.buffer_limit and self._waiter is not None:
            # Too large to hold for a retry: hand it over now and stream the rest.
            resp.conn = self
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(resp)

    def on_message_complete(self) -> None:
        resp = self._resp
        if resp is None:
            return  # a HEAD answer already finished at its head (and llhttp saw no body)
        if resp.status < 200 or self._reset_parser:
            return  # an interim answer (the final one follows)
        waiter = self._waiter
        if (
            waiter is None
            or self._sink is not None
            or self._sending
            or self._reading_paused
            or not self.keep_alive  # also False once closed
        ):
            self._finish()
            return
        try:
            waiter.set_result(resp)  # its callbacks run later, when all below is done
        except asyncio.InvalidStateError:
            self._finish()  # the attempt was cancelled: nobody takes the answer
            return
        # The usual end, a buffered answer on a reusable connection: what _finish, _release and
        # Pool.release do, inline (three calls fewer per request).
        self.deadline = 0.0
        self._resp = self._waiter = None
        resp.complete = True
        pool = self._pool
        idle = pool._idle
        if len(idle) < pool.max_idle:
            self.idle_since = pool.clock()
            idle.append(self)
        else:
            self.abort()

    # -- the exchange -------------------------------------------------------------------------
    def _finish(self) -> None:
        self.deadline = 0.0
        resp, self._resp = self._resp, None
        sink, self._sink = self._sink, None
        if resp is not None:
            resp.complete = True
        if self._reset_parser:
            self._parser = httptools.HttpResponseParser(self)
            self._reset_parser = False
        waiter, self._waiter = self._waiter, None
        if sink is not None:
            self._release()
            sink.end()
            self._end_stream(StreamEnd.FINISHED)
        elif waiter is not None and not waiter.done():
            self._release()
            assert resp is not None
            waiter.set_result(resp)
        elif resp is not None and resp.conn is self:
            self._release()  # handed over for streaming; the whole body is already in resp.body
        else:
            self.abort()

    def _release(self) -> None:
        if self._sending:
            # The answer came before the request body was all sent: the connection goes back
            # to the pool only if send_streaming gets the body out, else it is closed.
            self._release_pending = True
            return
        if self.keep_alive and not self.closed:
            if self._reading_paused:
                self.resume_reading()  # a slow client paused it
            self._pool.release(self)
        else:
            self.abort()

    def _fail(
        self,
        kind: TransportError,
        message: str,
        *,
        caused_by_client: bool = False,
        started: bool = False,
        end: StreamEnd = StreamEnd.UPSTREAM_BROKE_OFF,
    ) -> None:
        self.deadline = 0.0
        resp = self._resp
        if resp is not None:
            started = started or resp.status != 0
            resp.failed = True
        self._resp = None
        self._in_head = False
        waiter, self._waiter = self._waiter, None
        sink, self._sink = self._sink, None
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                UpstreamError(
                    kind, message, response_started=started, caused_by_client=caused_by_client
                )
            )
        if sink is not None:
            sink.fail()
            self._end_stream(end)

    def _end_stream(self, end: StreamEnd) -> None:
        done, self._stream_end = self._stream_end, None
        if done is not None and not done.done():
            done.set_result(end)

    def abort(self) -> None:
        """Close the connection at once; it is never reused."""
        self.closed = True
        self.keep_alive = False
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def expire(self) -> None:
        """The deadline passed: the upstream went silent, or the client stopped reading."""
        if self._reading_paused and self._sink is not None:
            # Only the client's backpressure stopped the reads: not a silence of Stripe's.
            self._fail(
                TransportError.RESET,
                "the client took nothing of the answer for the write timeout",
                caused_by_client=True,
                end=StreamEnd.CLIENT_STALLED,
            )
            return
        self._fail(TransportError.TIMEOUT, "upstream did not answer in time")

    def attach(self, sink: Sink) -> asyncio.Future[StreamEnd]:
        """Send the rest of the answer being read to ``sink``; resolves when it has ended."""
        self._sink = sink
        if self._reading_paused and self.deadline:
            self.deadline = self._pool.clock() + self._pool.stall_timeout  # paused before attach
        done = self._stream_end = self._loop.create_future()
        return done

    def drop_stream(self) -> None:
        """The client went away: a stream in progress ends as ``CLIENT_GONE``; close at once."""
        self._sink = None
        self._end_stream(StreamEnd.CLIENT_GONE)
        self.abort()

    def pause_reading(self) -> None:
        """Backpressure from the client side: stop reading the upstream for now.

        While paused, the silence timer of a streamed answer does not run (the upstream is not
        being read); the client's stall is bounded by the pool's ``stall_timeout`` instead.
        """
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
            if self.deadline:
                self.deadline = self._pool.clock() + self._pool.stall_timeout

    def resume_reading(self) -> None:
        """The client side drained: read the upstream again."""
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            if self.deadline:
                self.deadline = self._pool.clock() + self.stream_idle

    def _begin(self, head_request: bool) -> asyncio.Future[Response]:
        self._resp = Response()
        self._buffered = 0
        self._chunked = False
        self._head_request = head_request
        self._in_head = True
        pool = self._pool
        self._head_room = pool.max_header_bytes
        self._fields_counted = 0
        self._framing = 0
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def send(self, head: bytes, body: bytes | None, head_request: bool) -> asyncio.Future[Response]:
        """Write a request with a buffered body; the future resolves with the answer."""
        transport = self._transport
        if transport is None:
            # Closed since it was handed out (the upstream spoke out of turn, or hung up).
            waiter: asyncio.Future[Response] = self._loop.create_future()
            waiter.set_exception(
                UpstreamError(TransportError.RESET, "upstream closed the connection")
            )
            return waiter
        # What _begin does, inline (a call fewer per request).
        self._resp = Response()
        self._buffered = 0
        self._chunked = False
        self._head_request = head_request
        self._in_head = True
        self._head_room = self._pool.max_header_bytes
        self._fields_counted = 0
        self._framing = 0
        waiter = self._waiter = self._loop.create_future()
        transport.write(head + body if body else head)
        return waiter

    async def send_streaming(self, head: bytes, source: BodySource, head_request: bool) -> Response:
        """Write a request whose body is still arriving, with backpressure both ways.

        Each read of the body races the upstream's answer: an early answer (or the attempt's
        deadline) stops the sending at once. The connection is pooled afterwards only if the
        whole body went out. The attempt's deadline runs only while Stripe is the one holding
        things up (not taking the body, or not answering once it is all sent): a slow but steady
        upload is never cut for taking longer than an attempt. While a piece is awaited from the
        client, the door's body timeouts bound it (``server.body_timeout``/``body_deadline``)
        and fail the body with the client as the cause.
        """
        assert self._transport is not None
        answer_within = self.deadline - self._pool.clock() if self.deadline else 0.0
        waiter = self._begin(head_request)
        self._transport.write(head)
        self._sending = True
        body_sent = False
        reading: asyncio.Future[bytes] | None = None
        try:
            while not waiter.done():
                if answer_within:
                    self.deadline = math.inf  # the client's turn: never Stripe's time
                reading = asyncio.ensure_future(source.read())
                await asyncio.wait((reading, waiter), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    break  # answered, failed or timed out before the body was all sent
                chunk = reading.result()
                reading = None
                transport = self._transport
                if transport is None:
                    break
                if not chunk:
                    if source.chunked:
                        transport.write(b"0\r\n\r\n")
                    body_sent = True
                    break
                if source.chunked:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    if answer_within:
                        self.deadline = self._pool.clock() + answer_within  # Stripe is not reading
                    drain = self._drain_waiter = self._loop.create_future()
                    await asyncio.wait((drain, waiter), return_when=asyncio.FIRST_COMPLETED)
        except ClientGone as exc:
            self._fail(TransportError.RESET, str(exc), caused_by_client=True)
        finally:
            self._after_streaming(reading, waiter, body_sent, answer_within)
        return await waiter

    def _after_streaming(
        self,
        reading: asyncio.Future[bytes] | None,
        waiter: asyncio.Future[Response],
        body_sent: bool,
        answer_within: float,
    ) -> None:
        if reading is not None and not reading.done():
            reading.cancel()
            # The client's body stalled while the upstream failed or timed out.
            failure = waiter.exception() if waiter.done() else None
            if isinstance(failure, UpstreamError):
                failure.caused_by_client = True
        if body_sent and answer_within and not waiter.done():
            self.deadline = self._pool.clock() + answer_within  # now it is Stripe's turn
        self._sending = False
        if self._release_pending:
            self._release_pending = False
            if body_sent:
                self._release()
            else:
                self.abort()  # the rest of the body would be read as the next request


# Headers the pipeline reads (besides passing them on), by lower-case name.
_NOTED = {
    b"stripe-should-retry": "should_retry",
    b"stripe-rate-limited-reason": "rate_limited_reason",
    b"retry-after": "retry_after",
    b"request-id": "request_id",
    b"idempotency-key": "idempotency_key",
}
# Headers passed on untouched, spelled as Stripe (and common servers) send them: one set look-up
# instead of lower-casing each name. Anything else takes the general path.
_PASS_EXACT = frozenset(
    {
        b"Server",
        b"Date",
        b"Content-Type",
        b"Content-Encoding",
        b"Cache-Control",
        b"Vary",
        b"ETag",
        b"Stripe-Version",
        b"Original-Request",
        b"Idempotent-Replayed",
        b"Stripe-Notice",
        b"Strict-Transport-Security",
        b"X-Content-Type-Options",
        b"Content-Security-Policy",
        b"Cross-Origin-Opener-Policy-Report-Only",
        b"Report-To",
        b"Reporting-Endpoints",
        b"Access-Control-Allow-Credentials",
        b"Access-Control-Allow-Methods",
        b"Access-Control-Allow-Origin",
        b"Access-Control-Expose-Headers",
        b"Access-Control-Max-Age",
        b"X-Stripe-Priority-Routing-Enabled",
        b"X-Stripe-Routing-Context-Priority-Tier",
        b"X-Wc",
    }
)


class Pool:
    """Idle keep-alive connections to one origin, and the way to get a fresh one."""

    __slots__ = (
        "_create_connection",
        "_idle",
        "_ssl",
        "buffer_limit",
        "clock",
        "connect_timeout",
        "deadlines",
        "idle_timeout",
        "loop",
        "max_header_bytes",
        "max_headers",
        "max_idle",
        "origin",
        "stall_timeout",
    )

    def __init__(
        self,
        origin: Origin,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_idle: int,
        buffer_limit: int,
        max_header_bytes: int = 64 << 10,
        max_headers: int = 100,
        stall_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        deadlines: Deadlines,
    ) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.buffer_limit = buffer_limit
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        # How long a client may take nothing of a streamed answer (its upstream is not read).
        self.stall_timeout = stall_timeout
        # The one place a socket is opened (a test seam for local resource exhaustion).
        self._create_connection = self.loop.create_connection
        # Attempt, stream and connect deadlines are swept by the sidecar's one Deadlines, on its
        # injected clock (pool idle times are read from the same clock).
        self.deadlines = deadlines
        self.clock = self.deadlines.clock
        self._idle: collections.deque[Connection] = collections.deque()
        self._ssl: ssl.SSLContext | None = None
        if origin.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()

    async def acquire(self) -> Connection:
        """A live idle connection (most recently used first), or a new one."""
        return self.take_idle() or await self.connect()

    def take_idle(self) -> Connection | None:
        """A live idle connection (most recently used first), or None: no coroutine needed."""
        idle = self._idle
        if not idle:
            return None
        now = self.clock()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self) -> Connection:
        """Open a new connection (TLS verified for https)."""
        origin = self.origin
        opening = asyncio.ensure_future(
            self._create_connection(
                lambda: Connection(self),
                origin.host,
                origin.port,
                ssl=self._ssl,
                server_hostname=origin.host if self._ssl else None,
            )
        )
        timer = Canceller(opening)
        self.deadlines.arm(timer, self.connect_timeout)
        try:
            _, proto = await opening
        except asyncio.CancelledError:
            if not timer.fired:
                opening.cancel()  # the request itself was cancelled (shutdown): not a time-out
                raise
            raise UpstreamError(
                TransportError.CONNECT, f"connect to {origin.url} timed out", step="connect"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(
                TransportError.CONNECT, f"TLS with {origin.url} failed: {exc.reason}", step="tls"
            ) from None
        except OSError as exc:
            if exc.errno in _LOCAL_ERRNOS:
                # The sidecar's own file descriptors or memory ran out: nothing about Stripe.
                raise UpstreamError(
                    TransportError.LOCAL_RESOURCES,
                    f"no local resources to connect to {origin.url}: {exc.strerror or exc}",
                ) from None
            raise UpstreamError(
                TransportError.CONNECT,
                f"cannot connect to {origin.url}: {exc.strerror or exc}",
                step="dns" if isinstance(exc, socket.gaierror) else "connect",
            ) from None
        finally:
            self.deadlines.disarm(timer)
        return proto

    def release(self, conn: Connection) -> None:
        """Give a connection back after a complete exchange."""
        if len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = self.clock()
        self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (at shutdown, or to reset after network trouble)."""
        while self._idle:
            self._idle.pop().abort()

    @property
    def idle_count(self) -> int:
        """How many idle connections are pooled."""
        return sum(1 for c in self._idle if not c.closed)
