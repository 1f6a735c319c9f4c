"""The accept stage: an asyncio protocol that reads HTTP/1.1 requests with httptools (llhttp).

It is strict at the door: the checks themselves are the pure functions of ``proxy.door``
(versions, CONNECT, absolute targets, the path allowlist, dot segments and their encodings,
ambiguous framing); this module applies them while parsing, bounds what a client can make it
hold (heads and trailers by ``max_header_bytes`` even while a line is incomplete, bodies by
``max_body_bytes``, answers not yet taken by the client by the transport's high-water mark) and
how long a client may stall (head, body, keep-alive idle). Everything else becomes a
:class:`Request` handed to the pipeline (``proxy.forward``), which answers through the
connection's ``finish``/``start_stream`` methods, in order, one request at a time.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Container, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from proxy import door
from proxy.deadlines import Deadlines
from proxy.errors import ClientGone
from proxy.replies import error_response
from proxy.reqtask import RequestTask

__all__ = ["BodyStream", "ClientConnection", "Handler", "Request", "Server", "ShutdownReport"]

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
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _MethodNames(dict[bytes, str]):
    """httptools' method names as text, each decoded once (llhttp knows a fixed few dozen)."""

    def __missing__(self, raw: bytes) -> str:
        name = self[raw] = raw.decode("ascii")
        return name


_METHODS = _MethodNames()

# What the connection's one deadline currently means.
_NO_DEADLINE, _HEAD, _IDLE, _BODY, _LINGER, _WRITE = 0, 1, 2, 3, 4, 5
_WAITING_FOR = {_IDLE: "idle", _BODY: "body", _LINGER: "linger", _WRITE: "client_to_read"}
# After the last answer on a connection whose client may still be sending (a refusal, a stray
# byte after a closing request), the sidecar half-closes and reads (discarding) for up to this
# long before closing: closing with unread input makes the kernel send a reset, which can
# destroy the answer before the client reads it (nginx's lingering close; it waits 5 s).
_LINGER_SECONDS = 2.0


class Request:
    """One request as read at the door; ``head`` holds the header lines to pass upstream."""

    __slots__ = (
        "auth_at",
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
        # Where the Authorization line is in ``head`` (-1: none; -2: several), so a held key
        # can replace it in place.
        self.auth_at = -1


class BodyStream:
    """A request body forwarded while it arrives; pauses the client when it runs ahead.

    If the door refuses the body mid-stream (bad chunk framing, over ``max_body_bytes``, the
    client stalled), :meth:`fail` records the ready answer in ``refusal`` (and its status in
    ``refusal_status``): the reader sees :class:`~proxy.errors.ClientGone`, abandons its upstream
    attempt, and the pipeline writes that answer, once and in order.
    """

    _HIGH = 256 * 1024

    def __init__(self, conn: ClientConnection, chunked: bool) -> None:
        self._conn = conn
        self.chunked = chunked
        self._parts: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._failed = False
        self._full = False
        self._waiter: asyncio.Future[None] | None = None
        self.refusal: bytes | None = None
        self.refusal_status = 0

    def feed(self, chunk: bytes) -> None:
        """Called by the parser with the next piece."""
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size > self._HIGH and not self._full:
            self._full = True
            self._conn.body_backlog(True)
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

    def fail(self, answer: bytes, status: int) -> None:
        """The door refused the rest of this body; ``answer`` is what the client must get."""
        self.refusal = answer
        self.refusal_status = status
        self.finish(failed=True)

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
        if self._full and self._size <= self._HIGH // 2:
            self._full = False
            self._conn.body_backlog(False)
        return chunk


Forward = Callable[["Request", "ClientConnection"], Coroutine[Any, Any, None]]


class Handler(Protocol):
    """Answers the operator endpoints (Stripe API requests go to the ``forward`` callable)."""

    def operator(self, request: Request, path: str) -> bytes | Awaitable[bytes] | None:
        """Answer an operator endpoint (``/health``...), now or later, or None if not one."""
        ...


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request with a ready answer."""

    def __init__(self, answer: bytes, status: int) -> None:
        self.answer = answer
        self.status = status


def _refusal(r: door.Refusal) -> _Reject:
    return _Reject(
        error_response(r.status, r.code, r.message, type_="invalid_request_error", close=True),
        r.status,
    )


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

    __slots__ = (
        "_on_overload",
        "_server",
        "body_deadline",
        "body_timeout",
        "clock",
        "closing",
        "connections",
        "deadlines",
        "forward",
        "handler",
        "header_timeout",
        "idle_event",
        "idle_timeout",
        "max_body_bytes",
        "max_buffered_body",
        "max_connections",
        "max_header_bytes",
        "operator_paths",
        "overflow",
        "overloaded",
        "overloaded_answer",
        "stopping",
        "tasks",
        "trailer_timeout",
        "write_timeout",
    )

    def __init__(
        self,
        handler: Handler,
        forward: Forward,
        *,
        max_header_bytes: int,
        max_body_bytes: int,
        max_buffered_body: int,
        header_timeout: float,
        idle_timeout: float,
        operator_paths: Container[str],
        body_timeout: float = 10.0,
        body_deadline: float = 300.0,
        write_timeout: float = 60.0,
        max_connections: int = 1 << 30,
        overflow: int = 64,
        on_overload: Callable[[], None] | None = None,
        deadlines: Deadlines,
    ) -> None:
        self.handler = handler
        # Head, body, idle and linger deadlines are on the sidecar's one clock and sweeper.
        self.deadlines = deadlines
        self.clock = self.deadlines.clock
        self.connections: set[ClientConnection] = set()
        self.deadlines.watch(self.connections)
        self.forward = forward  # the pipeline: called once per Stripe API request
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_buffered_body = max_buffered_body
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.operator_paths = operator_paths
        self.body_timeout = body_timeout
        self.body_deadline = body_deadline
        # A client that takes nothing of its answers for this long is cut off.
        self.write_timeout = write_timeout
        # A chunk header (possibly the last one, before trailers) must be followed in time.
        self.trailer_timeout = min(header_timeout, body_timeout)
        self.max_connections = max_connections
        self.overflow = overflow
        self._on_overload = on_overload
        self.overloaded = 0  # connections in ``connections`` over the bound, answered 503
        self.tasks: set[asyncio.Task[None] | RequestTask] = set()  # request tasks not finished
        self.stopping = False  # shutdown has begun: /ready says 503, serving goes on
        self.closing = False  # the drain is over: no new connections, answers close theirs
        self._server: asyncio.base_events.Server | None = None
        # Set while a shutdown waits for requests to end; every ended request sets it.
        # Set while a shutdown waits for requests to end: each ended request sets it.
        self.idle_event: asyncio.Event | None = None
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
        return int(self._server.sockets[0].getsockname()[1])

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
        task.add_done_callback(self.task_done)

    def task_done(self, task: asyncio.Task[None] | RequestTask) -> None:
        """A tracked task ended: forget it (and wake a waiting shutdown)."""
        self.tasks.discard(task)
        if self.idle_event is not None:
            self.idle_event.set()

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
        self.idle_event = asyncio.Event()
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
            self.idle_event.clear()
            try:
                async with asyncio.timeout(max(0.0, end - loop.time())):
                    await self.idle_event.wait()
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
            await asyncio.wait([asyncio.ensure_future(t) for t in left], timeout=1.0)
        cut = 0
        for conn in list(self.connections):
            if conn.busy:
                cut += 1  # still answering, though its request task is over
                conn.abort()
            else:
                conn.close()
        loop = asyncio.get_running_loop()
        flushed = loop.time() + 1.0
        while self.connections and loop.time() < flushed:
            await asyncio.sleep(0.01)  # let the last answers reach the sockets
        return ShutdownReport(len(left), cut)

    def connection_idle(self) -> None:
        """A connection finished a request (wakes a waiting shutdown)."""
        if self.idle_event is not None:
            self.idle_event.set()


class ClientConnection(asyncio.Protocol):
    """One client connection: parse, police, queue, answer in order."""

    __slots__ = (
        "_body_by",
        "_body_bytes",
        "_body_full",
        "_body_parts",
        "_current",
        "_deadline_kind",
        "_drain_waiters",
        "_eof",
        "_head",
        "_head_bytes",
        "_hop_names",
        "_in_trailers",
        "_input_done",
        "_loop",
        "_parser",
        "_pending_refusal",
        "_queue",
        "_reading_paused",
        "_req",
        "_server",
        "_stalled_bytes",
        "_streaming",
        "_summed_bytes",
        "_summed_lines",
        "_url",
        "_write_paused",
        "busy",
        "closed",
        "deadline",
        "overloaded",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._req: Request | None = None  # the request being parsed
        self._current: Request | None = None  # the request being answered
        self._url = b""
        # The head's size is its kept lines (self._head) plus what the callbacks count here: the
        # request line and the fields not kept (or, after the head, the trailers).
        self._head_bytes = 0
        self._summed_lines = 0  # the head's first lines, whose bytes are in _summed_bytes
        self._summed_bytes = 0
        self._stalled_bytes = 0  # bytes fed since a callback last saw any progress
        self._body_bytes = 0
        self._body_parts: list[bytes] = []  # the buffered body being read (emptied when taken)
        self._in_trailers = False
        self._hop_names: set[bytes] | None = None
        self._head: list[bytes] = []  # the request being parsed's req.head, read without it
        self._queue: collections.deque[Request] = collections.deque()
        self._pending_refusal: bytes | None = None
        # One deadline per connection, checked by the server's sweeper: cheaper than a timer
        # handle created and cancelled for every request. ``_deadline_kind`` says which one.
        self.deadline = 0.0  # clock time (the sidecar's one clock); 0 = none
        self._deadline_kind = _NO_DEADLINE
        self._body_by = 0.0  # clock time by which the body being read must be complete
        self._reading_paused = False
        self._write_paused = False
        self._body_full = False  # the streamed body being read is not consumed fast enough
        self._input_done = False  # read no more: the last request was read, or refused
        self._eof = False  # the client half-closed
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
        self.deadline = self._server.clock() + self._server.header_timeout
        self._deadline_kind = _HEAD

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return  # after a closing request or a refusal nothing more is read
        req = self._req
        seen = self._head_bytes + self._body_bytes + len(self._head)
        try:
            self._parser.feed_data(data)
        except _Reject as rej:
            self._refuse(rej.answer, rej.status)
            return
        except httptools.HttpParserUpgrade:
            self._refuse(*_upgrade_refused())
            return
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        if (
            req is not None
            and req is self._req
            and self._head_bytes + self._body_bytes + len(self._head) == seen
        ):
            # Nothing completed: httptools is holding a partial header or trailer line (or a
            # chunk-size line). Count it, or a line that never ends would grow without bound.
            self._stalled_bytes += len(data)
        else:
            self._stalled_bytes = 0
        if self._in_trailers:  # the head is complete (checked then): trailers, or no request
            if self._stalled_bytes + self._head_bytes > self._server.max_header_bytes:
                self._refuse(self._too_large_head(), 431)
        elif self._stalled_bytes + self._head_size() > self._server.max_header_bytes:
            self._refuse(self._too_large_head(), 431)

    def _head_size(self) -> int:
        """The bytes of the head being read so far (each kept line summed once)."""
        head, summed = self._head, self._summed_lines
        if len(head) > summed:
            self._summed_bytes += sum(map(len, head[summed:]))
            self._summed_lines = len(head)
        return self._summed_bytes + self._head_bytes

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__
        if isinstance(cause, _Reject):
            self._refuse(cause.answer, cause.status)
            return
        if self._input_done:
            return  # bytes after a closing request: ignored, the answer still goes out
        message = f"The request could not be parsed as HTTP/1.1: {exc}."
        self._refuse(
            error_response(
                400, "malformed_request", message, type_="invalid_request_error", close=True
            ),
            400,
        )

    def eof_received(self) -> bool | None:
        # A client may half-close once its request is sent (shutdown(SHUT_WR)): its answer is
        # still written, then the connection closes. A request cut short is dropped.
        self._eof = True
        if self.closed:
            return None  # lingering after the last answer: the client is done too
        req, self._req = self._req, None
        if req is not None and req.source is not None:
            req.source.finish(failed=True)
        self._input_done = True
        if self._deadline_kind != _IDLE:
            self.deadline, self._deadline_kind = 0.0, _NO_DEADLINE
        if self.busy or self._queue:
            return True  # keep the transport open for writing
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._server.release(self)
        self.deadline = 0.0
        self._deadline_kind = _NO_DEADLINE
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
        # The client is not taking its answers: read nothing more and start no queued request
        # until it does, so a client pipelining requests it never reads costs bounded memory.
        self._write_paused = True
        self.pause_reading()
        if self._streaming is not None:
            self._streaming.conn.pause_reading()  # the upstream side bounds this stall
        elif not self.busy:
            self._await_reader()

    def _await_reader(self) -> None:
        """Answers are waiting for a client that reads nothing: bound that by write_timeout."""
        self.deadline = self._server.clock() + self._server.write_timeout
        self._deadline_kind = _WRITE

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._deadline_kind == _WRITE:
            self.deadline, self._deadline_kind = 0.0, _NO_DEADLINE
            if not self.busy and not self._queue and self._req is None and not self.closed:
                self.deadline = self._server.clock() + self._server.idle_timeout
                self._deadline_kind = _IDLE
        if self._streaming is not None:
            self._streaming.conn.resume_reading()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if not self.busy and self._queue and not self.closed:
            self._start(self._queue.popleft())
        else:
            self._flow()

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
            if self._deadline_kind == _BODY:
                self._arm_body(self._server.body_timeout)  # the pause was ours, not the client's

    def body_backlog(self, full: bool) -> None:
        """The streamed body being read is (or no longer is) too far ahead of its consumer."""
        self._body_full = full
        self._flow()

    def _flow(self) -> None:
        """Read from the client unless something says stop."""
        if self.closed:
            return  # lingering (reading to discard) or gone
        if self._write_paused or self._input_done or self._queue or self._body_full:
            self.pause_reading()
        else:
            self.resume_reading()

    def _arm_body(self, timeout: float) -> None:
        self.deadline = min(self._body_by, self._server.clock() + timeout)
        self._deadline_kind = _BODY

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._req = req = Request()
        self._head = req.head
        self._url = b""
        self._head_bytes = self._summed_lines = self._summed_bytes = self._body_bytes = 0
        self._in_trailers = False
        self._hop_names = None
        if self._deadline_kind != _HEAD:
            # Slowloris guard: the whole head must arrive within header_timeout (counted from
            # the connection's start for its first request).
            self.deadline = self._server.clock() + self._server.header_timeout
            self._deadline_kind = _HEAD

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._server.max_header_bytes:
            raise _Reject(self._too_large_head(), 431)

    def on_header(self, name: bytes, value: bytes) -> None:
        # A kept field is counted as its line, once the head is complete or a read ends in it
        # (on_headers_complete, data_received): no count per field. Any field not kept is
        # counted here, so the head's size limit holds for every byte of it.
        if self._in_trailers:
            # Trailers never become headers, nor name hop-by-hop headers (dropped).
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self._server.max_header_bytes:
                raise _Reject(self._too_large_head(), 431)
            return
        # A line made by a join costs about 300 instructions less than by b"%b: %b\r\n" (and
        # as little as keeping the four pieces in the head, which the upstream join then pays).
        if name in _PASS_EXACT:  # what SDKs send, in the case they send it
            self._head.append(b"".join((name, b": ", value, b"\r\n")))
            return
        if name == b"Host":  # dropped with nothing to note (the sidecar sets its own)
            self._head_bytes += len(value) + 8
            return
        req = self._req
        assert req is not None
        if name == b"Content-Length" and req.content_length is None and value.isdigit():
            # As SDKs spell it, the first and plain digits: what door.check_content_length
            # lets through, without lower-casing the name or calling the check (every POST).
            self._head_bytes += len(value) + 18
            req.content_length = int(value)
            return
        # Authorization as SDKs spell it is not lower-cased (and hashed) again.
        lname = b"authorization" if name == b"Authorization" else name.lower()
        if lname in _DROP:
            self._head_bytes += len(name) + len(value) + 4
            if lname == b"content-length":  # here, not in _hop_header: a call less per POST
                refusal = door.check_content_length(value, req.content_length)
                if refusal is not None:
                    raise _refusal(refusal)
                req.content_length = int(value)
            elif lname != b"host":  # Host is dropped with nothing to note (the sidecar sets it)
                self._hop_header(req, lname, value)
            return
        if lname == b"idempotency-key":
            if not value.strip():
                # An empty key is no key: dropped, so the sidecar injects a real one.
                self._head_bytes += len(name) + len(value) + 4
                return
            req.idempotency_key = value
        elif lname == b"authorization":
            req.auth_at = len(req.head) if req.authorization is None else -2
            req.authorization = value
        req.head.append(b"".join((name, b": ", value, b"\r\n")))

    def _hop_header(self, req: Request, lname: bytes, value: bytes) -> None:
        if lname == b"transfer-encoding":
            refusal = door.check_transfer_encoding(value, req.chunked)
            if refusal is not None:
                raise _refusal(refusal)
            req.chunked = True
        elif lname == b"expect":
            req.expect_continue = value.strip().lower() == b"100-continue"
        elif lname == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")} - _CONNECTION_OPTIONS
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1), for this request
            # only. An empty set still says a Connection field came (see on_headers_complete).
            self._hop_names = (self._hop_names or set()) | (tokens - _END_TO_END)
        elif lname == b"proxy-connection" and self._hop_names is None:
            self._hop_names = set()  # it may say keep-alive to llhttp, as Connection does

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        server = self._server
        if sum(map(len, req.head)) + self._head_bytes > server.max_header_bytes:
            raise _Reject(self._too_large_head(), 431)
        self._in_trailers = True
        self._head_bytes = 0  # from here on it counts trailer bytes
        parser = self._parser
        req.keep_alive = parser.should_keep_alive()
        hop = self._hop_names
        # Of the versions llhttp accepts (0.9, 1.0, 1.1, 2.0) only 1.1 keeps alive unless a
        # Connection (or Proxy-Connection) field says keep-alive: with none, keeping alive
        # means 1.1 and httptools' get_http_version (a str.format, ~2.5k instructions) is
        # not needed.
        if hop is not None or not req.keep_alive:
            version = parser.get_http_version()
            if version != "1.1":
                refusal = door.check_version(version)
                if refusal is not None:
                    raise _refusal(refusal)
                req.http11 = False
        if hop:
            _drop_named(req, hop)
        req.method = method = _METHODS[parser.get_method()]
        req.target = target = self._url
        req.path, refusal = door.check_request(
            method,
            target,
            server.operator_paths,
            req.chunked,
            req.content_length,
            server.max_body_bytes,
        )
        if refusal is not None:
            raise _refusal(refusal)
        length = req.content_length
        if req.chunked or length:
            now = server.clock()
            self._body_by = body_by = now + server.body_deadline
            # What _arm_body does, inline on the hot path (one clock read for both, no min()).
            by = now + server.body_timeout
            self.deadline = by if by < body_by else body_by
            self._deadline_kind = _BODY
        else:
            self.deadline, self._deadline_kind = 0.0, _NO_DEADLINE
        if req.chunked or (length is not None and length > server.max_buffered_body):
            # Too large (or of unknown size) to hold for a retry: forward while it arrives.
            req.source = BodyStream(self, req.chunked)
            self._enqueue(req)  # _start sends 100 Continue when it is this request's turn
        elif req.expect_continue and not self.busy and length:
            self._write(_CONTINUE)

    def on_chunk_header(self) -> None:
        # Possibly the last chunk, with trailers to follow: they get the head's time limit.
        self._arm_body(self._server.trailer_timeout)

    def on_body(self, chunk: bytes) -> None:
        req = self._req
        assert req is not None
        if req.source is None and len(chunk) == req.content_length and not self._body_bytes:
            # A small body whole in one piece (most POSTs): the door held its length within
            # max_body_bytes and the message completes in this same read, so there is no
            # deadline to move and no list of parts to keep.
            self._body_bytes = len(chunk)
            req.body = chunk
            return
        self._body_bytes += len(chunk)
        server = self._server
        if self._body_bytes > server.max_body_bytes:
            raise _Reject(
                error_response(
                    413,
                    "body_too_large",
                    f"The request body exceeds the sidecar's limit of {server.max_body_bytes} "
                    "bytes.",
                    type_="invalid_request_error",
                    close=True,
                ),
                413,
            )
        # A byte came: the client is not stalled (what _arm_body does, inline on the hot path,
        # without a call to min()).
        by = server.clock() + server.body_timeout
        self.deadline = by if by < self._body_by else self._body_by
        self._deadline_kind = _BODY
        if req.source is not None:
            req.source.feed(chunk)
        else:
            self._body_parts.append(chunk)

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        if self._deadline_kind == _BODY:
            self.deadline, self._deadline_kind = 0.0, _NO_DEADLINE
        if not req.keep_alive:
            # Nothing after a closing request is read (a stray byte must not cancel its answer).
            self._input_done = True
            self.pause_reading()
        if req.source is not None:
            self._body_full = False
            req.source.finish()
            return
        parts = self._body_parts
        if parts:
            req.body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._body_parts = []  # here, not per message begun: no list for a request without
        if self.busy or self._write_paused:  # what _enqueue does, inline: a call less
            self._queue.append(req)
            self.pause_reading()
        else:
            self._start(req)

    # -- dispatch ---------------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        if self.busy or self._write_paused:
            # Pipelined, or the client has not taken earlier answers: hold the rest.
            self._queue.append(req)
            self.pause_reading()
            return
        self._start(req)

    def _start(self, req: Request) -> None:
        self.busy = True
        self._current = req
        source = req.source
        if source is not None:
            if source.refusal is not None:  # refused at the door while it waited its turn
                self.finish(source.refusal, keep_alive=False)
                return
            if not source.done:
                # Queued behind another request while reading was paused: read its body now.
                if req.expect_continue:
                    self._write(_CONTINUE)
                self._flow()
        if req.path in self._server.operator_paths:
            answer = self._server.handler.operator(req, req.path)
            if isinstance(answer, bytes):
                self.finish(answer, keep_alive=self.keeps_alive(req))
                return
            if answer is not None:  # made off the event loop (/metrics): finish when ready
                self._server.track(self._loop.create_task(self._finish_later(answer, req)))
                return
        if self.overloaded:
            self.finish(self._server.overloaded_answer, keep_alive=False)
            return
        # Tracked, so shutdown answers it; a RequestTask, not a Task: ~5k instructions fewer.
        server = self._server
        server.tasks.add(RequestTask(server.forward(req, self), self._loop, server))

    async def _finish_later(self, answer: Awaitable[bytes], req: Request) -> None:
        self.finish(await answer, keep_alive=self.keeps_alive(req))

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
            and not (self._input_done and not self._queue and self._pending_refusal is None)
        )

    def finish(self, data: bytes, *, keep_alive: bool) -> None:
        """Write a complete answer and move on to the next request (or close)."""
        if self.transport is not None:
            self.transport.write(data)
        # The request is done (inline here, one call less per request).
        self.busy = False
        self._current = None
        if self._server.idle_event is not None:  # a shutdown waits: wake it
            self._server.connection_idle()
        if self.closed:
            return
        if not keep_alive or self._server.closing or self.overloaded:
            self._close_after_refusal()
            return
        if self._queue:
            if not self._write_paused:  # else resume_writing starts it
                self._start(self._queue.popleft())
            else:
                self._await_reader()
            return
        if self._input_done:
            self._close_after_refusal()
            return
        if self._reading_paused or self._write_paused or self._body_full:
            self._flow()  # else reading goes on as it is: nothing queued, nothing to hold back
        if self._req is None:
            if self._write_paused:
                self._await_reader()  # idle only once the client has taken its answers
                return
            self.deadline = self._server.clock() + self._server.idle_timeout
            self._deadline_kind = _IDLE

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

    def _close_after_refusal(self) -> None:
        refusal, self._pending_refusal = self._pending_refusal, None
        if refusal:
            self._write(refusal)
        self.close()

    def close(self) -> None:
        """Close after what was written has been sent (lingering if the client may still send)."""
        transport = self.transport
        if transport is None:
            return
        if self.closed:
            if self._deadline_kind == _LINGER and self._server.closing:
                transport.close()  # shutting down: no more lingering
            return
        self.closed = True
        may_send = self._input_done or self._req is not None or self._reading_paused
        if may_send and not self._eof and not self._server.closing:
            self._input_done = True  # what still comes is discarded
            transport.write_eof()  # after what is buffered: the client sees the whole answer
            self.deadline = self._server.clock() + _LINGER_SECONDS
            self._deadline_kind = _LINGER
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()  # data_received discards what still comes
            return
        transport.close()

    # -- refusals -----------------------------------------------------------------------------
    def _refuse(self, answer: bytes, status: int) -> None:
        """Refuse what is being read: nothing more is read; earlier requests are answered first."""
        self.deadline = 0.0
        self._deadline_kind = _NO_DEADLINE
        req, self._req = self._req, None
        self._input_done = True
        self.pause_reading()
        source = req.source if req is not None else None
        if source is not None and (req is self._current or req in self._queue):
            # A streamed body its pipeline run (or its turn) is waiting on: that run answers.
            source.fail(answer, status)
            return
        if self.busy or self._queue:
            self._pending_refusal = answer  # written after the answers before it
            return
        if answer:
            self._write(answer)
        self.close()

    def _too_large_head(self) -> bytes:
        return error_response(
            431,
            "headers_too_large",
            "The request line and headers (or trailers) exceed the sidecar's limit of "
            f"{self._server.max_header_bytes} bytes.",
            type_="invalid_request_error",
            close=True,
        )

    @property
    def waiting_for(self) -> str | None:
        """What the connection's deadline is waiting for now: ``head`` (of a request begun),
        ``first_byte``, ``body``, ``idle`` or ``linger``; None when it waits for nothing."""
        kind = self._deadline_kind
        if kind == _HEAD:
            return "head" if self._req is not None else "first_byte"
        return _WAITING_FOR.get(kind)

    def expire(self) -> None:
        """The deadline passed (called by the sweeper)."""
        kind = self._deadline_kind
        self.deadline = 0.0
        self._deadline_kind = _NO_DEADLINE
        if kind == _IDLE:
            if not self.busy and self._req is None:
                self.close()
        elif kind == _LINGER:
            if self.transport is not None:
                self.transport.close()
        elif kind == _BODY:
            self._body_expired()
        elif kind == _WRITE:
            self.abort()  # it took nothing of its answers for write_timeout
        elif self._req is not None:
            message = "The request headers did not arrive in time."
            self._refuse(_timeout("header_timeout", message), 408)
        elif not self.busy:
            self._refuse(b"", 408)  # connected and sent nothing

    def _body_expired(self) -> None:
        now = self._server.clock()
        if self._reading_paused and now < self._body_by:
            self._arm_body(self._server.body_timeout)  # we stopped reading: not the client
            return
        what = (
            "The request body (or its trailers) did not arrive in time: it must keep coming "
            f"(at most {self._server.body_timeout:g} s between bytes) and be complete within "
            f"{self._server.body_deadline:g} s."
        )
        self._refuse(_timeout("body_timeout", what), 408)


def _drop_named(req: Request, dropped: Container[bytes]) -> None:
    """Drop the header lines named in ``dropped``; ``auth_at`` follows its line."""
    auth = req.head[req.auth_at] if req.auth_at >= 0 else None
    req.head = [h for h in req.head if h.split(b":", 1)[0].lower() not in dropped]
    if auth is not None:  # never dropped (_END_TO_END)
        req.auth_at = req.head.index(auth)


def _timeout(code: str, message: str) -> bytes:
    return error_response(408, code, message, type_="invalid_request_error", close=True)


def _upgrade_refused() -> tuple[bytes, int]:
    answer = error_response(
        400,
        "upgrade_refused",
        "Protocol upgrades are not supported.",
        type_="invalid_request_error",
        close=True,
    )
    return answer, 400

