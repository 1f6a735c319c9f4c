"""Keeping the held keys right: the keys file watched, each key checked with Stripe.

:class:`KeyKeeper` is the I/O shell around the pure :class:`~proxy.keys.KeySet`. At start, when
``keys.file`` changes (its modification time is polled on a timer, no extra dependency) and every
``keys.check_interval`` for keys not known good, it asks ``GET /v1/account`` with each key
through the upstream pool, tells the key set what Stripe answered, and reports what changed:
one log event per check round, a healing action for each failover or restore, and an
``auth_failure`` diagnosis for a rejected key or a key of another account. Keys appear in what
it reports by their last 4 characters only.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine
from typing import Any

from proxy import __version__
from proxy.diagnosis import DiagnosisEngine
from proxy.errors import ConfigError, UpstreamError
from proxy.keys import HeldKey, KeySet, KeySettings, Settled, parse_keys
from proxy.log import Logger
from proxy.rules import Check
from proxy.upstream import Pool

__all__ = ["KeyKeeper", "read_keys_file"]

_UNKNOWN = "?"  # a check that could not tell (Stripe unreachable, a 5xx, a strange answer)


def read_keys_file(path: str) -> list[str]:
    """The keys in ``path``; ConfigError (with the key path ``keys.file``) if none are usable."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"keys.file: cannot read {path}: {exc.strerror}"], "keys") from None
    keys, problems = parse_keys(text)
    if not keys and not problems:
        problems.append(f"keys.file: {path} holds no key")
    if problems:
        raise ConfigError([f"keys.file: {p}" for p in problems], "keys")
    return keys


class KeyKeeper:
    """Checks the held keys with Stripe, follows the keys file, reports what changed."""

    def __init__(
        self,
        keys: KeySet,
        settings: KeySettings,
        *,
        pool: Pool,
        engine: DiagnosisEngine,
        log: Logger,
        diagnose: bool = True,
    ) -> None:
        self.keys = keys
        self.settings = settings
        self._pool = pool
        self._engine = engine
        self._log = log
        self._diagnose = diagnose
        self._file_sig: tuple[int, int, int] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._reported: set[tuple[str, str]] = set()  # (secret, what) reported already
        self.rounds = 0  # check rounds finished (tests poll it)
        self._head = (
            b"GET /v1/account HTTP/1.1\r\nHost: %s\r\nAccept: application/json\r\n"
            b"User-Agent: stripe-sidecar/%s (key check)\r\n"
            % (pool.origin.host_header, __version__.encode())
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Check every key now; watch the file and re-check on timers."""
        if self.settings.file is not None:
            self._file_sig = self._signature(self.settings.file)
            self._every(self.settings.poll_interval, self.poll)
        self._every(self.settings.check_interval, self._recheck)
        self.spawn(self.check(list(self.keys.keys)))

    def stop(self) -> None:
        """Cancel the timers and any check under way."""
        for timer in self._timers:
            timer.cancel()
        for task in tuple(self._tasks):
            task.cancel()

    def _every(self, seconds: float, action: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            try:
                action()
            finally:
                self._timers[index] = loop.call_later(seconds, tick)

        index = len(self._timers)
        self._timers.append(loop.call_later(seconds, tick))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a check round in the background (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the keys file --------------------------------------------------------------------------
    @staticmethod
    def _signature(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> None:
        """Re-read the keys file if it changed; a file without usable keys is ignored (logged)."""
        path = self.settings.file
        assert path is not None
        sig = self._signature(path)
        if sig == self._file_sig:
            return
        self._file_sig = sig
        try:
            keys = read_keys_file(path)
        except ConfigError as exc:
            self._log.event("keys_file_ignored", "warning", problems=exc.problems)
            return
        if keys == [k.secret for k in self.keys.keys]:
            return
        self.keys.replace(keys)
        self._log.event("keys_reloaded", keys=[k.label for k in self.keys.keys])
        self.spawn(self.check(list(self.keys.keys)))

    def _recheck(self) -> None:
        stale = self.keys.to_check()
        if stale:
            self.spawn(self.check(stale))

    # -- checks ---------------------------------------------------------------------------------
    async def check(self, keys: list[HeldKey]) -> None:
        """Check ``keys`` one by one with GET /v1/account, then settle and report."""
        found: dict[str, str] = {}
        for key in keys:
            account = await self.account_of(key)
            found[key.label] = "rejected" if account is None else account
            if account != _UNKNOWN:
                self.keys.checked(key, account)
                if account is None:
                    self._rejected_at_check(key)
        settled = self.keys.settle()
        self._log.event("keys_checked", results=found, states=self.keys.states(),
                        account=settled.account, active=settled.after.label)  # fmt: skip
        self._report(settled)
        self.rounds += 1

    async def account_of(self, key: HeldKey) -> str | None:
        """The account id Stripe gives for ``key``; None for a 401; ``"?"`` if it cannot tell."""
        head = self._head + key.line + b"\r\n"
        pool = self._pool
        for fresh in (False, True):
            try:
                conn = await (pool.connect() if fresh else pool.acquire())
            except UpstreamError as exc:
                self._log.event("key_check_failed", "warning", key=key.label, error=str(exc))
                return _UNKNOWN
            pool.deadlines.arm(conn, self.settings.check_timeout)
            try:
                resp = await conn.send(head, b"", False)
            except UpstreamError as exc:
                if conn.reused and not fresh and not exc.response_started:
                    continue  # a stale pooled connection: once more on a new one
                self._log.event("key_check_failed", "warning", key=key.label, error=str(exc))
                return _UNKNOWN
            finally:
                pool.deadlines.disarm(conn)
            break
        if resp.status == 401:
            return None
        body = resp.body_bytes() if resp.complete else b""
        resp.discard()
        try:
            account = json.loads(body).get("id") if resp.status == 200 else None
        except (ValueError, AttributeError):
            account = None
        if not isinstance(account, str) or not account:
            self._log.event("key_check_failed", "warning", key=key.label, status=resp.status)
            return _UNKNOWN
        return account

    # -- reporting ------------------------------------------------------------------------------
    def _once(self, key: HeldKey, what: str) -> bool:
        mark = (key.secret, what)
        if mark in self._reported:
            return False
        self._reported.add(mark)
        return True

    def _rejected_at_check(self, key: HeldKey) -> None:
        if not self._once(key, "rejected"):
            return
        self._log.event("key_rejected", "warning", key=key.label)
        self._engine.record_action(
            "key_check", "auth_failure",
            f"Stripe rejected held key {key.label} (401) when it was checked; it is not used.",
            "failed", before=key.label,
        )  # fmt: skip

    def _report(self, settled: Settled) -> None:
        for key in settled.other_accounts:
            if self._once(key, "other_account"):
                self._other_account(key, settled.account)
        before, after = settled.before, settled.after
        if before is after:
            return
        keys = self.keys.keys
        restored = before in keys and keys.index(after) < keys.index(before)
        self._engine.record_action(
            "key_restored" if restored else "key_failover",
            "auth_failure",
            f"Held key {after.label} passed its check"
            + (" again and is in use again." if restored else f"; {before.label} did not."),
            "undone" if restored else "ok",
            before=before.label,
            after=after.label,
        )
        if restored:
            self._reported.discard((after.secret, "rejected"))

    def _other_account(self, key: HeldKey, account: str | None) -> None:
        self._log.event("key_account_mismatch", "warning", key=key.label,
                        key_account=key.account, account=account)  # fmt: skip
        reason = (
            f"Held key {key.label} belongs to Stripe account {key.account}, not {account} like "
            "the others: the sidecar never fails over to it."
        )
        self._engine.record_action("key_check", "auth_failure", reason, "failed",
                                   before=key.label)  # fmt: skip
        if self._diagnose:
            evidence = {"key": key.label, "key_account": key.account, "account": account}
            self._engine.raise_now(
                "auth_failure",
                Check(True, "warning", reason, evidence,
                      f"Remove {key.label} from the held keys, or replace it with a key of "
                      f"{account}."),
            )  # fmt: skip

    def failed_over(self, used: HeldKey, target: HeldKey, operation: str) -> None:
        """Stripe answered 401 to the active key on ``operation``; the next key took over."""
        reason = (
            f"Stripe rejected the active key {used.label} (401) on {operation}; the request was "
            f"retried at once with {target.label}, which is now in use."
        )
        self._log.event("key_failover", "warning", before=used.label, after=target.label,
                        operation=operation)  # fmt: skip
        self._engine.record_action(
            "key_failover", "auth_failure", reason, "ok", before=used.label, after=target.label
        )
        if self._diagnose:
            evidence = {"rejected_key": used.label, "key_in_use": target.label,
                        "operations": [operation], "count": 1}  # fmt: skip
            self._engine.raise_now(
                "auth_failure",
                Check(True, "critical", reason, evidence,
                      f"The app saw no error. Roll key {used.label} in the Stripe Dashboard and "
                      "replace it in the sidecar's keys (STRIPE_SIDECAR_SECRET_KEYS or "
                      "keys.file); until then one key fewer is left to fail over to."),
            )  # fmt: skip
