"""Everything one simulator instance holds: profile, seeded fault draws, books, objects."""

from __future__ import annotations

import random
from typing import Any, Final

from proxy.simulator.auth import Keys
from proxy.simulator.books import Books
from proxy.simulator.faults import FaultKind, FaultProfile, choose_fault, resolve_profile
from proxy.simulator.idempotency import IdempotencyStore
from proxy.simulator.store import Store

RATE_LIMITED_REASONS: Final = (
    "global-rate",
    "global-concurrency",
    "endpoint-rate",
    "endpoint-concurrency",
    "resource-specific",
)


class SimState:
    """The simulator's state; the aiohttp shell reads and changes it, nothing else does."""

    def __init__(self, profile: FaultProfile | str = "none", *, seed: int = 0) -> None:
        self.profile = resolve_profile(profile)
        self.seed = seed
        # Only fault decisions draw from this one, so ids and request ids never shift the
        # seeded fault sequence.
        self.rng = random.Random(seed)
        self.books = Books()
        self.store = Store()
        self.idempotency = IdempotencyStore()
        self.keys = Keys()
        self._any_fault = self.profile.total() > 0.0

    def set_profile(self, profile: FaultProfile | str, *, seed: int | None = None) -> None:
        """Switch faults at run time; a `seed` restarts the fault sequence from it."""
        self.profile = resolve_profile(profile)
        self._any_fault = self.profile.total() > 0.0
        if seed is not None:
            self.seed = seed
            self.rng.seed(seed)

    def reset(self) -> None:
        """Clear books, objects, idempotency keys and revocations; restart the fault sequence."""
        self.books = Books()
        self.store.clear()
        self.idempotency.clear()
        self.keys.revoked.clear()
        self.rng.seed(self.seed)

    def draw_fault(self) -> FaultKind | None:
        """The fault for the next request, one seeded draw per request."""
        if not self._any_fault:
            return None
        return choose_fault(self.profile, self.rng.random())

    def rate_limited_reason(self) -> str:
        """Which limiter a simulated 429 names."""
        return self.rng.choice(RATE_LIMITED_REASONS)

    def books_dict(self) -> dict[str, Any]:
        """A snapshot of the books."""
        return self.books.as_dict()
