"""The accept stage: an asyncio protocol that reads HTTP/1.1 requests with httptools (llhttp).

It is strict at the door: only origin-form targets under Stripe's API prefixes (or the operator
endpoints) get in; ambiguous framing, oversized heads and bodies, slow heads and dot segments are
answered here with a Stripe-shaped error and never forwarded. Everything else becomes a
:class:`Request` handed to the pipeline (``proxy.forward``), which answers through the
connection's ``respond``/``start_stream`` methods.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from proxy.errors import ClientGone, error_body

__all__ = [
    "ClientConnection",
    "Handler",
    "Request",
    "Server",
    "ShutdownReport",
    "error_response",
]

_STATUS_TEXT = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

# Request headers that describe one hop (RFC 9110 7.6.1) or that the sidecar sets itself.
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"expect",
    }
)
# Request headers passed on untouched, spelled as the Stripe SDKs send them: one set look-up
# instead of lower-casing each name. Anything else takes the general path.
_PASS_EXACT = frozenset(
    {
        b"Stripe-Version",
        b"Stripe-Account",
        b"Stripe-Context",
        b"User-Agent",
        b"X-Stripe-Client-User-Agent",
        b"X-Stripe-Client-Telemetry",
        b"Content-Type",
        b"Accept",
        b"Accept-Encoding",
    }
)
# Never dropped even if a Connection header names them: Stripe needs them, and a POST that lost
# its Idempotency-Key here would be retried without one.
_END_TO_END = frozenset({b"idempotency-key", b"authorization", b"content-type"})
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b""})
_API_PREFIXES = ("/v1/", "/v2/", "/oauth/")
# Dot segments (raw or percent-encoded), encoded slashes/backslashes, NUL, backslash: a target
# that a server behind Stripe's edge could normalise into somewhere else is refused outright.
_UNSAFE_PATH = re.compile(
    r"(?:^|/)(?:\.|%2e){1,2}(?:/|$)|%2f|%5c|%00|\\|[\x00-\x20\x7f]", re.IGNORECASE
)


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
    reason = _STATUS_TEXT.get(status, b"Error")
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b%b\r\n%b"
        % (status, reason, len(body), extra, conn, body)
    )


class Request:
    """One request as read at the door; ``head`` holds the header lines to pass upstream."""

    __slots__ = (
        "authorization",
        "body",
        "chunked",
        "content_length",
        "expect_continue",
        "head",
        "http11",
        "idempotency_key",
        "keep_alive",
        "method",
        "path",
        "source",
        "target",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.path = ""
        self.head: list[bytes] = []
        self.body = b""
        self.source: BodyStream | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.keep_alive = True
        self.http11 = True
        self.idempotency_key: bytes | None = None
        self.authorization: bytes | None = None


class BodyStream:
    """A request body forwarded while it arrives; pauses the client when it runs ahead."""

    _HIGH = 256 * 1024

    def __init__(self, conn: ClientConnection, chunked: bool) -> None:
        self._conn = conn
        self.chunked = chunked
        self._parts: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._failed = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, chunk: bytes) -> None:
        """Called by the parser with the next piece."""
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size > self._HIGH:
            self._conn.pause_reading()
        self._wake()

    @property
    def done(self) -> bool:
        """The whole body has arrived (so the connection can carry another request)."""
        return self._done and not self._failed

    def finish(self, failed: bool = False) -> None:
        """The body is complete (or the client went away: ``failed``)."""
        self._done = True
        self._failed = failed
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next piece; ``b""`` at the end. Raises ClientGone if the client went away.

        Safe to cancel (the pipeline races it against the upstream's answer).
        """
        while not self._parts:
            if self._done:
                if self._failed:
                    raise ClientGone("the client went away before sending its whole body")
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = self._parts.popleft()
        self._size -= len(chunk)
        if self._size <= self._HIGH // 2:
            self._conn.resume_reading()
        return chunk


class Handler(Protocol):
    """What the server hands complete requests to."""

    def forward(self, request: Request, conn: ClientConnection) -> Coroutine[Any, Any, None]:
        """Send a Stripe API request upstream and answer the client."""
        ...

    def operator(self, request: Request, path: str) -> bytes | Awaitable[bytes] | None:
        """Answer an operator endpoint (``/health``...), now or later, or None if not one."""
        ...


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request with a ready answer."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """How a shutdown ended: clean when every request finished within the grace period."""

    # Request tasks still running at the grace end: answered 503 sidecar_shutting_down, or cut
    # if their answer was streaming already.
    unfinished: int
    connections_cut: int  # connections still busy without a request task (a stray stream)

    @property
    def clean(self) -> bool:
        """Every request accepted was answered in full."""
        return self.unfinished == 0 and self.connections_cut == 0


class Server:
    """Listens, bounds and tracks connections and request tasks, and shuts down like a sidecar.

    Shutdown has three phases (see :meth:`shutdown`): ``stopping`` (not ready, still serving),
    ``closing`` (listener closed, every answer closes its connection), then the grace end.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int,
        max_body_bytes: int,
        max_buffered_body: int,
        header_timeout: float,
        idle_timeout: float,
        operator_paths: frozenset[str],
        max_connections: int = 1 << 30,
        overflow: int = 64,
        on_overload: Callable[[], None] | None = None,
    ) -> None:
        self.handler = handler
        # Resolved once: called for every request.
        self.forward: Callable[[Request, ClientConnection], Coroutine[Any, Any, None]] = (
            handler.forward
        )
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_buffered_body = max_buffered_body
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.operator_paths = operator_paths
        self.max_connections = max_connections
        self.overflow = overflow
        self._on_overload = on_overload
        self.connections: set[ClientConnection] = set()
        self.overloaded = 0  # connections in ``connections`` over the bound, answered 503
        self.tasks: set[asyncio.Task[None]] = set()  # request tasks not finished yet
        self.stopping = False  # shutdown has begun: /ready says 503, serving goes on
        self.closing = False  # the drain is over: no new connections, answers close theirs
        self._server: asyncio.base_events.Server | None = None
        self._idle_event: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = 1.0
        self.overloaded_answer = error_response(
            503,
            "overloaded",
            f"The sidecar has its maximum of {max_connections} client connections open; this "
            "request was not sent to Stripe. Retry shortly, or reuse connections.",
            extra=b"Retry-After: 1\r\n",
            close=True,
        )

    async def start(self, host: str, port: int) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        # An accept that fails for lack of descriptors never spins or stops the listener:
        # libuv (uvloop) accepts and closes the waiting connections with a spare descriptor,
        # asyncio pauses accepting for a second.
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024
        )
        shortest = min(self.header_timeout, self.idle_timeout)
        self._sweep_every = min(1.0, max(0.02, shortest / 4))
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Expire connections whose head or idle deadline has passed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self.connections if c.deadline and c.deadline <= now]:
            conn.expire()
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    # -- connections and tasks ------------------------------------------------------------------
    def admit(self, conn: ClientConnection) -> bool:
        """Count a new connection in; False if it was answered and closed at once.

        Over ``max_connections`` a connection is still read, so operator endpoints answer and a
        Stripe request gets ``503 sidecar_overloaded``; past that overflow too, the 503 is
        written at once and the connection closed, freeing its descriptor.
        """
        if self.closing:
            conn.close()
            return False
        if len(self.connections) - self.overloaded >= self.max_connections:
            if self._on_overload is not None:
                self._on_overload()
            if self.overloaded >= self.overflow:
                if conn.transport is not None:
                    conn.transport.write(self.overloaded_answer)
                conn.close()
                return False
            conn.overloaded = True
            self.overloaded += 1
        self.connections.add(conn)
        return True

    def release(self, conn: ClientConnection) -> None:
        """A connection closed."""
        if conn in self.connections:
            self.connections.discard(conn)
            if conn.overloaded:
                self.overloaded -= 1

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a request task known until it finishes, so shutdown can answer it."""
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._idle_event is not None:
            self._idle_event.set()

    @property
    def busy(self) -> int:
        """Connections with a request in progress."""
        return sum(1 for c in self.connections if c.busy)

    # -- shutdown ----------------------------------------------------------------------------------
    async def shutdown(
        self, drain_period: float, grace: float, *, hurry: asyncio.Event | None = None
    ) -> ShutdownReport:
        """Shut down like a sidecar; ``grace`` is counted from this call and includes the drain.

        1. ``stopping``: not ready, but accepting and serving as usual for ``drain_period`` (or
           until ``hurry`` is set): the app in the same pod may be finishing its own work.
        2. ``closing``: the listener closes, idle connections close, each answer still to come
           says ``Connection: close``; requests in flight run on until the grace end.
        3. At the grace end every request task still running is cancelled, which the pipeline
           answers ``503 sidecar_shutting_down``; answers still streaming are cut.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        self.stopping = True
        self._idle_event = asyncio.Event()
        drain = min(drain_period, grace)
        if drain > 0:
            waiter = hurry if hurry is not None else asyncio.Event()
            try:
                async with asyncio.timeout(drain):
                    await waiter.wait()
            except TimeoutError:
                pass
        self.stop_accepting()
        while (self.busy or self.tasks) and loop.time() < end:
            self._idle_event.clear()
            try:
                async with asyncio.timeout(max(0.0, end - loop.time())):
                    await self._idle_event.wait()
            except TimeoutError:
                break
        return await self._finish()

    def stop_accepting(self) -> None:
        """End of the drain: close the listener and idle connections."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    async def _finish(self) -> ShutdownReport:
        """The grace end: answer what is left, close every connection, stop the sweeper."""
        left = [t for t in self.tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)
        cut = 0
        for conn in list(self.connections):
            if conn.busy:
                cut += 1  # still answering, though its request task is over
                conn.abort()
            else:
                conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        loop = asyncio.get_running_loop()
        flushed = loop.time() + 1.0
        while self.connections and loop.time() < flushed:
            await asyncio.sleep(0.01)  # let the last answers reach the sockets
        return ShutdownReport(len(left), cut)

    def connection_idle(self) -> None:
        """A connection finished a request (wakes a waiting shutdown)."""
        if self._idle_event is not None:
            self._idle_event.set()


class ClientConnection(asyncio.Protocol):
    """One client connection: parse, police, queue, answer in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._req: Request | None = None
        self._url = b""
        self._head_bytes = 0
        self._body_bytes = 0
        self._body_parts: list[bytes] = []
        self._hop_names: set[bytes] = set()
        self._queue: collections.deque[Request] = collections.deque()
        self._pending_refusal: bytes | None = None
        # One deadline per connection, checked by the server's sweeper: cheaper than a timer
        # handle created and cancelled for every request.
        self.deadline = 0.0  # loop time; 0 = none
        self._deadline_idle = False  # the deadline is the keep-alive idle one, not the head one
        self._reading_paused = False
        self._write_paused = False
        self._streaming: Any = None
        self.busy = False
        self.closed = False
        self.overloaded = False  # over server.max_connections: answered 503, then closed
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self._server.admit(self):
            return
        self.deadline = self._loop.time() + self._server.header_timeout

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except _Reject as rej:
            self._refuse(rej.answer)
        except httptools.HttpParserUpgrade:
            self._refuse(
                error_response(
                    400,
                    "upgrade_refused",
                    "Protocol upgrades are not supported.",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._refuse(cause.answer)
                return
            self._refuse(
                error_response(
                    400,
                    "malformed_request",
                    f"The request could not be parsed as HTTP/1.1: {exc}.",
                    type_="invalid_request_error",
                    close=True,
                )
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._server.release(self)
        self.deadline = 0.0
        req = self._req
        if req is not None and req.source is not None:
            req.source.finish(failed=True)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        streaming = self._streaming
        if streaming is not None:
            streaming.discard()
        if self.busy:
            self.busy = False
            self._server.connection_idle()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._streaming is not None:
            self._streaming.conn.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._streaming is not None:
            self._streaming.conn.resume_reading()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- flow control -------------------------------------------------------------------------
    def pause_reading(self) -> None:
        """Stop reading from the client (body or pipelined requests running ahead)."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the client again."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._req = Request()
        self._url = b""
        self._head_bytes = 0
        self._body_bytes = 0
        self._body_parts = []
        if self._deadline_idle or not self.deadline:
            # Slowloris guard: the whole head must arrive within header_timeout (counted from
            # the connection's start for its first request).
            self.deadline = self._loop.time() + self._server.header_timeout
            self._deadline_idle = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._server.max_header_bytes:
            raise _Reject(self._too_large_head())

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._server.max_header_bytes:
            raise _Reject(self._too_large_head())
        req = self._req
        assert req is not None
        if name in _PASS_EXACT:  # what SDKs send, in the case they send it
            req.head.append(name + b": " + value + b"\r\n")
            return
        lname = name.lower()
        if lname in _DROP:
            if lname == b"content-length":
                if req.content_length is not None:
                    raise _Reject(self._framing("more than one Content-Length"))
                if not value.isdigit():
                    raise _Reject(self._framing("a Content-Length that is not a number"))
                req.content_length = int(value)
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or req.chunked:
                    raise _Reject(self._framing("a Transfer-Encoding other than one 'chunked'"))
                req.chunked = True
            elif lname == b"expect":
                req.expect_continue = value.strip().lower() == b"100-continue"
            elif lname == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")} - _CONNECTION_OPTIONS
                if tokens:
                    # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
                    self._hop_names |= tokens - _END_TO_END
            return
        if lname == b"idempotency-key":
            if not value.strip():
                return  # an empty key is no key: dropped, so the sidecar injects a real one
            req.idempotency_key = value
        elif lname == b"authorization":
            req.authorization = value
        req.head.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self.deadline = 0.0
        req = self._req
        assert req is not None
        parser = self._parser
        req.method = parser.get_method().decode("ascii")
        req.keep_alive = parser.should_keep_alive()
        req.http11 = parser.get_http_version() != "1.0"
        if req.chunked and req.content_length is not None:
            raise _Reject(self._framing("both Content-Length and Transfer-Encoding"))
        if self._hop_names:
            hop = self._hop_names
            req.head = [h for h in req.head if h.split(b":", 1)[0].lower() not in hop]
            self._hop_names = set()
        target = self._url
        req.target = target
        server = self._server
        if req.method == "CONNECT":
            raise _Reject(
                error_response(
                    405,
                    "method_not_allowed",
                    "CONNECT is not supported: this is not an open proxy.",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        if not target.startswith(b"/"):
            raise _Reject(
                error_response(
                    400,
                    "absolute_target_refused",
                    "Only origin-form request targets (/v1/...) are accepted: "
                    "this is not an open proxy.",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        path = target.split(b"?", 1)[0].decode("latin-1")
        req.path = path
        if not path.startswith(_API_PREFIXES) and path not in server.operator_paths:
            raise _Reject(
                error_response(
                    404,
                    "not_a_stripe_path",
                    f"Unrecognized request URL ({req.method}: {_printable(path)}). The sidecar "
                    "forwards only Stripe API paths (/v1/, /v2/, /oauth/).",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        if not path.isprintable() or (
            ("." in path or "%" in path or "\\" in path) and _UNSAFE_PATH.search(path)
        ):
            raise _Reject(
                error_response(
                    400,
                    "unsafe_path",
                    "The request path contains dot segments, encoded slashes or control "
                    "characters, which are refused.",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        length = req.content_length
        if length is not None and length > server.max_body_bytes:
            raise _Reject(
                error_response(
                    413,
                    "body_too_large",
                    f"The request body ({length} bytes) exceeds the sidecar's limit of "
                    f"{server.max_body_bytes} bytes.",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        if req.chunked or (length is not None and length > server.max_buffered_body):
            # Too large (or of unknown size) to hold for a retry: forward while it arrives.
            req.source = BodyStream(self, req.chunked)
            self._enqueue(req)  # _start sends 100 Continue when it is this request's turn
        elif req.expect_continue and not self.busy and length:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        self._body_bytes += len(chunk)
        req = self._req
        assert req is not None
        if self._body_bytes > self._server.max_body_bytes:
            raise _Reject(
                error_response(
                    413,
                    "body_too_large",
                    "The request body exceeds the sidecar's limit of "
                    f"{self._server.max_body_bytes} bytes.",
                    type_="invalid_request_error",
                    close=True,
                )
            )
        if req.source is not None:
            req.source.feed(chunk)
        else:
            self._body_parts.append(chunk)

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        if req.source is not None:
            req.source.finish()
            return
        parts = self._body_parts
        if parts:
            req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._enqueue(req)

    # -- dispatch ---------------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        if self.busy:
            self._queue.append(req)
            self.pause_reading()  # pipelined: hold the rest until the earlier answers are out
            return
        self._start(req)

    def _start(self, req: Request) -> None:
        self.busy = True
        if req.source is not None and not req.source.done:
            # Queued behind another request while reading was paused: read its body now.
            if req.expect_continue:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.resume_reading()
        if req.path in self._server.operator_paths:
            answer = self._server.handler.operator(req, req.path)
            if isinstance(answer, bytes):
                self.finish(answer, keep_alive=req.keep_alive)
                return
            if answer is not None:  # made off the event loop (/metrics): finish when ready
                self._server.track(self._loop.create_task(self._finish_later(answer, req)))
                return
        if self.overloaded:
            self.finish(self._server.overloaded_answer, keep_alive=False)
            return
        self._server.track(self._loop.create_task(self._server.forward(req, self)))

    async def _finish_later(self, answer: Awaitable[bytes], req: Request) -> None:
        self.finish(await answer, keep_alive=req.keep_alive)

    # -- answering (used by the pipeline) ------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def keeps_alive(self, req: Request) -> bool:
        """Whether this connection will carry another request after answering ``req``.

        Decided before the answer's head is written, so a closing answer says so.
        """
        return (
            req.keep_alive
            and not self._server.closing
            and not self.closed
            and (req.source is None or req.source.done)
        )

    def finish(self, data: bytes, *, keep_alive: bool) -> None:
        """Write a complete answer and move on to the next request (or close)."""
        if self.transport is not None:
            self.transport.write(data)
        self._done(keep_alive)

    def start_stream(self, head: bytes) -> None:
        """Write the head of an answer whose body follows through ``stream_*``."""
        self._write(head)

    def set_streaming(self, response: Any) -> None:
        """The upstream answer being streamed (for backpressure and cleanup)."""
        self._streaming = response

    async def drain(self) -> None:
        """Wait until the client has taken what was written (flow control)."""
        if self._write_paused and not self.closed:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def end_stream(self, tail: bytes, *, keep_alive: bool) -> None:
        """The streamed answer is complete."""
        self._streaming = None
        self.finish(tail, keep_alive=keep_alive)

    def abort(self) -> None:
        """The answer cannot be completed: cut the connection so the client sees a broken answer."""
        self._streaming = None
        if self.transport is not None:
            self.transport.abort()

    def _done(self, keep_alive: bool) -> None:
        self.busy = False
        self._server.connection_idle()
        if not keep_alive or self._server.closing or self.closed or self.overloaded:
            self.close()
            return
        if self._queue:
            self._start(self._queue.popleft())
            return
        if self._pending_refusal is not None:
            if self.transport is not None:
                self.transport.write(self._pending_refusal)
            self.close()
            return
        self.resume_reading()
        if self._req is None:
            self.deadline = self._loop.time() + self._server.idle_timeout
            self._deadline_idle = True

    def close(self) -> None:
        """Close after what was written has been sent."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # -- refusals -----------------------------------------------------------------------------
    def _refuse(self, answer: bytes) -> None:
        self.deadline = 0.0
        self._queue.clear()
        req, self._req = self._req, None
        if req is not None and req.source is not None:
            req.source.finish(failed=True)  # the pipeline sending this body must stop too
        if self.busy and req is not None and req.source is None:
            # A request pipelined behind one in progress: answer it after that one's answer.
            self._pending_refusal = answer
            self.pause_reading()
            return
        if self.transport is not None and not self.busy:
            self.transport.write(answer)
        self.close()

    def _too_large_head(self) -> bytes:
        return error_response(
            431,
            "headers_too_large",
            "The request line and headers exceed the sidecar's limit of "
            f"{self._server.max_header_bytes} bytes.",
            type_="invalid_request_error",
            close=True,
        )

    @staticmethod
    def _framing(what: str) -> bytes:
        return error_response(
            400,
            "ambiguous_framing",
            f"The request has {what}; refused because its framing is ambiguous.",
            type_="invalid_request_error",
            close=True,
        )

    def expire(self) -> None:
        """The deadline passed (called by the server's sweeper)."""
        self.deadline = 0.0
        if self._deadline_idle:
            self._deadline_idle = False
            if not self.busy and self._req is None:
                self.close()
            return
        if self._req is not None or not self.busy:
            started = self._req is not None
            self._refuse(
                error_response(
                    408,
                    "header_timeout",
                    "The request headers did not arrive in time.",
                    type_="invalid_request_error",
                    close=True,
                )
                if started
                else b""
            )


def _printable(path: str) -> str:
    return path[:200].encode("ascii", "backslashreplace").decode("ascii")


Forward = Callable[[Request, ClientConnection], Awaitable[None]]
