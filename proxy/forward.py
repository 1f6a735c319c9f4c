"""The pipeline for one Stripe API request: route, admit, make safe, attempt, answer, record.

It coordinates and decides nothing itself: classification, retry policy, budget, breakers and
the limiter are the pure modules; sockets are ``proxy.upstream`` and ``proxy.server``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable

from proxy.breaker import BreakerState, CircuitBreaker
from proxy.bulkhead import Bulkhead, Compartment
from proxy.classify import (
    Outcome,
    TransportError,
    Verdict,
    classify_response,
    classify_transport_error,
)
from proxy.config import Config, OperationSettings
from proxy.errors import UpstreamError
from proxy.log import Logger
from proxy.metrics import Metrics, OperationMetrics
from proxy.ratelimit import RateLimiter
from proxy.retry import RetryBudget, parse_retry_after, retry_delay, should_retry
from proxy.routes import Router
from proxy.server import ClientConnection, Request, error_response
from proxy.upstream import Connection, Pool, Response

__all__ = ["Forwarder"]

_REPEATABLE = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_NO_BODY_STATUS = frozenset({204, 304})
_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class _Op:
    """Everything resolved once per operation template."""

    __slots__ = (
        "breaker",
        "breaker_on",
        "compartment",
        "json_name",
        "metrics",
        "name",
        "pool",
        "retry",
        "settings",
    )

    def __init__(
        self,
        name: str,
        pool: Pool,
        settings: OperationSettings,
        breaker: CircuitBreaker,
        metrics: OperationMetrics,
        compartment: Compartment,
    ) -> None:
        self.name = name
        self.json_name = json.dumps(name)
        self.pool = pool
        self.settings = settings
        self.retry = settings.retry
        self.breaker_on = settings.breaker.enabled
        self.breaker = breaker
        self.metrics = metrics
        self.compartment = compartment


class _StreamSink:
    """Writes a streamed upstream body to the client, chunk-framed when the length is unknown."""

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


class Forwarder:
    """Forwards Stripe API requests with Stripe-aware retries, breakers and limits."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        logger: Logger,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log = logger
        self._clock = clock
        self._wall = wall
        self._rand = rand
        self._sleep = sleep
        up = config.upstream
        self.router = Router(up.routes)
        self.pools = {
            name: Pool(
                origin,
                connect_timeout=up.connect_timeout,
                idle_timeout=up.idle_timeout,
                max_idle=up.max_idle_per_host,
                buffer_limit=up.buffer_limit,
                ssl_context=_ssl_context(up.ca_file) if origin.scheme == "https" else None,
                clock=clock,
            )
            for name, origin in config.origins().items()
        }
        self.host_breaker = CircuitBreaker(
            config.host_breaker, clock, self._on_transition("upstream")
        )
        self._host_breaker_on = config.host_breaker.enabled
        self.limiter = RateLimiter(config.ratelimit, clock) if config.ratelimit.enabled else None
        r = config.retry
        self.budget = RetryBudget(r.budget_ratio, r.budget_min_per_second, r.budget_window, clock)
        b = config.bulkhead
        self.bulkhead = Bulkhead(b.max_in_flight, b.max_wait) if b.enabled else None
        self._sidecar_headers = config.server.sidecar_headers
        self._lines_cache: dict[tuple[int, str], bytes] = {}
        self._inject = config.idempotency.inject
        # Injected keys: a random 128-bit base drawn once per process, then a counter. Unique by
        # construction (a key reused for another request would make Stripe replay the wrong
        # answer) and cheaper than a random draw per request.
        self._key_base = (config.idempotency.key_prefix + os.urandom(16).hex() + "-").encode()
        self._key_count = 0
        self._ops: dict[str, _Op] = {}
        # Attempts waiting for an answer, each with a deadline the sweeper enforces: cheaper
        # than a timer handle per attempt, at the cost of up to one sweep interval of lateness.
        self._armed: set[Connection] = set()
        shortest = min(
            [config.retry.attempt_timeout]
            + [o.retry.attempt_timeout for o in config.operations.values()]
        )
        self._sweep_every = min(0.25, max(0.01, shortest / 5))
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        metrics.breaker_state.labels("upstream").set(0)

    # -- set-up -------------------------------------------------------------------------------
    def _on_transition(self, scope: str) -> Callable[[BreakerState, BreakerState], None]:
        gauge = self.metrics.breaker_state.labels(scope)

        def changed(old: BreakerState, new: BreakerState) -> None:
            gauge.set(_BREAKER_GAUGE[new])
            self.metrics.breaker_transitions.labels(scope, new.value).inc()
            level = "warning" if new is BreakerState.OPEN else "info"
            self.log.event(f"breaker_{new.value}", level, scope=scope, previous=old.value)

        return changed

    def _op(self, name: str, host: str) -> _Op:
        op = self._ops.get(name)
        if op is None:
            settings = self.config.for_operation(name)
            limits = settings.limits
            if self.limiter is not None and (
                limits.endpoint_rate is not None or limits.endpoint_burst is not None
            ):
                rl = self.config.ratelimit
                rate = limits.endpoint_rate or rl.endpoint_rate
                burst = limits.endpoint_burst or max(
                    1.0, rate * rl.endpoint_burst / rl.endpoint_rate
                )
                self.limiter.set_endpoint_limit(name, rate, burst)
            op = _Op(
                name,
                self.pools.get(host) or self.pools["api"],
                settings,
                CircuitBreaker(settings.breaker, self._clock, self._on_transition(name)),
                self.metrics.operation(name),
                Compartment(
                    limits.max_in_flight or self.config.bulkhead.max_in_flight_per_operation
                ),
            )
            self._ops[name] = op
            self.metrics.breaker_state.labels(name).set(0)
        return op

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every breaker by scope (``upstream`` for the host, then operations)."""
        out = {"upstream": self.host_breaker}
        out.update({name: op.breaker for name, op in self._ops.items()})
        return out

    def _sweep(self) -> None:
        """Time out attempts whose deadline has passed."""
        now = self._loop.time()
        for conn in [c for c in self._armed if c.deadline <= now]:
            self._armed.discard(conn)
            if conn.deadline:  # 0: its exchange ended meanwhile
                conn.on_timeout()
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    def close(self) -> None:
        """Stop the sweeper and close pooled upstream connections."""
        self._sweeper.cancel()
        for pool in self.pools.values():
            pool.close()

    # -- the pipeline ---------------------------------------------------------------------------
    async def forward(self, req: Request, conn: ClientConnection) -> None:
        """Handle one Stripe API request from admission to the log line."""
        start = self._clock()
        name, host = self.router.resolve(req.method, req.path)
        op = self._ops.get(name) or self._op(name, host)
        metrics = self.metrics
        metrics.in_flight += 1
        held = False  # breaker permits taken and not yet recorded or released
        try:
            settings = op.retry
            method = req.method
            self.budget.record_request()

            # admit: breakers (fail fast), rate limit, bulkhead
            refusal = self._admit_breakers(op)
            if refusal is not None:
                self._answer_refusal(req, conn, op, start, refusal)
                return
            held = True
            # The bulkhead before the limiter: a request it turns away takes no rate token.
            bulkhead = self.bulkhead
            if (
                bulkhead is not None
                and not bulkhead.try_enter(op.compartment)
                and not await bulkhead.enter(op.compartment)
            ):
                self._release_breakers(op)
                held = False
                self._answer_refusal(req, conn, op, start, "bulkhead_full")
                return
            limiter = self.limiter
            if limiter is not None:
                wait = limiter.reserve(op.name)
                if wait is None:
                    if bulkhead is not None:
                        bulkhead.leave(op.compartment)
                    self._release_breakers(op)
                    held = False
                    self._answer_refusal(req, conn, op, start, "rate_limited")
                    return
                if wait > 0:
                    op.metrics.limiter_wait(wait)
                    await self._sleep(wait)

            # idempotency: make a POST safe to repeat
            injected: bytes | None = None
            head_lines = req.head
            replayable = req.source is None
            if (
                req.idempotency_key is None
                and method == "POST"
                and self._inject
                and replayable
                and not req.path.startswith("/oauth/")
            ):
                self._key_count += 1
                injected = b"%s%x" % (self._key_base, self._key_count)
                head_lines.append(b"Idempotency-Key: " + injected + b"\r\n")
                op.metrics.key_injected()
            has_key = injected is not None or req.idempotency_key is not None
            pool = op.pool
            body = req.body
            head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%b" % (
                method.encode(),
                req.target,
                pool.origin.host_header,
                b"".join(head_lines),
            )
            if req.source is not None:
                head += (
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    if req.chunked
                    else b"Content-Length: %d\r\n\r\n" % (req.content_length or 0)
                )
            elif body or method in ("POST", "PUT", "PATCH"):
                head += b"Content-Length: %d\r\n\r\n" % len(body)
            else:
                head += b"\r\n"

            # attempt loop
            attempt = 0
            resp: Response | None = None
            error: UpstreamError | None = None
            verdict: Verdict
            retried_or_could = False
            try:
                while True:
                    attempt += 1
                    t0 = self._clock() if attempt > 1 else start
                    timeout = min(settings.attempt_timeout, settings.deadline - (t0 - start))
                    try:
                        if req.source is not None:
                            resp = await self._attempt_streaming(pool, head, req, timeout)
                        else:
                            resp = await self._attempt(
                                pool, head, body, method, has_key, timeout, op
                            )
                        if resp.resent:
                            attempt += 1
                        error = None
                        verdict = classify_response(
                            resp.status,
                            resp.should_retry,
                            resp.rate_limited_reason,
                            resp.body_bytes() if resp.status >= 400 and resp.complete else None,
                        )
                    except UpstreamError as exc:
                        resp, error = None, exc
                        verdict = classify_transport_error(exc.kind)
                        if exc.resent:
                            attempt += 1
                        if exc.caused_by_client:
                            # The client stalled or left mid-body: nothing to learn about Stripe.
                            self._release_breakers(op)
                            held = False
                            break
                    duration = self._clock() - t0
                    op.metrics.attempt(verdict.outcome, duration)
                    failure = verdict.upstream_failure
                    if op.breaker_on:
                        op.breaker.record(failure, duration, op.name)
                    if self._host_breaker_on:
                        self.host_breaker.record(failure, duration, op.name)
                    held = False
                    if verdict.outcome is Outcome.RATE_LIMITED and limiter is not None:
                        limiter.on_rate_limited(op.name, resp.rate_limited_reason if resp else None)
                    if verdict.outcome is Outcome.SUCCESS or not verdict.retryable:
                        break
                    can = should_retry(
                        verdict,
                        attempt=attempt,
                        settings=settings,
                        elapsed=self._clock() - start,
                        has_idempotency_key=has_key,
                        method=method,
                        body_replayable=replayable and (resp is None or resp.complete),
                    )
                    if not can:
                        retried_or_could = attempt > 1 or (
                            settings.enabled and replayable and (has_key or method in _REPEATABLE)
                        )
                        break
                    retried_or_could = True
                    if conn.closed:
                        break
                    if not self.budget.try_acquire():
                        op.metrics.budget_exhausted()
                        break
                    retry_after = (
                        parse_retry_after(resp.retry_after, self._wall()) if resp else None
                    )
                    delay = retry_delay(verdict, attempt, retry_after, settings, self._rand)
                    if self._clock() - start + delay >= settings.deadline:
                        break
                    if self._admit_breakers(op) is not None:
                        break  # the breaker opened meanwhile: answer with what we have
                    held = True
                    if limiter is not None:
                        wait = limiter.reserve(op.name)
                        if wait is None:
                            self._release_breakers(op)
                            held = False
                            break
                        delay = max(delay, wait)
                    op.metrics.retry(verdict.outcome)
                    self.log.event(
                        "retry_scheduled",
                        operation=op.name,
                        outcome=verdict.outcome.value,
                        attempt=attempt,
                        delay_ms=round(delay * 1000, 1),
                    )
                    if resp is not None:
                        resp.discard()
                        resp = None
                    if delay > 0:
                        await self._sleep(delay)
            finally:
                if bulkhead is not None:
                    bulkhead.leave(op.compartment)

            # respond
            if resp is not None:
                status = resp.status
                self._answer(req, conn, resp, verdict, attempt, injected, retried_or_could)
            else:
                assert error is not None
                status = self._answer_error(
                    req, conn, error, verdict, attempt, injected, retried_or_could
                )

            # record
            duration = self._clock() - start
            op.metrics.request(status, verdict.outcome, duration)
            if self.log.access_enabled:
                self.log.access(
                    op.json_name,
                    status,
                    verdict.outcome,
                    attempt,
                    duration,
                    resp.request_id if resp is not None else None,
                    injected is not None,
                )
        except Exception as exc:  # a bug must cost one request, never the connection loop
            if held:
                self._release_breakers(op)  # or a half-open probe slot stays taken
            self.log.event("internal_error", "error", operation=op.name, error=repr(exc))
            conn.finish(
                error_response(
                    500, "internal_error", "The sidecar failed to handle this request.", close=True
                ),
                keep_alive=False,
            )
            op.metrics.request(500, "internal_error", self._clock() - start)
        finally:
            metrics.in_flight -= 1

    async def _attempt(
        self,
        pool: Pool,
        head: bytes,
        body: bytes,
        method: str,
        has_key: bool,
        timeout: float,
        op: _Op,
    ) -> Response:
        """One attempt with a buffered body; a stale pooled connection is replaced once.

        A pooled connection the server closed just as it was reused breaks before any answer.
        A repeatable request then goes again at once on a fresh connection: a burst of stale
        connections after a quiet spell must not look like an outage to the breakers. The lost
        send still counts as an attempt (Stripe may have received it), so metrics and
        ``Sidecar-Attempts`` tell the truth.
        """
        conn = await pool.acquire()
        deadline = pool.loop.time() + timeout
        armed = self._armed
        conn.deadline = deadline
        armed.add(conn)
        try:
            return await conn.send(head, body, method == "HEAD")
        except UpstreamError as exc:
            if (
                not conn.reused
                or exc.response_started
                or exc.kind is TransportError.TIMEOUT
                or not (has_key or method in _REPEATABLE)
            ):
                raise
        finally:
            armed.discard(conn)
            conn.deadline = 0.0
        op.metrics.attempt(Outcome.CONNECTION_ERROR, 0.0)
        try:
            fresh = await pool.connect()
        except UpstreamError as exc:
            exc.resent = True  # the lost send on the stale connection still counts
            raise
        fresh.deadline = deadline
        armed.add(fresh)
        try:
            resp = await fresh.send(head, body, method == "HEAD")
        except UpstreamError as exc:
            exc.resent = True
            raise
        finally:
            armed.discard(fresh)
            fresh.deadline = 0.0
        resp.resent = True
        return resp

    async def _attempt_streaming(
        self, pool: Pool, head: bytes, req: Request, timeout: float
    ) -> Response:
        """The single attempt of a request whose body is forwarded while it arrives."""
        assert req.source is not None
        conn = await pool.connect()  # never a possibly-stale pooled one: the body cannot be resent
        conn.deadline = pool.loop.time() + timeout
        self._armed.add(conn)
        try:
            return await conn.send_streaming(head, req.source, req.method == "HEAD")
        finally:
            self._armed.discard(conn)
            conn.deadline = 0.0

    # -- admission helpers --------------------------------------------------------------------
    def _admit_breakers(self, op: _Op) -> str | None:
        if op.breaker_on and not op.breaker.try_acquire():
            return "circuit_open"
        if self._host_breaker_on and not self.host_breaker.try_acquire():
            if op.breaker_on:
                op.breaker.release()
            return "circuit_open"
        return None

    def _release_breakers(self, op: _Op) -> None:
        if op.breaker_on:
            op.breaker.release()
        if self._host_breaker_on:
            self.host_breaker.release()

    # -- answers ----------------------------------------------------------------------------------
    def _sidecar_lines(
        self, attempts: int, outcome: str, injected: bytes | None, echoed: bool
    ) -> bytes:
        if not self._sidecar_headers:
            return b""
        key = (attempts, outcome)
        lines = self._lines_cache.get(key)
        if lines is None:
            lines = b"Sidecar-Attempts: %d\r\nSidecar-Outcome: %s\r\n" % (
                attempts,
                outcome.encode(),
            )
            if len(self._lines_cache) < 256:
                self._lines_cache[key] = lines
        if injected is not None and not echoed:
            lines += b"Idempotency-Key: " + injected + b"\r\n"
        return lines

    def _answer(
        self,
        req: Request,
        conn: ClientConnection,
        resp: Response,
        verdict: Verdict,
        attempts: int,
        injected: bytes | None,
        gave_up: bool,
    ) -> None:
        headers = resp.headers
        keep_alive = conn.keeps_alive(req)
        if gave_up and verdict.retryable:
            if (
                verdict.outcome is Outcome.GATEWAY_ERROR
                and resp.complete
                and not resp.body_bytes().lstrip().startswith(b"{")
            ):
                # A load balancer's HTML page. SDKs that cannot parse a body retry it whatever
                # Stripe-Should-Retry says (stripe-go does), so the final answer is made
                # Stripe-shaped instead.
                self._answer_gateway_page(req, conn, resp, verdict, attempts, injected, keep_alive)
                return
            # The sidecar already retried (or chose not to): an SDK retrying on top would
            # multiply the load on Stripe, so say so.
            headers = [h for h in headers if not h[:20].lower().startswith(b"stripe-should-retry:")]
            headers.append(b"Stripe-Should-Retry: false\r\n")
        head = b"HTTP/1.1 %d %s\r\n%b%b" % (
            resp.status,
            resp.reason,
            b"".join(headers),
            self._sidecar_lines(
                attempts, verdict.outcome, injected, resp.idempotency_key is not None
            ),
        )
        status = resp.status
        if not resp.complete and resp.content_length is None and not req.http11:
            keep_alive = False  # HTTP/1.0 knows no chunking: the end of the body is the close
        if not keep_alive:
            head += b"Connection: close\r\n"
        if req.method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            if resp.content_length is not None and status != 204:
                head += b"Content-Length: %d\r\n" % resp.content_length
            conn.finish(head + b"\r\n", keep_alive=keep_alive)
            resp.discard()
            return
        if resp.complete:
            body = resp.body
            size = len(body[0]) if len(body) == 1 else sum(map(len, body))
            conn.finish(
                b"".join([head, b"Content-Length: %d\r\n\r\n" % size, *body]), keep_alive=keep_alive
            )
            return
        # A large answer: stream it, framed by the upstream's length or re-chunked.
        if resp.content_length is not None:
            conn.start_stream(head + b"Content-Length: %d\r\n\r\n" % resp.content_length)
            sink = _StreamSink(conn, chunked=False, keep_alive=keep_alive)
        elif not req.http11:
            conn.start_stream(head + b"\r\n")
            sink = _StreamSink(conn, chunked=False, keep_alive=False)
        else:
            conn.start_stream(head + b"Transfer-Encoding: chunked\r\n\r\n")
            sink = _StreamSink(conn, chunked=True, keep_alive=keep_alive)
        conn.set_streaming(resp)
        upstream = resp.conn
        if upstream is not None and not resp.complete:
            # A streamed answer that goes silent for an attempt timeout is cut off, so neither
            # side waits forever; each chunk moves the deadline on.
            upstream.stream_idle = self.config.retry.attempt_timeout
            upstream.deadline = self._loop.time() + upstream.stream_idle
            self._armed.add(upstream)
        resp.stream(sink)

    def _answer_gateway_page(
        self,
        req: Request,
        conn: ClientConnection,
        resp: Response,
        verdict: Verdict,
        attempts: int,
        injected: bytes | None,
        keep_alive: bool,
    ) -> None:
        status = resp.status
        extra = self._sidecar_lines(attempts, verdict.outcome, injected, False)
        extra += b"Stripe-Should-Retry: false\r\n"
        message = (
            f"Stripe's edge answered {status} with a page that is not a Stripe API answer, "
            f"on every attempt ({attempts})."
        )
        conn.finish(
            error_response(
                status, "upstream_gateway_error", message, extra=extra, close=not keep_alive
            ),
            keep_alive=keep_alive,
        )

    def _answer_error(
        self,
        req: Request,
        conn: ClientConnection,
        error: UpstreamError,
        verdict: Verdict,
        attempts: int,
        injected: bytes | None,
        gave_up: bool,
    ) -> int:
        type_ = "api_error"
        keep_alive = conn.keeps_alive(req)
        if error.caused_by_client:
            status, code, type_ = 408, "body_timeout", "invalid_request_error"
            message = "The request body did not arrive in time (or the client stopped sending it)."
            gave_up = False
        elif verdict.outcome is Outcome.TIMEOUT:
            status, code = 504, "upstream_timeout"
            message = f"Stripe did not answer in time ({attempts} attempt(s))."
        else:
            status, code = 502, "upstream_unreachable"
            message = f"Stripe could not be reached ({attempts} attempt(s)): {error}."
        extra = self._sidecar_lines(attempts, verdict.outcome, injected, False)
        if gave_up:
            extra += b"Stripe-Should-Retry: false\r\n"
        conn.finish(
            error_response(status, code, message, type_=type_, extra=extra, close=not keep_alive),
            keep_alive=keep_alive,
        )
        return status

    def _answer_refusal(
        self, req: Request, conn: ClientConnection, op: _Op, start: float, reason: str
    ) -> None:
        op.metrics.fail_fast(reason)
        if reason == "circuit_open":
            wait = max(op.breaker.retry_after(), self.host_breaker.retry_after())
            status, type_, message = (
                503,
                "api_error",
                (
                    f"The circuit breaker for {op.name} is open after repeated upstream failures; "
                    f"failing fast. Try again in {wait:.1f} s."
                ),
            )
        elif reason == "rate_limited":
            wait = self.config.ratelimit.max_wait
            status, type_, message = (
                429,
                "invalid_request_error",
                (
                    "The sidecar's client-side rate limit for this operation is exhausted; "
                    "this request was not sent to Stripe."
                ),
            )
        else:
            wait = 1.0
            status, type_, message = (
                503,
                "api_error",
                ("Too many requests are in flight to Stripe; this request was not sent."),
            )
        extra = b"Retry-After: %d\r\nStripe-Should-Retry: false\r\n" % max(1, math.ceil(wait))
        if self._sidecar_headers:
            extra += b"Sidecar-Attempts: 0\r\nSidecar-Outcome: %s\r\n" % reason.encode()
        keep_alive = conn.keeps_alive(req)
        conn.finish(
            error_response(status, reason, message, type_=type_, extra=extra, close=not keep_alive),
            keep_alive=keep_alive,
        )
        duration = self._clock() - start
        op.metrics.request(status, reason, duration)
        if self.log.access_enabled:
            self.log.access(op.json_name, status, reason, 0, duration, None, False)


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)
