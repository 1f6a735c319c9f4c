"""Wiring: the server, the pipeline and the operator endpoints, and their lifecycle."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, Any

from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.alerts import Notifier
from proxy.config import Config, config_warnings, parse_listen
from proxy.deadlines import Deadlines
from proxy.diagnosis import DiagnosisEngine
from proxy.errors import ConfigError
from proxy.fdlimit import FdPlan, plan_connections, raise_nofile_limit
from proxy.forward import Forwarder
from proxy.healing import Healer
from proxy.keycheck import KeyKeeper, read_keys_file
from proxy.keys import ENV_KEYS, ENV_TOKEN, HeldKey, KeySet, keys_from_env
from proxy.log import Logger
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.observers import BuiltinObserver
from proxy.outbox.service import Outbox
from proxy.records import Observer
from proxy.replies import reason_phrase
from proxy.server import Request, Server, ShutdownReport
from proxy.sharedlimit import SharedLimit, identity_of
from proxy.status import DiagnosisSurfaces, status_page

__all__ = ["EXIT_UNFINISHED", "Sidecar", "serve"]

# Exit status when the shutdown grace ran out with requests unfinished (1 and 2 are start-up
# failures: see proxy.cli).
EXIT_UNFINISHED = 3
OPERATOR_PATHS = frozenset({"/health", "/ready", "/metrics", "/diagnosis", "/status"})
OUTBOX_PREFIX = "/outbox/"


class _WithOutbox:
    """The operator paths plus ``/outbox`` and everything under it (only with the outbox on)."""

    __slots__ = ("_exact",)

    def __init__(self, exact: frozenset[str]) -> None:
        self._exact = exact | {"/outbox"}

    def __contains__(self, path: object) -> bool:
        return path in self._exact or (isinstance(path, str) and path.startswith(OUTBOX_PREFIX))


def _json_answer(status: int, payload: object, *, keep_alive: bool = True) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    reason = reason_phrase(status)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (status, reason, len(body), body)
    )


class Sidecar:
    """One running sidecar: ``await start()``, then ``await stop()``.

    ``observers`` receive the outcome records of every attempt and answer (``proxy.records``),
    after the built-in metrics and access log.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        log_stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        observers: Sequence[Observer] = (),
        secret_keys: Sequence[str] = (),
        client_token: str | None = None,
        wall: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        # The Stripe keys the sidecar holds (None: apps send their own); ConfigError when
        # holding them here would be unsafe.
        self.keys = held_keys(config, secret_keys, client_token)
        self.keeper: KeyKeeper | None = None
        self.healer: Healer | None = None
        self._extra_observers = tuple(observers)
        self._sleep = sleep
        self._rand = rand
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.log = Logger(log_stream, level=config.log.level, access_log=config.log.access_log)
        self._clock = clock
        self.started_at = clock()
        self.forwarder: Forwarder | None = None
        self.server: Server | None = None
        self.port = 0
        self._flusher: asyncio.TimerHandle | None = None
        self._limited_scopes: set[str] = set()  # scopes with a ratelimit_rate sample
        self.report: ShutdownReport | None = None  # how the last stop() ended
        # Every time-out (client heads, bodies, idle connections, attempts, streams) is swept
        # by this one owner, on the injected clock: a test moves a fake clock and sweeps.
        self.deadlines = Deadlines(clock, _sweep_resolution(config))
        self._evaluator: asyncio.TimerHandle | None = None
        self.notifier: Notifier | None = None
        self.shared_limit: SharedLimit | None = None
        self.diagnosis = DiagnosisEngine(config.diagnosis, clock=clock)
        self._surfaces = DiagnosisSurfaces(
            self.diagnosis, registry=self.registry, log=self.log, set_header=self._set_diagnosis
        )
        self.outbox = Outbox(
            config, registry=self.registry, log=self.log,
            environ=os.environ if environ is None else environ,
            keys_held=self.keys is not None, wall=wall, rand=rand,
            report_store=self._outbox_store_status,
        )  # fmt: skip

    async def start(self) -> int:
        """Listen on ``server.listen``; return the bound port."""
        self.deadlines.start()
        self.forwarder = Forwarder(
            self.config,
            metrics=self.metrics,
            logger=self.log,
            observers=[
                BuiltinObserver(self.metrics, self.log),
                *([self.diagnosis.recorder] if self.config.diagnosis.enabled else []),
                *self._extra_observers,
            ],
            clock=self._clock,
            sleep=self._sleep,
            rand=self._rand,
            deadlines=self.deadlines,
            keys=self.keys,
            on_key_failover=self._key_failover,
            outbox=self.outbox.capture,
        )
        await self.outbox.start(self.forwarder)
        s = self.config.server
        plan = self._plan_fds()
        self.server = Server(
            self,
            self.forwarder.forward,
            max_header_bytes=s.max_header_bytes,
            max_body_bytes=s.max_body_bytes,
            max_buffered_body=self.config.retry.max_replay_body,
            header_timeout=s.header_timeout,
            idle_timeout=s.idle_timeout,
            operator_paths=_WithOutbox(OPERATOR_PATHS) if self.outbox.enabled else OPERATOR_PATHS,
            max_connections=plan.max_connections,
            overflow=plan.overflow,
            on_overload=self.metrics.connections_over_bound.inc,
            body_timeout=s.body_timeout,
            body_deadline=s.body_deadline,
            write_timeout=s.write_timeout,
            deadlines=self.deadlines,
        )
        host, port = parse_listen(s.listen)
        self.port = await self.server.start(host, port)
        self.started_at = self._clock()
        self._schedule_flush()
        for warning in config_warnings(self.config):
            self.log.event("config_warning", "warning", message=warning)
        self._start_diagnosis()
        self._start_keys_and_healing()
        self._start_shared_limit()
        self.log.event(
            "started",
            version=__version__,
            listen=f"{host}:{self.port}",
            max_connections=plan.max_connections,
            upstreams={n: p.origin.url for n, p in self.forwarder.pools.items()},
        )
        return self.port

    def _plan_fds(self) -> FdPlan:
        """Raise the descriptor limit and bound client connections by it (logged)."""
        before, soft, hard = raise_nofile_limit()
        plan = plan_connections(soft, self.config.server.max_connections)
        self.log.event("fd_limit", soft_before=before, soft=soft, hard=hard)
        if plan.warning is not None:
            self.log.event("config_warning", "warning", message=plan.warning)
        return plan

    def _start_diagnosis(self) -> None:
        if self.config.diagnosis.enabled:
            self._evaluator = asyncio.get_running_loop().call_later(
                self.config.diagnosis.interval, self._evaluate
            )
        if self.config.alerts.webhooks:
            self.notifier = Notifier(self.config.alerts, self.diagnosis, log=self.log)
            self.notifier.start()

    def _start_keys_and_healing(self) -> None:
        fw = self.forwarder
        assert fw is not None
        if self.keys is not None:
            self.keeper = KeyKeeper(
                self.keys, self.config.keys, pool=fw.pools["api"], engine=self.diagnosis,
                log=self.log, diagnose=self.config.diagnosis.enabled,
            )  # fmt: skip
            self.keeper.start()
        if self.config.healing.enabled and self.config.diagnosis.enabled:
            self.healer = Healer(
                self.diagnosis, self.config.healing, pools=fw.pools.values,
                compartments=fw.compartments, clock=self._clock,
            )  # fmt: skip

    def _outbox_store_status(self, url: str, error: str | None) -> None:
        self.diagnosis.report_store(
            "outbox.store", url, error, severity="critical",
            effect="writes to fallback: queue operations get the usual failure answer, not 202, "
            "and queued writes wait",
        )  # fmt: skip

    def _start_shared_limit(self) -> None:
        fw = self.forwarder
        assert fw is not None
        url = self.config.ratelimit.shared
        if url is None or fw.limiter is None:
            return
        self.shared_limit = SharedLimit(
            url, fw.limiter, identity=self.fleet_identity, engine=self.diagnosis, log=self.log,
            registry=self.registry, interval=self.config.ratelimit.shared_interval,
            clock=self._clock,
        )  # fmt: skip
        self.shared_limit.start()

    def fleet_identity(self) -> str | None:
        """Which account's shared limiter state this sidecar joins (never the key itself).

        Held keys: the account id their check found (else a digest of the active key). The
        app's own key: a digest of it, from its requests. None before any request.
        """
        if self.keys is not None:
            if self.keys.account is not None:
                return "acct-" + self.keys.account
            return identity_of(b"Bearer " + self.keys.active.secret.encode())
        fw = self.forwarder
        if fw is None or fw.fleet_auth is None:
            return None
        return identity_of(fw.fleet_auth)

    def _key_failover(self, used: HeldKey, target: HeldKey, operation: str) -> None:
        if self.keeper is not None:
            self.keeper.failed_over(used, target, operation)

    def _evaluate(self) -> None:
        """Run the diagnosis rules and the healer's steps (on a timer, never per request)."""
        try:
            self.diagnosis.evaluate()
            if self.healer is not None:
                self.healer.tick()
        except Exception as exc:  # a bug in a rule must not stop diagnosis for good
            self.log.event("internal_error", "error", where="diagnosis", error=repr(exc))
        loop = asyncio.get_running_loop()
        self._evaluator = loop.call_later(self.config.diagnosis.interval, self._evaluate)

    def _set_diagnosis(self, line: bytes) -> None:
        if self.forwarder is not None:
            self.forwarder.respond.diagnosis_line = line

    def _schedule_flush(self) -> None:
        self.log.flush()
        loop = asyncio.get_running_loop()
        self._flusher = loop.call_later(0.5, self._schedule_flush)

    async def stop(self, hurry: asyncio.Event | None = None) -> bool:
        """Shut down like a sidecar (drain, stop accepting, grace); True if every request finished.

        Setting ``hurry`` ends the drain period early (a second SIGTERM/SIGINT).
        """
        if self.report is not None:
            return self.report.clean  # stopped already
        s = self.config.server
        report = ShutdownReport(0, 0)
        if self._evaluator is not None:
            self._evaluator.cancel()
        if self.keeper is not None:
            self.keeper.stop()
        # Rounds under way finish within the grace, like the app's requests; nothing new starts
        # (a round cut at the end is claimed again: at the next start, or after its lease).
        self.outbox.stop_claiming()
        if self.server is not None:
            self.log.event("draining", drain_period=s.drain_period, shutdown_grace=s.shutdown_grace)
            report = await self.server.shutdown(s.drain_period, s.shutdown_grace, hurry=hurry)
        if self.notifier is not None:
            await self.notifier.stop()
        await self.outbox.stop()
        if self.shared_limit is not None:
            await self.shared_limit.stop()
        if self.forwarder is not None:
            self.forwarder.close()
        if self._flusher is not None:
            self._flusher.cancel()
        self.deadlines.stop()
        self.report = report
        self.log.event(
            "stopped",
            "info" if report.clean else "warning",
            clean=report.clean,
            unfinished=report.unfinished,
            connections_cut=report.connections_cut,
        )
        self.log.flush()
        return report.clean

    # -- Handler protocol (used by proxy.server) -------------------------------------------
    def operator(self, request: Request, path: str) -> bytes | Awaitable[bytes] | None:
        """Answer /health, /ready, /metrics, /diagnosis, /status and /outbox (HEAD: the head alone).

        /metrics and /outbox are answered later (an awaitable): off the event loop, or from the
        store.
        """
        if path == "/outbox" or path.startswith(OUTBOX_PREFIX):
            return self._outbox_answer(request, path)
        if request.method not in ("GET", "HEAD"):
            return _json_answer(
                405,
                {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "sidecar_method_not_allowed",
                        "message": f"{path} answers GET only.",
                    }
                },
            )
        if path == "/metrics":
            return self._metrics_answer(head_only=request.method == "HEAD")
        answer = self._operator(path)
        if answer is not None and request.method == "HEAD":
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        return answer

    def _operator(self, path: str) -> bytes | None:
        if path == "/health":
            return _json_answer(
                200,
                {
                    "status": "ok",
                    "version": __version__,
                    "uptime_seconds": round(self._clock() - self.started_at, 3),
                },
            )
        if path == "/ready":
            stopping = self.server is None or self.server.stopping
            payload = {"ready": not stopping, "breakers": self._breaker_summary()}
            return _json_answer(503 if stopping else 200, payload)
        if path == "/diagnosis":
            return _json_answer(200, self.diagnosis_report())
        if path == "/status":
            page = status_page(self.diagnosis_report(), __version__)
            return (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Cache-Control: no-store\r\nContent-Length: %d\r\n\r\n%b" % (len(page), page)
            )
        return None

    async def _outbox_answer(self, request: Request, path: str) -> bytes:
        """The /outbox endpoints; changes need the client token when the sidecar has one."""
        method = request.method
        token = self.keys.client_auth if self.keys is not None else None
        if method not in ("GET", "HEAD") and token is not None:
            sent = request.authorization
            if sent is None or not hmac.compare_digest(sent, token):
                return _json_answer(401, {"error": {
                    "type": "invalid_request_error", "code": "sidecar_client_token_required",
                    "message": "Changing the outbox needs the sidecar's client token as the "
                    "API key (Authorization: Bearer <token>).",
                }})  # fmt: skip
        _, _, query = request.target.partition(b"?")
        status, payload = await self.outbox.api(
            "GET" if method == "HEAD" else method, path, query.decode("latin-1")
        )
        answer = _json_answer(status, payload)
        if method == "HEAD":
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        return answer

    def diagnosis_report(self) -> dict[str, Any]:
        """The /diagnosis document: active and recent diagnoses, actions, operations."""
        breakers = {}
        if self.forwarder is not None:
            breakers = {s: b.state.value for s, b in self.forwarder.breakers().items()}
        report = self.diagnosis.report(breakers)
        report["enabled"] = self.config.diagnosis.enabled
        if self.forwarder is not None and self.forwarder.limiter is not None:
            shared = self.shared_limit.status() if self.shared_limit is not None else None
            report["ratelimit"] = {"scopes": self.forwarder.limiter.state(), "shared": shared}
        report["upstream_breaker"] = breakers.get("upstream", "closed")
        report["outbox"] = self.outbox.summary()
        return report

    async def _metrics_answer(self, *, head_only: bool) -> bytes:
        """The /metrics answer, rendered in a worker thread so requests keep flowing meanwhile."""
        self._refresh_gauges()
        try:
            body = await self.metrics.render_async()
        except Exception as exc:  # a broken collector must not leave the scraper hanging
            self.log.event("metrics_failed", level="error", error=type(exc).__name__)
            error = {
                "type": "api_error",
                "code": "sidecar_metrics_failed",
                "message": "The sidecar could not render its metrics; see its log.",
            }
            return _json_answer(503, {"error": error})
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
            CONTENT_TYPE.encode(),
            len(body),
        )
        return head if head_only else head + body

    def _refresh_gauges(self) -> None:
        """Bring state that changes with time alone (limiter rates, breakers) up to now."""
        fw = self.forwarder
        if fw is None:
            return
        for breaker in fw.breakers().values():
            _ = breaker.state  # moves OPEN -> HALF_OPEN when due, which updates its gauge
        if fw.limiter is not None:
            # Only scopes that limit now have a rate; a dormant one has no sample at all.
            rates = fw.limiter.rates()
            gauge = self.metrics.limiter_rate
            for scope in self._limited_scopes - rates.keys():
                gauge.remove(scope)
            for scope, rate in rates.items():
                gauge.labels(scope).set(rate)
            self._limited_scopes = set(rates)

    def _breaker_summary(self) -> dict[str, str]:
        if self.forwarder is None:
            return {}
        return {
            scope: b.state.value
            for scope, b in self.forwarder.breakers().items()
            if b.state.value != "closed"
        }


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def held_keys(config: Config, secret_keys: Sequence[str], token: str | None) -> KeySet | None:
    """The keys the sidecar holds (from the environment or ``keys.file``), or None.

    ConfigError when both sources are set, the file has no usable key, or the sidecar would
    hold keys while listening beyond loopback without a client token.
    """
    path = config.keys.file
    if path is not None and secret_keys:
        raise ConfigError([f"keys.file: set it or {ENV_KEYS}, not both"], "keys")
    keys = list(secret_keys) if secret_keys else read_keys_file(path) if path else []
    if not keys:
        return None
    host, _ = parse_listen(config.server.listen)
    if token is None and not _loopback(host):
        raise ConfigError(
            [
                f"server.listen: {config.server.listen} is beyond loopback and the sidecar holds "
                f"Stripe keys, so anyone who reaches it could spend them: set {ENV_TOKEN} (apps "
                "then use it as their API key), or listen on 127.0.0.1"
            ],
            "keys",
        )
    return KeySet(keys, token)


def _sweep_resolution(config: Config) -> float:
    """How often deadlines are swept: a fifth of the shortest time-out, within 10-250 ms."""
    s, r = config.server, config.retry
    shortest = min(
        [s.header_timeout, s.idle_timeout, s.body_timeout, r.attempt_timeout]
        + [o.retry.attempt_timeout for o in config.operations.values()]
    )
    return min(0.25, max(0.01, shortest / 5))


async def serve(config: Config, *, ready: Callable[[int], None] | None = None) -> int:
    """Run the sidecar until SIGTERM/SIGINT, shut down, and return the exit status.

    0 when every request finished within the grace period, :data:`EXIT_UNFINISHED` when some
    were answered ``503 sidecar_shutting_down`` or cut (the ``stopped`` event says how many).
    A second signal ends the drain period at once; requests in flight keep their grace.
    """
    keys, problems, token = keys_from_env(os.environ)
    if problems:
        raise ConfigError(problems, "environment")
    sidecar = Sidecar(config, secret_keys=keys, client_token=token)
    port = await sidecar.start()
    if ready is not None:
        ready(port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    clean = await sidecar.stop(hurry)
    return 0 if clean else EXIT_UNFINISHED
