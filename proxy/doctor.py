"""``stripe-sidecar doctor``: check, step by step, what a request to Stripe needs.

Steps, in order (a failed step skips those that need it): the configured upstream; DNS; TCP
connect; TLS handshake and certificate (``skipped (http)`` for a plain-HTTP upstream such as the
simulator); clock skew from the upstream's ``Date``; then each key given with
``GET /v1/account`` (valid? which account?). Keys are shown by their last 4 characters only.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from proxy.upstream import Origin

__all__ = ["Step", "doctor", "mask", "run_checks", "verdict_lines"]

MAX_SKEW = 60.0  # seconds; Stripe's webhook signatures tolerate 300 s, we want far less


@dataclass(frozen=True, slots=True)
class Step:
    """One check's verdict: ``ok`` True (pass), False (fail) or None (skipped)."""

    name: str
    ok: bool | None
    detail: str


def mask(key: str) -> str:
    """A key as shown to people: its last 4 characters only."""
    return "…" + key[-4:] if len(key) > 8 else "…"


async def run_checks(
    upstream: str,
    keys: Sequence[str],
    *,
    ca_file: str | None = None,
    timeout: float = 5.0,
    wall: Callable[[], float] = time.time,
) -> list[Step]:
    """Run every step against ``upstream`` (a URL) and return the verdicts in order."""
    steps: list[Step] = []
    try:
        origin = Origin.parse(upstream)
    except ValueError as exc:
        return [Step("upstream", False, str(exc))]
    steps.append(Step("upstream", True, origin.url))
    addresses = await _dns(origin, timeout, steps)
    if addresses is None or not await _connect(origin, addresses[0], timeout, steps):
        return _skip_rest(steps, keys)
    context = ssl.create_default_context(cafile=ca_file) if origin.scheme == "https" else None
    if context is None:
        steps.append(Step("tls", None, "skipped (http)"))
    elif not await _tls(origin, context, timeout, steps, wall):
        return _skip_rest(steps, keys, after="tls")
    verify: ssl.SSLContext | bool = context if context is not None else False
    async with httpx.AsyncClient(base_url=origin.url, timeout=timeout, verify=verify) as client:
        await _clock(client, steps, wall)
        accounts = [await _key(client, key, steps) for key in keys]
    if not keys:
        none = "skipped (none given: --key or STRIPE_SIDECAR_SECRET_KEYS)"
        steps.append(Step("keys", None, none))
    distinct = {a for a in accounts if a is not None}
    if len(distinct) > 1:
        accounts_text = ", ".join(sorted(distinct))
        steps.append(Step("keys", False, f"the keys belong to different accounts: {accounts_text}"))
    return steps


def _skip_rest(steps: list[Step], keys: Sequence[str], after: str = "connect") -> list[Step]:
    names = ["tls", "clock"] if after == "connect" else ["clock"]
    steps.extend(Step(n, None, f"skipped ({after} failed)") for n in names)
    steps.extend(Step(f"key {mask(k)}", None, f"skipped ({after} failed)") for k in keys)
    return steps


async def _dns(origin: Origin, timeout: float, steps: list[Step]) -> list[str] | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        detail = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        steps.append(Step("dns", False, f"cannot resolve {origin.host}: {detail}"))
        return None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    shown = ", ".join(addresses[:3]) + (" …" if len(addresses) > 3 else "")
    steps.append(Step("dns", True, f"{origin.host} -> {shown}"))
    return addresses


async def _connect(origin: Origin, address: str, timeout: float, steps: list[Step]) -> bool:
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(address, origin.port)
    except (OSError, TimeoutError) as exc:
        detail = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        steps.append(Step("connect", False, f"TCP to {address}:{origin.port} failed: {detail}"))
        return False
    writer.close()
    ms = (time.monotonic() - start) * 1000
    steps.append(Step("connect", True, f"TCP to {address}:{origin.port} in {ms:.0f} ms"))
    return True


async def _tls(
    origin: Origin,
    context: ssl.SSLContext,
    timeout: float,
    steps: list[Step],
    wall: Callable[[], float],
) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                origin.host, origin.port, ssl=context, server_hostname=origin.host
            )
    except ssl.SSLError as exc:
        steps.append(Step("tls", False, f"handshake with {origin.host} failed: {exc.reason}"))
        return False
    except (OSError, TimeoutError) as exc:
        steps.append(Step("tls", False, f"handshake with {origin.host} failed: {exc!r}"))
        return False
    sslobj = writer.get_extra_info("ssl_object")
    cert = writer.get_extra_info("peercert") or {}
    writer.close()
    version = sslobj.version() if sslobj is not None else "TLS"
    not_after = cert.get("notAfter")
    if not isinstance(not_after, str):
        steps.append(Step("tls", True, f"{version}, certificate verified"))
        return True
    expires = ssl.cert_time_to_seconds(not_after)
    days = (expires - wall()) / 86400
    ok = days > 0
    detail = f"{version}, certificate for {origin.host} valid until {not_after} ({days:.0f} days)"
    steps.append(Step("tls", ok, detail if ok else f"certificate expired: {not_after}"))
    return ok


async def _clock(client: httpx.AsyncClient, steps: list[Step], wall: Callable[[], float]) -> None:
    try:
        resp = await client.get("/v1/account")
    except httpx.HTTPError as exc:
        steps.append(Step("clock", False, f"no answer from the upstream: {type(exc).__name__}"))
        return
    date = resp.headers.get("Date")
    if date is None:
        steps.append(Step("clock", None, "skipped (the upstream sent no Date header)"))
        return
    skew = wall() - email.utils.parsedate_to_datetime(date).timestamp()
    ok = abs(skew) <= MAX_SKEW
    detail = f"local clock is {skew:+.1f} s from the upstream's Date (limit {MAX_SKEW:g} s)"
    steps.append(Step("clock", ok, detail))


async def _key(client: httpx.AsyncClient, key: str, steps: list[Step]) -> str | None:
    name = f"key {mask(key)}"
    try:
        resp = await client.get("/v1/account", headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        steps.append(Step(name, False, f"no answer: {type(exc).__name__}"))
        return None
    mode = "live" if "_live_" in key[:8] else "test"
    if resp.status_code == 200:
        account = resp.json()
        label = account.get("settings", {}).get("dashboard", {}).get("display_name") or ""
        account_id = str(account.get("id", "?"))
        shown = f" ({label})" if label else ""
        steps.append(Step(name, True, f"valid: account {account_id}{shown}, {mode} mode"))
        return account_id
    code = ""
    try:
        error = resp.json().get("error", {})
        code = error.get("code") or error.get("type") or ""
    except ValueError:
        pass
    meaning = {
        401: "rejected (invalid, expired or revoked)",
        403: "lacks permission to read the account",
    }
    detail = meaning.get(resp.status_code, f"unexpected answer {resp.status_code}")
    steps.append(Step(name, False, f"{detail}{f' ({code})' if code else ''}"))
    return None


def verdict_lines(upstream: str, steps: Sequence[Step]) -> list[str]:
    """The report a person reads: one line per step, then the verdict."""
    lines = [f"stripe-sidecar doctor: {upstream}"]
    for step in steps:
        mark = {True: "ok", False: "FAIL", None: "skip"}[step.ok]
        lines.append(f"  [{mark:>4}] {step.name:<14} {step.detail}")
    failed = [s.name for s in steps if s.ok is False]
    verdict = f"failed: {', '.join(failed)}" if failed else "all checks passed"
    lines.append(f"verdict: {verdict}")
    return lines


async def doctor(
    upstream: str,
    keys: Sequence[str],
    *,
    ca_file: str | None = None,
    timeout: float = 5.0,
    out: Callable[[str], object] = print,
) -> int:
    """Run the checks, print the report; exit status 0 only if no step failed."""
    steps = await run_checks(upstream, keys, ca_file=ca_file, timeout=timeout)
    for line in verdict_lines(upstream, steps):
        out(line)
    return 1 if any(s.ok is False for s in steps) else 0
