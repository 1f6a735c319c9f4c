"""API key checks: Bearer or Basic, Stripe's key prefixes, revocation, read-only keys."""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass, field
from typing import Final

from proxy.simulator.errors import invalid_api_key, no_api_key, permission_denied

_SECRET_PREFIXES: Final = ("sk_test_", "sk_live_", "rk_test_", "rk_live_")
ACCOUNT: Final = "acct_simulator"


def key_from_header(authorization: str | None) -> str | None:
    """The API key in an Authorization header (`Bearer KEY` or Basic `KEY:`), or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer":
        return value or None
    if scheme == "basic":
        try:
            decoded = b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[0] or None
    return ""


@dataclass(slots=True)
class Keys:
    """Which keys the simulated account accepts."""

    revoked: set[str] = field(default_factory=set)
    accounts: dict[str, str] = field(default_factory=dict)  # keys of other accounts than ACCOUNT

    def account_of(self, key: str) -> str:
        """The account id `key` belongs to (the simulator's own unless set otherwise)."""
        return self.accounts.get(key, ACCOUNT)

    def check(self, key: str | None, *, writes: bool) -> str:
        """Return the usable key, or raise the 401/403 Stripe would answer."""
        if key is None:
            raise no_api_key()
        if not key.startswith(_SECRET_PREFIXES) or key in self.revoked:
            raise invalid_api_key(key)
        if writes and key.startswith("rk_") and "_readonly" in key:
            raise permission_denied(key)
        return key

    def revoke(self, key: str) -> None:
        """Make `key` fail with 401 from now on."""
        self.revoked.add(key)


def livemode(key: str) -> bool:
    """Whether objects made with `key` are live-mode ones."""
    return "_live_" in key[:8]

