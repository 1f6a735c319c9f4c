"""The pipeline for one Stripe API request: admit, make safe, attempt, respond, record.

:meth:`Forwarder.forward` reads as the request's walk; each stage is a method of its own and
decides nothing that a pure module can: classification is ``proxy.classify``, what follows an
attempt is :func:`proxy.retry.next_step`, answers are framed by ``proxy.respond``, and sockets are
``proxy.upstream`` and ``proxy.server``. Everything a stage learns goes on the request's
:class:`Call`; the record stage turns it into outcome records for the observers (metrics, the
access log, and whatever subscribes next).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

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
from proxy.deadlines import Deadlines
from proxy.errors import UpstreamError
from proxy.keys import HeldKey, KeySet
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.ratelimit import RateLimiter, wait_for_slot
from proxy.records import AttemptRecord, Observer, new_attempt, new_request
from proxy.respond import Responder
from proxy.retry import (
    REPEATABLE_METHODS,
    Gates,
    GiveUp,
    RetryBudget,
    Step,
    next_step,
    parse_retry_after,
)
from proxy.routes import Router
from proxy.server import ClientConnection, Request
from proxy.upstream import Connection, Pool, Response

if TYPE_CHECKING:
    from proxy.outbox.capture import Capture, DeliveryConnection

__all__ = ["Call", "Forwarder"]

_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_OPEN_GATES = Gates()
# What classify_response answers for every status below 400 (headers and body unread): the
# attempt loop uses it without the call. Also a call's verdict before its first attempt.
_SUCCESS = classify_response(200, None, None, None)
_ANSWERED = Step(GiveUp.ANSWERED, 0.0, False)
_METHODS = {m: m.encode() + b" " for m in ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD")}
_WAIT = "(wait)"  # _admit: the bulkhead or the limiter must be waited for (compared by identity)

_KEY_AT = len(b"Idempotency-Key: ")  # where the key starts in its header line

class _Op:
    """Everything resolved once per operation template."""

    __slots__ = ("breaker", "compartment", "host_line", "name", "outbox", "pool", "retry")

    def __init__(
        self,
        name: str,
        pool: Pool,
        settings: OperationSettings,
        breaker: CircuitBreaker | None,
        compartment: Compartment,
        outbox: Capture | None = None,
    ) -> None:
        self.name = name
        self.pool = pool
        # What follows the target in the upstream request head, made once.
        self.host_line = b" HTTP/1.1\r\nHost: %s\r\n" % pool.origin.host_header
        self.retry = settings.retry
        self.breaker = breaker  # None when this operation's breaker is switched off
        self.compartment = compartment
        self.outbox = outbox  # the outbox's hook for a fallback: queue operation, else None


class Call:
    """One request on its way through the pipeline: what each stage learned so far."""

    __slots__ = (
        "attempt",
        "conn",
        "error",
        "has_key",
        "head",
        "held",
        "in_bulkhead",
        "in_limiter",
        "injected",
        "key",
        "key_line",
        "latency",
        "limiter_wait",
        "op",
        "outcome",
        "req",
        "resp",
        "start",
        "status",
        "step",
        "switched_key",
        "verdict",
    )

    def __init__(self, req: Request, conn: ClientConnection, op: _Op, start: float) -> None:
        self.req = req
        self.conn = conn
        self.op = op
        self.start = start
        self.head = b""  # the upstream request head, built once by the make-safe stage
        self.injected: bytes | None = None  # the Idempotency-Key the sidecar added
        self.key_line = b""  # its header line, "Idempotency-Key: ...\r\n"
        self.has_key = req.idempotency_key is not None
        # Breaker permits (the operation's and the host's) taken for an attempt not yet
        # reported: whatever ends the request gives them back (Forwarder._release), as a
        # half-open breaker must get its probe slot back or it would fail fast until the
        # probe timeout.
        self.held = False
        self.in_bulkhead = False
        self.in_limiter = False  # counted in flight by the rate limiter
        self.limiter_wait = 0.0
        self.attempt = 0  # sends to Stripe so far
        self.latency = 0.0  # the last attempt's, until its answer's head (or failure)
        self.resp: Response | None = None
        self.error: UpstreamError | None = None
        self.verdict: Verdict = _SUCCESS
        self.step = _ANSWERED
        self.status = 0
        self.outcome = ""
        self.key: HeldKey | None = None  # the held key the request goes with
        self.switched_key = False  # moved to the next held key after a 401

    @property
    def settled(self) -> bool:
        """The sidecar retried or chose not to: the answer tells SDKs not to retry on top."""
        return self.step.settled


class Forwarder:
    """Forwards Stripe API requests with Stripe-aware retries, breakers and limits."""

    __slots__ = (
        "_clock",
        "_host_breaker",
        "_inject",
        "_key_count",
        "_key_line_base",
        "_learn_auth",
        "_on_attempt",
        "_on_key_failover",
        "_on_request",
        "_ops",
        "_rand",
        "_sending",
        "_sleep",
        "_wall",
        "budget",
        "bulkhead",
        "config",
        "deadlines",
        "fleet_auth",
        "host_breaker",
        "keys",
        "limiter",
        "log",
        "metrics",
        "outbox",
        "pools",
        "respond",
        "router",
    )

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        logger: Logger,
        observers: Sequence[Observer] = (),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        deadlines: Deadlines,
        keys: KeySet | None = None,
        on_key_failover: Callable[[HeldKey, HeldKey, str], None] | None = None,
        outbox: Capture | None = None,
    ) -> None:
        self.config = config
        # The hook of fallback: queue operations (None: no operation queues).
        self.outbox = outbox
        # The Stripe keys the sidecar holds (None: the app's own Authorization goes through).
        self.keys = keys
        self._on_key_failover = on_key_failover
        self.metrics = metrics
        # Attempt, stream and connect time-outs: the sidecar's one sweeper, on ``clock``.
        self.deadlines = deadlines
        # Pooled connections an attempt is waiting on: the sweeper expires their deadlines.
        self._sending: set[Connection] = set()
        deadlines.watch(self._sending)
        self.log = logger
        # Each observer's two methods, bound once: the record stage only calls.
        self._on_attempt = tuple(observer.attempt for observer in observers)
        self._on_request = tuple(observer.request for observer in observers)
        self._clock = clock
        self._wall = wall
        self._rand = rand
        self._sleep = sleep
        self.router = Router(config.upstream.routes)
        self.pools = _pools(config, self.deadlines)
        self._guards(config, clock)
        # With a fleet-shared limiter: the app's Authorization, from its first request and its
        # latest rate-limited one, names the account whose state is shared (never stored).
        self.fleet_auth: bytes | None = None
        self._learn_auth = self.limiter is not None and config.ratelimit.shared is not None
        self._inject = config.idempotency.inject
        # Injected keys: a random 128-bit base drawn once per process, then a counter. Unique by
        # construction (a key reused for another request would make Stripe replay the wrong
        # answer) and cheaper than a random draw per request.
        self._key_line_base = b"Idempotency-Key: " + (
            config.idempotency.key_prefix + os.urandom(16).hex() + "-"
        ).encode()
        self._key_count = 0
        self._ops: dict[str, _Op] = {}
        self.respond = Responder(
            sidecar_headers=config.server.sidecar_headers,
            stream_idle=config.retry.attempt_timeout,
            deadlines=self.deadlines,
        )
        metrics.breaker_state.labels("upstream").set(0)

    def _guards(self, config: Config, clock: Callable[[], float]) -> None:
        """The host breaker, rate limiter, retry budget and bulkhead the config asks for."""
        self.host_breaker = CircuitBreaker(
            config.host_breaker, clock, self._on_transition("upstream")
        )
        self._host_breaker = self.host_breaker if config.host_breaker.enabled else None
        self.limiter = RateLimiter(config.ratelimit, clock) if config.ratelimit.enabled else None
        r = config.retry
        self.budget = RetryBudget(r.budget_ratio, r.budget_min_per_second, r.budget_window, clock)
        b = config.bulkhead
        self.bulkhead = Bulkhead(b.max_in_flight, b.max_wait, self.deadlines) if b.enabled else None

    # -- set-up -------------------------------------------------------------------------------
    def _on_transition(self, scope: str) -> Callable[[BreakerState, BreakerState], None]:
        gauge = self.metrics.breaker_state.labels(scope)

        def changed(old: BreakerState, new: BreakerState) -> None:
            gauge.set(_BREAKER_GAUGE[new])
            self.metrics.breaker_transitions.labels(scope, new.value).inc()
            level = "warning" if new is BreakerState.OPEN else "info"
            self.log.event(f"breaker_{new.value}", level, scope=scope, previous=old.value)

        return changed

    def _operation(self, req: Request) -> _Op:
        """The request's operation, with its breaker, pool and bulkhead compartment."""
        name, host = self.router.resolve(req.method, req.path)
        return self._ops.get(name) or self._new_operation(name, host)

    def _new_operation(self, name: str, host: str) -> _Op:
        """Resolve an operation seen for the first time, once (kept in ``_ops``)."""
        settings = self.config.for_operation(name)
        limits = settings.limits
        if self.limiter is not None and limits.endpoint_rate is not None:
            self.limiter.set_endpoint_limit(name, limits.endpoint_rate, limits.endpoint_burst)
        breaker = CircuitBreaker(settings.breaker, self._clock, self._on_transition(name))
        self.metrics.breaker_state.labels(name).set(0)
        op = self._ops[name] = _Op(
            name,
            self.pools.get(host) or self.pools["api"],
            settings,
            breaker if settings.breaker.enabled else None,
            Compartment(
                limits.max_in_flight or self.config.bulkhead.max_in_flight_per_operation
            ),
            self.outbox if settings.fallback == "queue" else None,
        )
        return op

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every enabled breaker by scope (``upstream`` for the host, then operations)."""
        out = {"upstream": self.host_breaker}
        out.update({name: op.breaker for name, op in self._ops.items() if op.breaker is not None})
        return out

    def compartments(self) -> dict[str, Compartment]:
        """Each operation's bulkhead compartment by name (empty with the bulkhead off)."""
        if self.bulkhead is None:
            return {}
        return {name: op.compartment for name, op in self._ops.items()}

    def close(self) -> None:
        """Close pooled upstream connections."""
        for pool in self.pools.values():
            pool.close()

    # -- the pipeline ---------------------------------------------------------------------------
    async def forward(self, req: Request, conn: ClientConnection, call: Call | None = None) -> None:
        """Handle one Stripe API request from admission to its records.

        ``call`` is given by :meth:`deliver` only; the server's requests make their own.
        """
        if call is None:
            name, host = self.router.resolve(req.method, req.path)  # _operation, inline
            op = self._ops.get(name) or self._new_operation(name, host)
            call = Call(req, conn, op, self._clock())
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            try:
                refusal = None
                try:
                    # No coroutine for admission unless the bulkhead or the limiter must wait.
                    refusal = self._admit(call)
                    if refusal is _WAIT:
                        refusal = await self._admit_waiting(call)
                    if refusal is None:
                        self._make_safe(call)
                        await self._attempts(call)
                finally:
                    if call.in_bulkhead:  # the bulkhead's and the limiter's slots go back
                        assert self.bulkhead is not None
                        self.bulkhead.leave(call.op.compartment)
                        call.in_bulkhead = False
                    if call.in_limiter:
                        assert self.limiter is not None
                        self.limiter.release(call.op.name)
                        call.in_limiter = False
                outbox = call.op.outbox
                if outbox is not None and await self._offer(outbox, call, refusal):
                    pass  # stored durably, answered 202
                elif refusal is not None:
                    self._refuse(call, refusal)
                else:
                    resp = call.resp
                    if resp is None:
                        self._failed(call)
                    elif (ended := self.respond.upstream(call, resp)) is not None:
                        await self._stream_ended(call, ended)  # the permits are spent when it ends
            finally:
                if call.held:  # permits no attempt spent go back however the request ended
                    self._release(call)
        except asyncio.CancelledError:  # the shutdown grace ran out (proxy.server.Server)
            self.respond.shutting_down(call)
            self._record(call)  # the record stage below is skipped: the task ends here
            raise
        except Exception as exc:  # a bug must cost one request, never the connection loop
            self.log.event("internal_error", "error", operation=call.op.name, error=repr(exc))
            self.respond.internal_error(call)
        finally:
            metrics.in_flight -= 1
        self._record(call)

    def _offer(self, outbox: Capture, call: Call, refusal: str | None) -> asyncio.Task[bool]:
        """The outbox hook, run in a Task of its own (the request waits for it).

        A store may need a current task (the redis client's time-outs do), which the server's
        :class:`~proxy.reqtask.RequestTask` is not; cancelling the request cancels this Task.
        """
        return asyncio.ensure_future(outbox.offer(call, refusal, self))

    async def deliver(self, req: Request, conn: DeliveryConnection) -> Call:
        """Send a stored outbox item through the whole pipeline; the finished call.

        Breakers, bulkhead, limiter, held keys, retries and records apply as to any request;
        the answer is written to ``conn``, and the call is never queued again.
        """
        client = cast(ClientConnection, conn)
        call = Call(req, client, self._operation(req), self._clock())
        await self.forward(req, client, call)
        return call

    def make_safe(self, call: Call) -> None:
        """The make-safe stage for a call that skipped it (the outbox queues a refused call)."""
        self._make_safe(call)

    # -- admit ----------------------------------------------------------------------------------
    def _admit(self, call: Call) -> str | None:
        """Breakers, bulkhead, limiter; the reason to refuse, or None with everything taken.

        ``_WAIT``: the bulkhead or the limiter has to be waited for, which
        :meth:`_admit_waiting` does (the breaker permits are taken, nothing after them).
        """
        if self.keys is not None and self.keys.client_auth is not None:
            sent = call.req.authorization
            if sent is None or not hmac.compare_digest(sent, self.keys.client_auth):
                return "client_token_required"
        self.budget.record_request(call.start)  # the call was made just now: one clock read
        if self._learn_auth and call.req.authorization is not None:
            self.fleet_auth = call.req.authorization
            self._learn_auth = False
        # What _acquire does, inline (a call fewer per request).
        op, host = call.op.breaker, self._host_breaker
        if op is not None and not op.closed and not op.try_acquire():
            return "circuit_open"
        if host is not None and not host.closed and not host.try_acquire():
            if op is not None:
                op.release()
            return "circuit_open"
        call.held = True
        # The bulkhead before the limiter: a request it turns away takes no rate token.
        if self.bulkhead is not None:
            if not self.bulkhead.try_enter(call.op.compartment):
                return _WAIT
            call.in_bulkhead = True
        if self.limiter is not None:
            if not self.limiter.try_enter(call.op.name, call.start):
                return _WAIT  # a scope limits now: reserve, maybe wait, then acquire
            call.in_limiter = True
        return None

    async def _admit_waiting(self, call: Call) -> str | None:
        """The rest of :meth:`_admit` when the bulkhead or the limiter has to be waited for."""
        bulkhead = self.bulkhead
        if bulkhead is not None and not call.in_bulkhead:
            if not await bulkhead.enter(call.op.compartment):
                return "bulkhead_full"
            call.in_bulkhead = True
        limiter = self.limiter
        if limiter is not None:
            wait = limiter.reserve(call.op.name)
            if wait is None:
                return "rate_limited"
            if wait > 0:
                call.limiter_wait = wait
                await self._sleep(wait)
            # An in-flight bound exists only after Stripe answered *-concurrency.
            if not limiter.acquire(call.op.name) and not await wait_for_slot(
                limiter, call.op.name, self._sleep
            ):
                return "rate_limited"
            call.in_limiter = True
        return None

    # -- breaker permits ------------------------------------------------------------------------
    def _acquire(self, call: Call) -> bool:
        """Take a permit from the operation's breaker and the host's; False = fail fast."""
        op, host = call.op.breaker, self._host_breaker
        # A closed breaker grants at once: its flag is read instead of calling try_acquire.
        if op is not None and not op.closed and not op.try_acquire():
            return False
        if host is not None and not host.closed and not host.try_acquire():
            if op is not None:
                op.release()
            return False
        call.held = True
        return True

    def _would_admit(self, call: Call) -> bool:
        """Whether :meth:`_acquire` would succeed now (takes nothing)."""
        op, host = call.op.breaker, self._host_breaker
        return (op is None or op.would_admit()) and (host is None or host.would_admit())

    def _spend(self, call: Call, failure: bool, duration: float) -> None:
        """Report the attempt's result to both breakers; the permits are spent."""
        op, host = call.op.breaker, self._host_breaker
        if op is not None:
            op.record(failure, duration, call.op.name)
        if host is not None:
            host.record(failure, duration, call.op.name)
        call.held = False

    def _release(self, call: Call) -> None:
        """Give the permits back unused."""
        if call.held:
            call.held = False
            if call.op.breaker is not None:
                call.op.breaker.release()
            if self._host_breaker is not None:
                self._host_breaker.release()

    # -- make safe ------------------------------------------------------------------------------
    def _make_safe(self, call: Call) -> None:
        """Give a POST without an Idempotency-Key one, and build the upstream request head."""
        req = call.req
        head_lines = req.head
        if (
            not call.has_key
            and req.method == "POST"
            and self._inject
            and req.source is None  # a streamed body is sent once: no retry needs a key
            and not req.path.startswith("/oauth/")  # connect.stripe.com takes no keys
        ):
            self._key_count += 1
            # The header line made once; the answer echoes the same line (Call.key_line).
            call.key_line = line = b"%s%x\r\n" % (self._key_line_base, self._key_count)
            call.injected = line[_KEY_AT:-2]
            call.has_key = True
            head_lines.append(line)
        if self.keys is not None:
            head_lines = self._with_held_key(call, head_lines)
        if req.source is not None:
            end = (
                b"Transfer-Encoding: chunked\r\n\r\n"
                if req.chunked
                else b"Content-Length: %d\r\n\r\n" % (req.content_length or 0)
            )
        elif req.body or req.method in ("POST", "PUT", "PATCH"):
            end = b"Content-Length: %d\r\n\r\n" % len(req.body)
        else:
            end = b"\r\n"
        # One join of ready pieces (no formatting, no concatenation).
        call.head = b"".join(
            [
                _METHODS.get(req.method) or req.method.encode() + b" ",
                req.target,
                call.op.host_line,
                *head_lines,
                end,
            ]
        )

    def _with_held_key(self, call: Call, head_lines: list[bytes]) -> list[bytes]:
        """Put the active held key's ready Authorization line in place of the app's."""
        assert self.keys is not None
        key = call.key = self.keys.active
        at = call.req.auth_at
        if at >= 0:
            head_lines[at] = key.line
            return head_lines
        if at == -2:  # several Authorization lines: none of them may go on
            head_lines = [h for h in head_lines if h[:14].lower() != b"authorization:"]
        head_lines.append(key.line)
        return head_lines

    # -- attempt loop ---------------------------------------------------------------------------
    async def _attempts(self, call: Call) -> None:
        """Send, classify, ask next_step; repeat until an answer is final."""
        req, settings, sending = call.req, call.op.retry, self._sending
        while True:
            call.attempt += 1
            t0 = self._clock() if call.attempt > 1 else call.start
            timeout = min(settings.attempt_timeout, settings.deadline - (t0 - call.start))
            if call.resp is not None:
                call.resp.discard()  # the previous attempt's answer, now superseded
            call.resp = call.error = None
            # An idle pooled connection, the common case, is used here: a coroutine fewer.
            conn = call.op.pool.take_idle() if req.source is None else None
            try:
                if conn is None:
                    resp = await self._send(call, timeout)
                else:
                    # Armed by its deadline while in a set the sweeper watches: two C set
                    # operations instead of two calls (Deadlines.arm_at, disarm).
                    conn.deadline = deadline = self.deadlines.clock() + timeout
                    sending.add(conn)
                    try:
                        resp = await conn.send(call.head, req.body, req.method == "HEAD")
                    except UpstreamError as exc:
                        conn.deadline = 0.0
                        if not _stale(call, conn, exc):
                            raise
                        resp = await self._resend(call, deadline)
                    finally:
                        conn.deadline = 0.0
                        sending.discard(conn)
                call.resp = resp
                call.verdict = _SUCCESS if resp.status < 400 else _error_verdict(resp)
            except UpstreamError as exc:
                if self._transport_failed(call, exc):
                    return
            ended = self._clock()  # one read for the duration and both breakers
            duration = ended - t0
            call.latency = duration
            if call.resp is None or call.resp.complete:
                failure = call.verdict.upstream_failure  # what _spend does, inline
                if (op := call.op.breaker) is not None:
                    op.record(failure, duration, call.op.name, ended)
                if self._host_breaker is not None:
                    self._host_breaker.record(failure, duration, call.op.name, ended)
                call.held = False
            if call.verdict.outcome is Outcome.RATE_LIMITED and self.limiter is not None:
                self._rate_limited(call, t0)
            # A final verdict with no held key to switch to: what next_step would answer.
            if not call.verdict.retryable and call.key is None:
                call.step = _ANSWERED
            else:
                call.step = self._next_step(call)
            self._emit_attempt(call, duration)
            if call.step.give_up is not None:
                return
            if call.step.delay > 0:
                await self._sleep(call.step.delay)

    def _transport_failed(self, call: Call, exc: UpstreamError) -> bool:
        """Note an attempt that got no answer; True if that ends the request at once."""
        call.error = exc
        call.verdict = classify_transport_error(exc.kind)
        if exc.caused_by_client:
            # The client stalled or left mid-body: nothing to learn about Stripe.
            self._release(call)
            call.step = Step(GiveUp.CLIENT_GONE, 0.0, False)
            return True
        if exc.kind is TransportError.LOCAL_RESOURCES:
            # The sidecar's own fds or memory ran out: not Stripe's failure, and trying again
            # at once cannot help.
            self._release(call)
            call.step = Step(GiveUp.ANSWERED, 0.0, False)
            return True
        return False

    def _rate_limited(self, call: Call, t0: float) -> None:
        """Tell the limiter about a 429 (and learn the account it throttles, for a fleet)."""
        assert self.limiter is not None and call.resp is not None
        if call.req.authorization is not None:
            self.fleet_auth = call.req.authorization
        # When it went out: a first attempt after its limiter wait, a retry at t0.
        sent_at = t0 + call.limiter_wait if call.attempt == 1 else t0
        self.limiter.on_rate_limited(call.op.name, call.resp.rate_limited_reason, sent_at)

    def _next_step(self, call: Call) -> Step:
        """Ask next_step what follows a retryable verdict (or a 401 with held keys); take what
        the step needs (a retry budget token, breaker permits, a rate token, the next key)."""
        verdict, req, resp = call.verdict, call.req, call.resp
        retry_after = None
        if resp is not None and resp.retry_after is not None:
            retry_after = parse_retry_after(resp.retry_after, self._wall())
        if verdict.retryable:
            gates = self._gates(call)
        else:  # with no key held, one attribute check
            gates = _OPEN_GATES if call.key is None else self._final_gates(call)
        step = next_step(
            verdict,
            attempt=call.attempt,
            elapsed=self._clock() - call.start,
            method=req.method,
            has_idempotency_key=call.has_key,
            body_held=req.source is None,
            answer_held=resp is None or resp.complete,
            retry_after=retry_after,
            settings=call.op.retry,
            gates=gates,
            rand=self._rand,
            switched_key=call.switched_key,
        )
        if step.give_up is not None:
            return step
        if step.switch_key:
            return self._switch_key(call, step)
        return self._take_retry(call, step)

    def _final_gates(self, call: Call) -> Gates:
        """Gates for an answer that is not retryable: only a 401 with held keys may go again."""
        if call.verdict.outcome is not Outcome.AUTHENTICATION or self.keys is None:
            return _OPEN_GATES
        assert call.key is not None
        return Gates(
            client_connected=not call.conn.closed,
            next_key_available=self.keys.next_after(call.key) is not None,
        )

    def _switch_key(self, call: Call, step: Step) -> Step:
        """Move on to the next held key after a 401 (no budget, no backoff); or give up."""
        assert self.keys is not None and call.key is not None
        if not self._acquire(call):
            return Step(GiveUp.BREAKER_OPEN, 0.0, True)
        used = call.key
        was_active = used is self.keys.active
        target = self.keys.fail_over(used)
        if target is None:  # cannot happen after next_step saw one; kept safe
            self._release(call)
            return Step(GiveUp.KEYS_EXHAUSTED, 0.0, False)
        call.head = call.head.replace(used.line, target.line, 1)
        call.key = target
        call.switched_key = True
        if was_active and self._on_key_failover is not None:
            self._on_key_failover(used, target, call.op.name)
        return step

    def _gates(self, call: Call) -> Gates:
        """Read (without taking) the shared state a retry would need."""
        limiter = self.limiter
        return Gates(
            client_connected=not call.conn.closed,
            budget_available=self.budget.available(),
            breakers_admit=self._would_admit(call),
            limiter_wait=limiter.peek(call.op.name) if limiter is not None else 0.0,
            limiter_max_wait=self.config.ratelimit.max_wait,
        )

    def _take_retry(self, call: Call, step: Step) -> Step:
        """Take what next_step saw was free: a budget token, breaker permits, a rate token.

        Time moves between the look and the take (a budget window may roll over), so each can
        still refuse; the answer in hand is then final.
        """
        if not self.budget.try_acquire():
            return Step(GiveUp.BUDGET, 0.0, True)
        if not self._acquire(call):
            return Step(GiveUp.BREAKER_OPEN, 0.0, True)
        if self.limiter is not None:
            wait = self.limiter.reserve(call.op.name, step.delay)
            if wait is None:
                self._release(call)
                return Step(GiveUp.RATE_LIMITED, 0.0, True)
            if wait > step.delay:
                return Step(None, wait, True)
        return step

    async def _send(self, call: Call, timeout: float) -> Response:
        """One attempt on a new connection: none idle in the pool, or a streamed body.

        A streamed body never goes on a possibly-stale pooled connection: it cannot be sent
        again. (An idle pooled connection is used by :meth:`_attempts` itself.)
        """
        req = call.req
        head_only = req.method == "HEAD"
        deadline = self.deadlines.clock() + timeout
        conn = await call.op.pool.connect()
        with self._armed_until(conn, deadline):
            if req.source is not None:
                return await conn.send_streaming(call.head, req.source, head_only)
            return await conn.send(call.head, req.body, head_only)

    async def _resend(self, call: Call, deadline: float) -> Response:
        """A stale pooled connection broke: the same attempt once more on a fresh one.

        A pooled connection the server closed just as it was reused breaks before any answer.
        A repeatable request then goes again at once on a fresh connection: a burst of stale
        connections after a quiet spell must not look like an outage to the breakers. The lost
        send still counts as an attempt (Stripe may have received it), so metrics and
        ``Sidecar-Attempts`` tell the truth.
        """
        lost = AttemptRecord(
            call.op.name, call.attempt, Outcome.CONNECTION_ERROR, 0, None, None, None,
            TransportError.RESET, 0.0, 0.0,
        )
        self._emit(lost)
        call.attempt += 1
        fresh = await call.op.pool.connect()
        with self._armed_until(fresh, deadline):
            return await fresh.send(call.head, call.req.body, call.req.method == "HEAD")

    def _armed_until(self, conn: Connection, deadline: float) -> _Armed:
        return _Armed(self.deadlines, conn, deadline)

    # -- respond --------------------------------------------------------------------------------
    def _failed(self, call: Call) -> None:
        """Answer the app when no answer came from Stripe (Stripe's own is passed on at once)."""
        error = call.error
        assert error is not None
        self.respond.failure(call, error.caused_by_client, str(error))

    async def _stream_ended(
        self, call: Call, ended: asyncio.Future[str | None]
    ) -> None:
        """Wait for a streamed answer to end, then tell the breakers how its attempt went.

        An answer Stripe broke off mid-body is a failure, like any cut connection; one the
        client left or stalled on says nothing against Stripe.
        """
        cut = await ended
        broke_off = cut == Outcome.CONNECTION_ERROR
        self._spend(call, broke_off or call.verdict.upstream_failure, call.latency)
        if cut is not None:
            call.outcome = cut

    def _refuse(self, call: Call, reason: str) -> None:
        if reason == "client_token_required":
            self.respond.client_token_required(call)
            return
        if reason == "circuit_open":
            breaker = call.op.breaker
            wait = max(
                breaker.retry_after() if breaker is not None else 0.0,
                self.host_breaker.retry_after(),
            )
        elif reason == "rate_limited":
            wait = self.config.ratelimit.max_wait
        else:
            wait = 1.0
        self.respond.refusal(call, reason, wait)

    # -- record ---------------------------------------------------------------------------------
    def _emit_attempt(self, call: Call, duration: float) -> None:
        resp, verdict, step, error = call.resp, call.verdict, call.step, call.error
        # One test per optional part (not one per field taken from it).
        if resp is None:
            status, reason, request_id = 0, None, None
        else:
            status, reason, request_id = resp.status, resp.rate_limited_reason, resp.request_id
        kind, where = (None, None) if error is None else (error.kind, error.step)
        record = new_attempt(
            (
                call.op.name,
                call.attempt,
                verdict.outcome,
                status,
                verdict.error_code,
                reason,
                request_id,
                kind,
                duration,
                step.delay if step.give_up is None else None,
                verdict.error_param,
                where,
            )
        )
        for attempt in self._on_attempt:
            attempt(record)

    def _emit(self, record: AttemptRecord) -> None:
        for attempt in self._on_attempt:
            attempt(record)

    def _record(self, call: Call) -> None:
        resp, step = call.resp, call.step
        record = new_request(
            (
                call.op.name,
                call.req.method,
                call.status,
                call.outcome,
                call.attempt,
                self._clock() - call.start,
                resp.request_id if resp is not None else None,
                call.verdict.error_code,
                call.injected is not None,
                step.give_up if call.attempt else None,
                call.limiter_wait,
            )
        )
        for request in self._on_request:
            request(record)


class _Armed:
    """Keeps an attempt's connection armed on the sweeper while the attempt runs."""

    __slots__ = ("_conn", "_deadline", "_deadlines")

    def __init__(self, deadlines: Deadlines, conn: Connection, deadline: float) -> None:
        self._deadlines = deadlines
        self._conn = conn
        self._deadline = deadline

    def __enter__(self) -> None:
        self._deadlines.arm_at(self._conn, self._deadline)

    def __exit__(self, *exc_info: object) -> None:
        self._deadlines.disarm(self._conn)


def _error_verdict(resp: Response) -> Verdict:
    """classify_response for an answer of status 400 or more (below that: ``_SUCCESS``)."""
    return classify_response(
        resp.status,
        resp.should_retry,
        resp.rate_limited_reason,
        resp.body_bytes() if resp.complete else None,
    )


def _stale(call: Call, conn: Connection, exc: UpstreamError) -> bool:
    """Whether a failed send was a stale pooled connection's, safe to send again at once."""
    return (
        conn.reused
        and not exc.response_started
        and exc.kind is not TransportError.TIMEOUT
        and (call.has_key or call.req.method in REPEATABLE_METHODS)
    )


def _pools(config: Config, deadlines: Deadlines) -> dict[str, Pool]:
    """One keep-alive pool per upstream host name (api, files, connect, meter_events)."""
    up = config.upstream
    return {
        name: Pool(
            origin,
            connect_timeout=up.connect_timeout,
            idle_timeout=up.idle_timeout,
            max_idle=up.max_idle_per_host,
            buffer_limit=up.buffer_limit,
            max_header_bytes=up.max_header_bytes,
            max_headers=up.max_headers,
            stall_timeout=config.server.write_timeout,
            ssl_context=_ssl_context(up.ca_file) if origin.scheme == "https" else None,
            deadlines=deadlines,
        )
        for name, origin in config.origins().items()
    }


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)
