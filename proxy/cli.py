"""The ``stripe-sidecar`` command: serve, simulate, demo, check-config, doctor, outbox.

Only this module exits.

Exit statuses: 0 success (for ``serve``: every request finished within the shutdown grace);
1 an OS error at start (port in use...); 2 a usage or config error; 3 ``serve`` stopped with
requests still running at the grace end (answered ``503 sidecar_shutting_down``, or answers
cut: the ``stopped`` log event counts them); 130 interrupted before the sidecar was serving.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, load_config, with_overrides
from proxy.errors import ConfigError

__all__ = ["main"]


def _env(name: str) -> str | None:
    """A setting from the environment; set but empty is unset (``VAR=`` in compose files)."""
    return os.environ.get(name) or None


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _add_doctor(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="check DNS, connect, TLS, clock and keys, step by step")
    doctor.add_argument("--config", default=_env("STRIPE_SIDECAR_CONFIG"))
    doctor.add_argument(
        "--upstream",
        default=_env("STRIPE_SIDECAR_UPSTREAM"),
        help="check this URL instead of the configured Stripe API host",
    )
    doctor.add_argument(
        "--key",
        action="append",
        default=[],
        help="a Stripe secret key to check (repeatable; default: STRIPE_SIDECAR_SECRET_KEYS, "
        "else the config's keys.file)",
    )
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per step")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stripe-sidecar",
        description="A Stripe-aware sidecar proxy: safe retries, circuit breakers, rate limits.",
    )
    p.add_argument("--version", action="version", version=f"stripe-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument(
        "--config",
        default=_env("STRIPE_SIDECAR_CONFIG"),
        help="YAML config file (env STRIPE_SIDECAR_CONFIG)",
    )
    serve.add_argument(
        "--listen",
        default=_env("STRIPE_SIDECAR_LISTEN"),
        help="HOST:PORT to listen on (env STRIPE_SIDECAR_LISTEN; default 127.0.0.1:8080)",
    )
    serve.add_argument(
        "--upstream",
        default=_env("STRIPE_SIDECAR_UPSTREAM"),
        help="send every Stripe host's traffic to this URL, e.g. a local simulator "
        "(env STRIPE_SIDECAR_UPSTREAM; default: Stripe's own hosts)",
    )

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path")

    sim = sub.add_parser("simulate", help="run the Stripe simulator (for tests and demos)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=12111)
    sim.add_argument("--profile", default="none", help="fault profile (none, bad_day, outage, ...)")
    sim.add_argument("--seed", type=int, default=0)
    for name, what in (
        ("account-rate", "rate limit per API key, requests/s (429 global-rate; default: none)"),
        ("account-burst", "burst of the account limit (default: one second of its rate)"),
        ("endpoint-rate", "rate limit per API key and operation (429 endpoint-rate)"),
        ("endpoint-burst", "burst of the endpoint limit"),
    ):
        sim.add_argument(f"--{name}", type=float, default=None, help=what)

    _add_doctor(sub)
    _add_outbox(sub)
    _add_demo(sub)
    return p


def _add_outbox(sub: Any) -> None:
    outbox = sub.add_parser("outbox", help="list, show, retry or drop the running sidecar's "
                            "queued writes")  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("STRIPE_SIDECAR_URL"),
        help="the sidecar (env STRIPE_SIDECAR_URL; default from STRIPE_SIDECAR_LISTEN, else "
        "http://127.0.0.1:8080)",
    )
    actions = outbox.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="counts by state and the items", parents=[common])
    ls.add_argument("--state", choices=["queued", "delivering", "delivered", "failed", "expired"])
    ls.add_argument("--operation", help='e.g. "POST /v1/customers"')
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="the /outbox document as it is")
    show = actions.add_parser(
        "show", help="one item, with Stripe's answer and its audit trail", parents=[common]
    )
    show.add_argument("id")
    retry = actions.add_parser(
        "retry", help="queue a failed item again (never an expired one)", parents=[common]
    )
    retry.add_argument("id")
    drop = actions.add_parser("drop", help="delete an item (audited)", parents=[common])
    drop.add_argument("id")
    drop.add_argument("--reason", help="recorded in the audit trail and the log")


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="show the sidecar against the simulator's faults")
    demo.add_argument("--requests", type=int, default=600, help="payments per run")
    demo.add_argument("--concurrency", type=int, default=20)
    demo.add_argument("--profile", default="bad_day")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--skip-outage",
        action="store_true",
        help="skip the second phase (Stripe down for 7 s behind a sidecar; about 12 s)",
    )
    demo.add_argument(
        "--skip-rate-limit",
        action="store_true",
        help="skip the third phase (an app past the account's rate limit; about 9 s)",
    )
    demo.add_argument(
        "--skip-key-failover",
        action="store_true",
        help="skip the fourth phase (the primary API key revoked mid-run; about 3 s)",
    )
    demo.add_argument(
        "--skip-outbox",
        action="store_true",
        help="skip the fifth phase (payments queued during an outage, then delivered; about 6 s)",
    )


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return with_overrides(
        config,
        listen=args.listen,
        upstream=args.upstream,
        outbox_store=_env("STRIPE_SIDECAR_OUTBOX_STORE"),
        ratelimit_shared=_env("STRIPE_SIDECAR_RATELIMIT_SHARED"),
    )


def _outbox(args: argparse.Namespace) -> int:
    from proxy.outbox.operator import default_url, run

    return run(
        args.action,
        url=args.url or default_url(os.environ),
        item_id=getattr(args, "id", None),
        state=getattr(args, "state", None),
        operation=getattr(args, "operation", None),
        limit=getattr(args, "limit", 100),
        reason=getattr(args, "reason", None),
        as_json=getattr(args, "json", False),
        token=os.environ.get("STRIPE_SIDECAR_CLIENT_TOKEN") or None,
    )


def _doctor(args: argparse.Namespace) -> int:
    from proxy.doctor import doctor

    config = load_config(args.config)
    upstream = args.upstream or config.upstream.override or config.upstream.hosts["api"]
    keys = args.key or [
        k.strip() for k in os.environ.get("STRIPE_SIDECAR_SECRET_KEYS", "").split(",") if k.strip()
    ]
    if not keys and config.keys.file is not None:
        from proxy.keycheck import read_keys_file

        keys = read_keys_file(config.keys.file)
    return _run(doctor(upstream, keys, ca_file=config.upstream.ca_file, timeout=args.timeout))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            load_config(args.path)
            print(f"{args.path}: ok")
            return 0
        if args.command == "serve":
            from proxy.app import serve

            config = _load(args)
            return _run(serve(config))
        if args.command == "simulate":
            from proxy.simulator import run_simulator

            try:
                limits = {
                    k: v
                    for k in ("account_rate", "account_burst", "endpoint_rate", "endpoint_burst")
                    if (v := getattr(args, k)) is not None
                }
                run_simulator(args.host, args.port, args.profile, args.seed, limits)
            except ValueError as exc:  # an unknown fault profile or a bad limit
                print(f"stripe-sidecar simulate: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "outbox":
            return _outbox(args)
        if args.command == "demo":
            from proxy.demo import run_demo

            return _run(
                run_demo(
                    requests=args.requests,
                    concurrency=args.concurrency,
                    profile=args.profile,
                    seed=args.seed,
                    outage=not args.skip_outage,
                    rate_limit=not args.skip_rate_limit,
                    key_failover=not args.skip_key_failover,
                    outbox=not args.skip_outbox,
                )
            )
    except ConfigError as exc:
        print(f"stripe-sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stripe-sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
