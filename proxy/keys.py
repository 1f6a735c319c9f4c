"""The Stripe secret keys the sidecar holds: which one is in use, and failing over to the next.

Pure: no I/O, no clock. The keys come from ``STRIPE_SIDECAR_SECRET_KEYS`` (comma-separated,
primary first) or ``keys.file`` (one a line); ``proxy.keycheck`` reads the file, checks each key
with ``GET /v1/account`` and reports here. Each key's ``Authorization`` line is built once, so
the request path only swaps in a ready header line.

A key is usable for failover only once its check passed and it belongs to the same account as
the first key that passed (the *reference account*): a key that Stripe rejected (401, at a check
or on traffic) or that belongs to another account is never used. Keys are shown to people by
their last 4 characters (:func:`mask`), nowhere in full.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "HeldKey",
    "KeySet",
    "KeySettings",
    "KeyState",
    "Settled",
    "keys_from_env",
    "mask",
    "parse_keys",
]

ENV_KEYS = "STRIPE_SIDECAR_SECRET_KEYS"
ENV_TOKEN = "STRIPE_SIDECAR_CLIENT_TOKEN"
# Stripe keys are letters, digits and underscores; anything else (a space, a CR or LF) could
# never be a key and must never reach a header line.
_KEY_SHAPE = re.compile(r"[A-Za-z0-9_]{8,255}")
_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]{16,255}")  # visible ASCII, long enough to guess hard


@dataclass(frozen=True, slots=True)
class KeySettings:
    """The ``keys:`` section: where held keys come from and how often they are checked."""

    file: str | None = None  # one key per line, primary first; re-read when it changes
    poll_interval: float = 5.0  # seconds between looks at the file's modification time
    check_interval: float = 300.0  # seconds between re-checks of keys not known good
    check_timeout: float = 10.0  # seconds for one GET /v1/account


def mask(key: str) -> str:
    """A key as shown to people: its last 4 characters only."""
    return "…" + key[-4:] if len(key) > 8 else "…"


def parse_keys(text: str, *, separator: str = "\n") -> tuple[list[str], list[str]]:
    """Split keys (blank lines and ``#`` comments skipped); ``(keys, problems)``.

    A problem names the entry by its position and shows the key masked, never whole.
    """
    keys: list[str] = []
    problems: list[str] = []
    for n, raw in enumerate(text.split(separator), 1):
        key = raw.strip()
        if not key or key.startswith("#"):
            continue
        if not _KEY_SHAPE.fullmatch(key):
            problems.append(f"entry {n} ({mask(key)}) is not a Stripe secret key")
        elif key in keys:
            problems.append(f"entry {n} ({mask(key)}) repeats an earlier key")
        else:
            keys.append(key)
    return keys, problems


def keys_from_env(environ: Mapping[str, str]) -> tuple[list[str], list[str], str | None]:
    """Keys and the client token from the environment: ``(keys, problems, token)``."""
    keys, problems = parse_keys(environ.get(ENV_KEYS, ""), separator=",")
    problems = [f"{ENV_KEYS}: {p}" for p in problems]
    token = environ.get(ENV_TOKEN) or None
    if token is not None and not _TOKEN_SHAPE.fullmatch(token):
        problems.append(f"{ENV_TOKEN}: use 16 to 255 visible ASCII characters")
    return keys, problems, token


class KeyState(enum.StrEnum):
    """What the sidecar knows about one held key."""

    UNCHECKED = "unchecked"  # not checked yet (Stripe not reached so far)
    OK = "ok"  # GET /v1/account answered, and it is the reference account
    REJECTED = "rejected"  # Stripe answered 401 for it, at a check or on traffic
    OTHER_ACCOUNT = "other_account"  # another account than the reference: never used


class HeldKey:
    """One held key: its ready ``Authorization`` line, what a check found, how it is shown."""

    __slots__ = ("account", "label", "line", "rejected", "secret")

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.line = b"Authorization: Bearer " + secret.encode() + b"\r\n"
        self.label = mask(secret)
        self.account: str | None = None  # the account id a check found
        self.rejected = False

    def state(self, reference: str | None) -> KeyState:
        """This key's state against the reference account."""
        if self.rejected:
            return KeyState.REJECTED
        if self.account is None:
            return KeyState.UNCHECKED
        return KeyState.OK if self.account == reference else KeyState.OTHER_ACCOUNT

    def __repr__(self) -> str:
        return f"HeldKey({self.label})"


@dataclass(frozen=True, slots=True)
class Settled:
    """What a round of checks changed: the active key before and after, keys of other accounts."""

    before: HeldKey
    after: HeldKey
    other_accounts: tuple[HeldKey, ...]
    account: str | None


class KeySet:
    """The held keys in order (primary first) and the one in use."""

    def __init__(self, keys: Sequence[str], client_token: str | None = None) -> None:
        if not keys:
            raise ValueError("a key set needs at least one key")
        self.keys = [HeldKey(k) for k in keys]
        self.active = self.keys[0]
        self.account: str | None = None  # the reference account, once a check found one
        # What apps present instead of a key when a client token is set: compared whole.
        self.client_auth = b"Bearer " + client_token.encode() if client_token else None

    def states(self) -> dict[str, str]:
        """Each key's state by its masked label (for logs and /diagnosis)."""
        return {k.label: self.state(k).value for k in self.keys}

    def state(self, key: HeldKey) -> KeyState:
        """One key's state."""
        return key.state(self.account)

    # -- failover -------------------------------------------------------------------------------
    def next_after(self, used: HeldKey) -> HeldKey | None:
        """The key a request that met 401 with ``used`` goes on with; reads only.

        If another request has already moved on from ``used``, the active key; otherwise the
        next key in order (wrapping) whose check passed on the reference account.
        """
        if used is not self.active:
            return None if self.active.rejected else self.active
        keys = self.keys
        start = keys.index(used) if used in keys else -1
        for k in keys[start + 1 :] + keys[: max(start, 0)]:
            if self.state(k) is KeyState.OK:
                return k
        return None

    def fail_over(self, used: HeldKey) -> HeldKey | None:
        """Stripe rejected ``used`` (401): mark it and return the key to retry with, if any.

        The returned key becomes the active one when ``used`` was active.
        """
        target = self.next_after(used)
        used.rejected = True
        if target is not None and used is self.active:
            self.active = target
        return target

    # -- checks ---------------------------------------------------------------------------------
    def checked(self, key: HeldKey, account: str | None) -> None:
        """A check of ``key`` answered: its account id, or None for a 401."""
        if account is None:
            key.rejected = True
            key.account = None
            return
        key.rejected = False
        key.account = account

    def settle(self) -> Settled:
        """After a round of checks: fix the reference account, choose the active key.

        The reference account is the first checked key's (in order) unless one was fixed
        already; the active key is the first whose check passed on it, else the first not known
        bad (unchecked keys are used only while nothing better is known), else the current.
        """
        before = self.active
        if self.account is None:
            self.account = next((k.account for k in self.keys if k.account is not None), None)
        states = [(k, self.state(k)) for k in self.keys]
        chosen = next((k for k, s in states if s is KeyState.OK), None)
        if chosen is None:
            chosen = next((k for k, s in states if s is KeyState.UNCHECKED), self.active)
        self.active = chosen
        others = tuple(k for k, s in states if s is KeyState.OTHER_ACCOUNT)
        return Settled(before, chosen, others, self.account)

    def replace(self, keys: Sequence[str]) -> None:
        """A new list of keys (the file changed): what is known of unchanged keys is kept.

        The reference account is found anew by the next :meth:`settle`.
        """
        if not keys:
            raise ValueError("a key set needs at least one key")
        old = {k.secret: k for k in self.keys}
        self.keys = [old.get(s) or HeldKey(s) for s in keys]
        self.account = None
        if self.active not in self.keys:
            self.active = self.keys[0]

    def to_check(self) -> list[HeldKey]:
        """Keys a periodic check should look at again: all not known good."""
        return [k for k in self.keys if self.state(k) is not KeyState.OK]
