"""Configuration: frozen dataclasses, loaded from YAML with every problem reported at once.

``load_config(path)`` returns a :class:`Config` or raises one :class:`~proxy.errors.ConfigError`
whose ``problems`` name each bad value by its key path (``retry.max_attempts: -1 is not ...``)
and each unknown key (``unknown key: retry.max_atempts (did you mean max_attempts?)``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.alerts import AlertSettings, Webhook
from proxy.breaker import BreakerSettings
from proxy.errors import ConfigError
from proxy.healing import HealingSettings
from proxy.keys import KeySettings
from proxy.outbox.policy import OutboxSettings
from proxy.outbox.sqlite import sqlite_path
from proxy.ratelimit import RateLimitSettings
from proxy.retry import RetrySettings
from proxy.routes import DEFAULT_ROUTES, HostRoute, operation_table
from proxy.rules import DiagnosisSettings
from proxy.upstream import Origin

__all__ = [
    "BulkheadSettings",
    "Config",
    "IdempotencySettings",
    "LogSettings",
    "OperationLimits",
    "OperationSettings",
    "ServerSettings",
    "UpstreamSettings",
    "config_warnings",
    "load_config",
    "parse_listen",
]

LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The listening side: where, and how strict at the door."""

    listen: str = "127.0.0.1:8080"
    max_header_bytes: int = 16384
    max_body_bytes: int = 64 << 20
    header_timeout: float = 10.0
    # A request body must keep arriving (seconds between bytes) and be complete within
    # body_deadline: 300 s carries a 64 MiB upload at 0.22 MB/s (about 1.8 Mbit/s).
    body_timeout: float = 10.0
    body_deadline: float = 300.0
    idle_timeout: float = 75.0
    # A client that takes nothing of a streamed answer for this long is cut off (memory stays
    # bounded meanwhile: the upstream is not read while the client is not reading).
    write_timeout: float = 60.0
    # None: derived from the file-descriptor limit at start (see proxy.fdlimit).
    max_connections: int | None = None
    # On SIGTERM: /ready turns 503 at once, serving goes on for drain_period, then the listener
    # closes; requests in flight may run until shutdown_grace, counted from SIGTERM.
    drain_period: float = 5.0
    shutdown_grace: float = 25.0
    sidecar_headers: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Where Stripe is and how connections to it are kept."""

    hosts: Mapping[str, str] = field(
        default_factory=lambda: {
            "api": "https://api.stripe.com",
            "files": "https://files.stripe.com",
            "connect": "https://connect.stripe.com",
            "meter_events": "https://meter-events.stripe.com",
        }
    )
    routes: tuple[HostRoute, ...] = DEFAULT_ROUTES
    override: str | None = None
    connect_timeout: float = 5.0
    idle_timeout: float = 30.0
    max_idle_per_host: int = 128
    buffer_limit: int = 1 << 20
    # An answer's status line and headers beyond these are a bad answer (502), never buffered.
    max_header_bytes: int = 64 << 10
    max_headers: int = 100
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class BulkheadSettings:
    """Bounds on requests in flight to Stripe, for the whole sidecar and per operation."""

    enabled: bool = True
    max_in_flight: int = 1024
    max_in_flight_per_operation: int = 256
    max_wait: float = 1.0


@dataclass(frozen=True, slots=True)
class IdempotencySettings:
    """Making POSTs safe to repeat."""

    inject: bool = True
    key_prefix: str = "sidecar-"


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Structured JSON logs on stdout."""

    level: LogLevel = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class OperationLimits:
    """One operation's own ceilings: rate and burst (None: ``ratelimit``'s), in-flight bound."""

    endpoint_rate: float | None = None
    endpoint_burst: float | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True, slots=True)
class OperationSettings:
    """Settings that may differ per operation (``POST /v1/payment_intents``)."""

    retry: RetrySettings = field(default_factory=RetrySettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    limits: OperationLimits = field(default_factory=OperationLimits)
    # queue: when Stripe cannot be reached (breaker open, retries ended on a retryable
    # outcome), a POST with an Idempotency-Key is stored in the outbox and answered 202.
    fallback: Literal["fail", "queue"] = "fail"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the sidecar is told."""

    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    host_breaker: BreakerSettings = field(
        default_factory=lambda: BreakerSettings(min_failing_operations=3, min_calls=50)
    )
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    bulkhead: BulkheadSettings = field(default_factory=BulkheadSettings)
    idempotency: IdempotencySettings = field(default_factory=IdempotencySettings)
    log: LogSettings = field(default_factory=LogSettings)
    diagnosis: DiagnosisSettings = field(default_factory=DiagnosisSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    keys: KeySettings = field(default_factory=KeySettings)
    healing: HealingSettings = field(default_factory=HealingSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    operations: Mapping[str, OperationSettings] = field(default_factory=dict)

    def for_operation(self, operation: str) -> OperationSettings:
        """The settings in force for one operation template."""
        found = self.operations.get(operation)
        if found is not None:
            return found
        return OperationSettings(retry=self.retry, breaker=self.breaker)

    def origins(self) -> dict[str, Origin]:
        """Upstream origin per host name, with ``upstream.override`` applied to all."""
        up = self.upstream
        return {name: Origin.parse(up.override or url) for name, url in up.hosts.items()}


# -- value rules ------------------------------------------------------------------------------
# Numbers must be >= 0 unless named here.
_POSITIVE = {
    "max_attempts",
    "max_connections",
    "shutdown_grace",
    "max_header_bytes",
    "max_body_bytes",
    "header_timeout",
    "body_timeout",
    "body_deadline",
    "idle_timeout",
    "connect_timeout",
    "max_idle_per_host",
    "buffer_limit",
    "max_headers",
    "write_timeout",
    "max_in_flight",
    "max_in_flight_per_operation",
    "attempt_timeout",
    "deadline",
    "window",
    "budget_window",
    "min_calls",
    "half_open_probes",
    "min_failing_operations",
    "global_rate",
    "global_burst",
    "endpoint_rate",
    "endpoint_burst",
    "min_rate",
    "scale_constant",
    "quiet_period",
    "open_duration",
    "open_duration_max",
    "slow_call_duration",
    "probe_timeout",
    "decrease_interval",
    "interval",
    "min_count",
    "min_operations",
    "p99",
    "baseline_factor",
    "baseline_half_life",
    "recent",
    "timeout",
    "backoff",
    "queue_size",
    "poll_interval",
    "check_interval",
    "check_timeout",
    "min_in_flight",
    "restore_interval",
    "idempotency_window",
    "lease",
    "batch",
    "concurrency",
    "backoff_base",
    "backoff_max",
    "retention",
    "callback_timeout",
    "callback_attempts",
    "shared_interval",
}
_RATIO = {
    "failure_rate", "decrease_factor", "min_429_share", "ratio", "clear_ratio", "tighten_factor"
}
_METHODS = {"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "*"}


def _check_number(name: str, value: float, where: str, problems: list[str]) -> None:
    if name in _RATIO and not 0 < value <= 1:
        problems.append(f"{where}: {value!r} is not a ratio in (0, 1]")
    elif name in _POSITIVE and value <= 0:
        problems.append(f"{where}: {value!r} is not a positive number")
    elif value < 0:
        problems.append(f"{where}: {value!r} is negative")


def _convert(tp: Any, value: Any, where: str, name: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, name, problems)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(f"{where}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: {value!r} is not an integer")
            return value
        _check_number(name, value, where, problems)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: {value!r} is not a number")
            return value
        _check_number(name, value, where, problems)  # the value as written, in messages
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: {value!r} is not a string")
        return value
    raise TypeError(f"no converter for {tp!r} at {where}")  # a programming error, not user input


def _build(cls: type[Any], data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, appending every problem found to ``problems``."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            problems.append(f"unknown key: {prefix + '.' if prefix else ''}{key}{suffix}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        special = _SPECIAL.get((cls, f.name))
        before = len(problems)
        if special is not None:
            value = special(data[f.name], path, problems)
        else:
            value = _convert(hints[f.name], data[f.name], path, f.name, problems)
        if len(problems) == before or special is not None or dataclasses.is_dataclass(value):
            kwargs[f.name] = value  # a rejected value falls back to the default

    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
        return cls()


def _hosts(value: Any, where: str, problems: list[str]) -> Mapping[str, str]:
    if not isinstance(value, dict) or not value:
        problems.append(f"{where}: expected a mapping of host name to URL")
        return UpstreamSettings().hosts
    for name, url in value.items():
        try:
            Origin.parse(str(url))
        except ValueError:
            problems.append(f"{where}.{name}: {url!r} is not an http(s) URL")
    # Named hosts replace the defaults one by one; the others stay Stripe's.
    return {**UpstreamSettings().hosts, **{str(k): str(v) for k, v in value.items()}}


def _routes(value: Any, where: str, problems: list[str]) -> tuple[HostRoute, ...]:
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of {{method, prefix, host}}")
        return DEFAULT_ROUTES
    routes = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or set(item) != {"method", "prefix", "host"}:
            problems.append(f"{at}: expected exactly the keys method, prefix, host")
            continue
        method, prefix, host = item["method"], item["prefix"], item["host"]
        if method not in _METHODS:
            problems.append(f"{at}.method: {method!r} is not an HTTP method or '*'")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            problems.append(f"{at}.prefix: {prefix!r} must start with '/'")
        elif not operation_table().prefix_matches(prefix):
            hint = operation_table().suggest(f"{method if method != '*' else 'GET'} {prefix}")
            suffix = f" (did you mean {hint.partition(' ')[2]}?)" if hint else ""
            problems.append(f"{at}.prefix: {prefix!r} starts no Stripe operation{suffix}")
        routes.append(HostRoute(str(method), str(prefix), str(host)))
    return tuple(routes)


def _operations(value: Any, where: str, problems: list[str]) -> Mapping[str, Any]:
    """Per-operation overrides: partial ``retry`` / ``breaker`` sections merged later."""
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of operation to settings")
        return {}
    out: dict[str, Any] = {}
    for op, body in value.items():
        at = f"{where}.{op}"
        method, _, path = str(op).partition(" ")
        if method not in _METHODS or not path.startswith("/"):
            problems.append(f"{at}: operation must look like 'POST /v1/payment_intents'")
        elif not operation_table().accepts(str(op)):
            hint = operation_table().suggest(str(op))
            suffix = f" (did you mean {hint}?)" if hint else ""
            problems.append(f"{at}: not a Stripe operation{suffix}")
        if not isinstance(body, dict):
            problems.append(
                f"{at}: expected a mapping with retry, breaker, limits and/or fallback"
            )
            continue
        for key in body:
            if key not in ("retry", "breaker", "limits", "fallback"):
                problems.append(f"unknown key: {at}.{key}")
        out[str(op)] = body
    return out


def _webhooks(value: Any, where: str, problems: list[str]) -> tuple[Webhook, ...]:
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of URLs or {{url, format}}")
        return ()
    hooks: list[Webhook] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        data = {"url": item} if isinstance(item, str) else item
        hook: Webhook = _build(Webhook, data, at, problems)
        parts = urlsplit(hook.url) if isinstance(hook.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"{at}.url: not an http(s) URL")  # the URL itself may be a secret
            continue
        hooks.append(hook)
    return tuple(hooks)


_SPECIAL: dict[tuple[type[Any], str], Any] = {
    (AlertSettings, "webhooks"): _webhooks,
    (UpstreamSettings, "hosts"): _hosts,
    (UpstreamSettings, "routes"): _routes,
    (Config, "operations"): _operations,
}


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts; ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _cross_checks(config: Config, problems: list[str]) -> None:
    try:
        parse_listen(config.server.listen)
    except ValueError as exc:
        problems.append(f"server.listen: {exc}")
    if config.upstream.override is not None:
        try:
            Origin.parse(config.upstream.override)
        except ValueError:
            problems.append(
                f"upstream.override: {config.upstream.override!r} is not an http(s) URL"
            )
    if config.server.drain_period > config.server.shutdown_grace:
        problems.append(
            f"server.drain_period: {config.server.drain_period} exceeds shutdown_grace "
            "(the grace is counted from SIGTERM and includes the drain)"
        )
    for i, route in enumerate(config.upstream.routes):
        if route.host not in config.upstream.hosts:
            problems.append(f"upstream.routes[{i}].host: {route.host!r} is not in upstream.hosts")
    _ratelimit_checks(config, problems)
    _outbox_checks(config, problems)
    sections: list[tuple[str, RetrySettings]] = [("retry", config.retry)]
    sections += [(f"operations.{op}.retry", s.retry) for op, s in config.operations.items()]
    for op, settings in config.operations.items():
        if settings.retry.max_replay_body != config.retry.max_replay_body:
            # The door decides to buffer or stream a body before it knows the operation.
            problems.append(
                f"operations.{op}.retry.max_replay_body: set it for all operations, in retry"
            )
    breakers = [("breaker", config.breaker)]
    breakers += [
        (f"operations.{op}.breaker", s.breaker)
        for op, s in config.operations.items()
        if s.breaker.min_failing_operations != config.breaker.min_failing_operations
    ]
    for where, breaker in breakers:
        if breaker.min_failing_operations > 1:
            # An operation's breaker only ever sees its own operation: it could never open.
            problems.append(
                f"{where}.min_failing_operations: {breaker.min_failing_operations} would keep "
                "an operation's breaker from ever opening; it applies to host_breaker only"
            )
    for where, retry in sections:
        if retry.base_delay > retry.max_delay:
            problems.append(f"{where}.base_delay: {retry.base_delay} exceeds max_delay")
        if retry.deadline >= 80:
            problems.append(
                f"{where}.deadline: {retry.deadline} must stay under the SDKs' 80 s timeout"
            )


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a Redis URL (``redis://host:6379/0``, ``rediss://``, ``unix://``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in _REDIS_SCHEMES:
        return "is not a redis://, rediss:// or unix:// URL"
    if parts.scheme != "unix" and not parts.hostname:
        return "names no host (redis://HOST:6379/0)"
    if parts.scheme == "unix" and not parts.path:
        return "names no socket path (unix:///path/redis.sock)"
    return None


def _ratelimit_checks(config: Config, problems: list[str]) -> None:
    rl = config.ratelimit
    if rl.shared is not None:
        problem = redis_url_problem(rl.shared)
        if problem is not None:  # the URL is not echoed: it may hold a password
            problems.append(f"ratelimit.shared: {problem}")
        elif not rl.enabled:
            problems.append("ratelimit.shared: set, but ratelimit.enabled is false")
    if rl.decrease_factor >= 1:
        problems.append(f"ratelimit.decrease_factor: {rl.decrease_factor} must be below 1")
    pairs = [("ratelimit.global", rl.global_rate, rl.global_burst)]
    pairs.append(("ratelimit.endpoint", rl.endpoint_rate, rl.endpoint_burst))
    pairs += [
        (f"operations.{op}.limits.endpoint", s.limits.endpoint_rate, s.limits.endpoint_burst)
        for op, s in config.operations.items()
    ]
    for where, rate, burst in pairs:
        if burst is not None and burst < 1:
            problems.append(f"{where}_burst: {burst} is below 1 request")
        if burst is not None and rate is None:
            problems.append(f"{where}_burst: a burst needs a ceiling rate ({where}_rate)")


def _outbox_checks(config: Config, problems: list[str]) -> None:
    for op, settings in config.operations.items():
        if settings.fallback != "queue":
            continue
        method, _, path = op.partition(" ")
        if method != "POST":
            problems.append(
                f"operations.{op}.fallback: queue is for POST operations only (a write made "
                "safe to send later by its Idempotency-Key)"
            )
        elif path.startswith("/oauth/"):
            problems.append(
                f"operations.{op}.fallback: connect.stripe.com takes no Idempotency-Key, so "
                "OAuth calls cannot be queued"
            )
    ob = config.outbox
    if ob.store is not None:
        problems.extend(store_url_problems(ob.store, "outbox.store"))
    if ob.safety_margin >= ob.idempotency_window:
        problems.append(
            f"outbox.safety_margin: {ob.safety_margin} leaves nothing of the idempotency window"
        )
    if ob.backoff_base > ob.backoff_max:
        problems.append(f"outbox.backoff_base: {ob.backoff_base} exceeds backoff_max")
    deadline = max([config.retry.deadline] + [s.retry.deadline for s in config.operations.values()])
    in_use = ob.store is not None or any(
        s.fallback == "queue" for s in config.operations.values()
    )
    if in_use and ob.lease <= deadline:
        problems.append(
            f"outbox.lease: {ob.lease} must outlast a delivery's retries (retry.deadline "
            f"{deadline}), or a second deliverer could claim an item still being sent"
        )
    if ob.callback_url is not None:
        parts = urlsplit(ob.callback_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("outbox.callback_url: not an http(s) URL")


def store_url_problems(url: str, where: str) -> list[str]:
    """Problems with an outbox store URL (the URL is never echoed: it may hold a password)."""
    if url.startswith("sqlite:"):
        try:
            sqlite_path(url)
        except ValueError:
            return [f"{where}: a SQLite store is sqlite:///relative/path or sqlite:////absolute/path"]
        return []
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        return []
    return [f"{where}: not a sqlite:///PATH or redis://HOST:PORT/DB URL"]


# Kubernetes' default terminationGracePeriodSeconds: the kubelet kills the container after it.
_K8S_TERMINATION_GRACE = 30.0


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but probably not meant (logged at start, never fatal)."""
    out: list[str] = []
    s = config.server
    if s.shutdown_grace < s.drain_period + config.retry.deadline:
        out.append(
            f"server.shutdown_grace {s.shutdown_grace} is under drain_period + retry.deadline "
            f"({s.drain_period + config.retry.deadline}): a request accepted at the end of the "
            "drain may be answered 503 sidecar_shutting_down before its retries are done"
        )
    if s.shutdown_grace >= _K8S_TERMINATION_GRACE:
        out.append(
            f"server.shutdown_grace {s.shutdown_grace} reaches Kubernetes' default termination "
            "grace (30 s): raise the pod's terminationGracePeriodSeconds above it"
        )
    return out


def config_from_dict(data: Any, *, source: str = "config") -> Config:
    """Build a :class:`Config` from parsed YAML; raise ConfigError listing every problem."""
    problems: list[str] = []
    config: Config = _build(Config, data, "", problems)
    if isinstance(config.operations, dict) and config.operations:
        resolved: dict[str, OperationSettings] = {}
        for op, body in config.operations.items():
            _global_only(body.get("retry"), f"operations.{op}.retry", problems)
            retry = _merge(
                RetrySettings, config.retry, body.get("retry"), f"operations.{op}.retry", problems
            )
            breaker = _merge(
                BreakerSettings,
                config.breaker,
                body.get("breaker"),
                f"operations.{op}.breaker",
                problems,
            )
            limits = _build(
                OperationLimits, body.get("limits"), f"operations.{op}.limits", problems
            )
            fallback = body.get("fallback", "fail")
            if fallback not in ("fail", "queue"):
                problems.append(
                    f"operations.{op}.fallback: {fallback!r} is not one of 'fail', 'queue'"
                )
                fallback = "fail"
            resolved[op] = OperationSettings(
                retry=retry, breaker=breaker, limits=limits, fallback=fallback
            )
        config = dataclasses.replace(config, operations=resolved)
    _cross_checks(config, problems)
    if problems:
        raise ConfigError(problems, source)
    return config


# One retry budget is shared by every operation, so these keys mean nothing per operation.
_RETRY_GLOBAL_ONLY = ("budget_ratio", "budget_min_per_second", "budget_window")


def _global_only(partial: Any, where: str, problems: list[str]) -> None:
    if isinstance(partial, dict):
        for key in _RETRY_GLOBAL_ONLY:
            if key in partial:
                problems.append(
                    f"{where}.{key}: the retry budget is shared by all operations; set it in retry"
                )


def _merge(cls: type[Any], base: Any, partial: Any, where: str, problems: list[str]) -> Any:
    if partial is None:
        return base
    merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    if isinstance(partial, dict):
        merged.update(partial)
    return _build(cls, merged, where, problems)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a YAML file into a :class:`Config` (``None``: the built-in defaults)."""
    if path is None:
        return Config()
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            [f"{line}not valid YAML: {getattr(exc, 'problem', exc)}"], source
        ) from None
    return config_from_dict(data, source=source)


def with_overrides(
    config: Config,
    *,
    listen: str | None,
    upstream: str | None,
    outbox_store: str | None = None,
    ratelimit_shared: str | None = None,
) -> Config:
    """Apply command-line / environment settings on top of a loaded config, validated."""
    server = config.server
    up = config.upstream
    if outbox_store:
        bad = store_url_problems(outbox_store, "STRIPE_SIDECAR_OUTBOX_STORE")
        if bad:
            raise ConfigError(bad, "environment")
        config = dataclasses.replace(
            config, outbox=dataclasses.replace(config.outbox, store=outbox_store)
        )
    if listen is not None:
        server = dataclasses.replace(server, listen=listen)
    if upstream is not None:
        up = dataclasses.replace(up, override=upstream)
    config = dataclasses.replace(config, server=server, upstream=up)
    if ratelimit_shared:
        rl = dataclasses.replace(config.ratelimit, shared=ratelimit_shared)
        config = dataclasses.replace(config, ratelimit=rl)
    problems: list[str] = []
    _cross_checks(config, problems)
    if problems:
        raise ConfigError(problems, "command line")
    return config
