"""The only module that talks to Stripe: keep-alive pools of HTTP/1.1 connections.

Each connection is an asyncio protocol that parses answers with httptools (llhttp). An answer is
buffered up to ``buffer_limit`` bytes so the pipeline can classify it and, if it must, try again;
a larger one is handed over part-read and then streamed to a sink with backpressure both ways.
Transport failures become :class:`~proxy.errors.UpstreamError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from proxy.classify import TransportError
from proxy.errors import ClientGone, UpstreamError

__all__ = ["Connection", "Origin", "Pool", "Response", "Sink", "UpstreamError"]

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
        "resent",
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
        self.resent = False  # sent a second time after a stale pooled connection broke

    def body_bytes(self) -> bytes:
        """The whole buffered body (only meaningful when ``complete``)."""
        body = self.body
        return body[0] if len(body) == 1 else b"".join(body)

    def stream(self, sink: Sink) -> None:
        """Deliver the body read so far and then the rest of the answer to ``sink``."""
        body, self.body = self.body, []
        for chunk in body:
            sink.body(chunk)
        if self.failed:
            sink.fail()
        elif self.complete:
            sink.end()
        else:
            assert self.conn is not None
            self.conn.attach(sink)

    def discard(self) -> None:
        """Abandon an answer; if it is still arriving its connection is closed, never reused."""
        if not self.complete and self.conn is not None:
            self.conn.abort()


class BodySource(Protocol):
    """A request body that arrives while it is being sent (larger than the replay cap)."""

    chunked: bool

    async def read(self) -> bytes:
        """The next piece, ``b""`` at the end; raises ClientGone if the client went away."""
        ...


class Connection(asyncio.Protocol):
    """One keep-alive connection to an origin and the parser for its answers."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._resp: Response | None = None
        self._buffered = 0
        self._sink: Sink | None = None
        self._head_request = False
        self._chunked = False
        self._reset_parser = False
        self._reading_paused = False
        self._sending = False  # a streamed request body is still being sent
        self._release_pending = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.deadline = 0.0  # loop time by which the current attempt must be answered
        self.stream_idle = 0.0  # while streaming an answer: the longest silence allowed
        self.keep_alive = True

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError.RESET, f"unparseable answer from upstream: {exc}")
        except httptools.HttpParserUpgrade:
            self._fail(TransportError.RESET, "upstream tried to switch protocols")

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
    def on_status(self, reason: bytes) -> None:
        if self._resp is not None:
            self._resp.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self._resp
        if resp is None:
            return
        if name in _PASS_EXACT:  # most of Stripe's headers, in the case Stripe writes them
            resp.headers.append(name + b": " + value + b"\r\n")
            return
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == b"transfer-encoding":
                self._chunked = True
            return
        if lname == b"content-length":
            try:
                resp.content_length = int(value)
            except ValueError:
                resp.content_length = None
            return  # the sidecar frames the answer itself
        noted = _NOTED.get(lname)
        if noted is not None:
            if noted == "idempotency_key":
                resp.idempotency_key = value
            else:
                setattr(resp, noted, value.decode("latin-1"))
        resp.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        resp = self._resp
        if resp is None:
            return
        resp.status = self._parser.get_status_code()
        if 100 <= resp.status < 200:
            # Interim answer (100 Continue, 103 Early Hints): wait for the final one.
            self._resp = Response()
            return
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_request:
            # llhttp cannot be told a HEAD answer has no body; end it here and parse afresh.
            self._reset_parser = True
            self._finish()

    def on_body(self, chunk: bytes) -> None:
        sink = self._sink
        if sink is not None:
            if self.deadline:
                self.deadline = self._loop.time() + self.stream_idle  # a byte came: not stuck
            sink.body(chunk)
            return
        resp = self._resp
        if resp is None:
            return
        resp.body.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > self._pool.buffer_limit and self._waiter is not None:
            # Too large to hold for a retry: hand it over now and stream the rest.
            resp.conn = self
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(resp)

    def on_message_complete(self) -> None:
        if self._resp is None:
            return  # a HEAD answer already finished at its head (and llhttp saw no body)
        if self._resp is not None and 100 <= self._parser.get_status_code() < 200:
            return
        if self._reset_parser:
            return
        self._finish()

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
            self.resume_reading()  # a slow client may have paused it
            self._pool.release(self)
        else:
            self.abort()

    def _fail(self, kind: TransportError, message: str, *, caused_by_client: bool = False) -> None:
        self.deadline = 0.0
        resp = self._resp
        started = resp is not None and resp.status != 0
        if resp is not None:
            resp.failed = True
        self._resp = None
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

    def abort(self) -> None:
        """Close the connection at once; it is never reused."""
        self.closed = True
        self.keep_alive = False
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def on_timeout(self) -> None:
        """The attempt ran out of time: fail it and drop the connection."""
        self._fail(TransportError.TIMEOUT, "upstream did not answer in time")

    def attach(self, sink: Sink) -> None:
        """Send the rest of the answer being read to ``sink`` as it arrives."""
        self._sink = sink

    def pause_reading(self) -> None:
        """Backpressure from the client side: stop reading the upstream for now."""
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """The client side drained: read the upstream again."""
        if self._transport is not None and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def send(self, head: bytes, body: bytes | None, head_request: bool) -> asyncio.Future[Response]:
        """Write a request with a buffered body; the future resolves with the answer."""
        assert self._transport is not None
        self._resp = Response()
        self._buffered = 0
        self._chunked = False
        self._head_request = head_request
        waiter = self._loop.create_future()
        self._waiter = waiter
        if body:
            self._transport.write(head + body)
        else:
            self._transport.write(head)
        return waiter

    async def send_streaming(self, head: bytes, source: BodySource, head_request: bool) -> Response:
        """Write a request whose body is still arriving, with backpressure both ways.

        Each read of the body races the upstream's answer: an early answer (or the attempt's
        deadline) stops the sending at once. The connection is pooled afterwards only if the
        whole body went out.
        """
        assert self._transport is not None
        self._resp = Response()
        self._buffered = 0
        self._chunked = False
        self._head_request = head_request
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        self._transport.write(head)
        self._sending = True
        body_sent = False
        reading: asyncio.Future[bytes] | None = None
        try:
            while not waiter.done():
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
                    drain = self._drain_waiter = self._loop.create_future()
                    await asyncio.wait((drain, waiter), return_when=asyncio.FIRST_COMPLETED)
        except ClientGone as exc:
            self._fail(TransportError.RESET, str(exc), caused_by_client=True)
        finally:
            if reading is not None and not reading.done():
                reading.cancel()
                # The client's body stalled while the upstream failed or timed out.
                failure = waiter.exception() if waiter.done() else None
                if isinstance(failure, UpstreamError):
                    failure.caused_by_client = True
            self._sending = False
            if self._release_pending:
                self._release_pending = False
                if body_sent:
                    self._release()
                else:
                    self.abort()  # the rest of the body would be read as the next request
        return await waiter


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

    def __init__(
        self,
        origin: Origin,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_idle: int,
        buffer_limit: int,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.buffer_limit = buffer_limit
        self._clock = clock
        self._idle: collections.deque[Connection] = collections.deque()
        self._ssl: ssl.SSLContext | None = None
        if origin.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self.opened = 0

    async def acquire(self) -> Connection:
        """A live idle connection (most recently used first), or a new one."""
        idle = self._idle
        now = self._clock()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return await self.connect()

    async def connect(self) -> Connection:
        """Open a new connection (TLS verified for https)."""
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: Connection(self),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl else None,
                )
        except TimeoutError:
            raise UpstreamError(
                TransportError.CONNECT, f"connect to {origin.url} timed out"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(
                TransportError.CONNECT, f"TLS with {origin.url} failed: {exc.reason}"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                TransportError.CONNECT, f"cannot connect to {origin.url}: {exc.strerror or exc}"
            ) from None
        self.opened += 1
        return proto

    def release(self, conn: Connection) -> None:
        """Give a connection back after a complete exchange."""
        if len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = self._clock()
        self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (at shutdown, or to reset after network trouble)."""
        while self._idle:
            self._idle.pop().abort()

    @property
    def idle_count(self) -> int:
        """How many idle connections are pooled."""
        return sum(1 for c in self._idle if not c.closed)
