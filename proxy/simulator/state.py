"""Everything one simulator instance holds: profile, seeded fault draws, books, objects."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Final

from proxy.simulator.auth import Keys
from proxy.simulator.books import Books
from proxy.simulator.faults import FaultKind, FaultProfile, choose_fault, resolve_profile
from proxy.simulator.idempotency import IdempotencyStore
from proxy.simulator.limits import AccountLimits
from proxy.simulator.scenarios import Scenarios
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

    def __init__(
        self,
        profile: FaultProfile | str = "none",
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = resolve_profile(profile)
        self._clock = clock
        self.limits = self._limits()
        self.seed = seed
        # Only fault decisions draw from this one, so ids and request ids never shift the
        # seeded fault sequence.
        self.rng = random.Random(seed)
        self.books = Books()
        self.store = Store()
        self.idempotency = IdempotencyStore()
        self.keys = Keys()
        self.scenarios = Scenarios()
        self._any_fault = self.profile.total() > 0.0

    def set_profile(self, profile: FaultProfile | str, *, seed: int | None = None) -> None:
        """Switch faults at run time; a `seed` restarts the fault sequence from it."""
        self.profile = resolve_profile(profile)
        self._any_fault = self.profile.total() > 0.0
        self.limits = self._limits()
        if seed is not None:
            self.seed = seed
            self.rng.seed(seed)

    def reset(self) -> None:
        """Clear books, objects, idempotency keys and revocations; restart the fault sequence."""
        self.books = Books()
        self.store.clear()
        self.idempotency.clear()
        self.keys.revoked.clear()
        self.keys.accounts.clear()
        self.limits = self._limits()
        self.scenarios = Scenarios()
        self.rng.seed(self.seed)

    def _limits(self) -> AccountLimits:
        p = self.profile
        return AccountLimits(
            account_rate=p.account_rate,
            account_burst=p.account_burst,
            endpoint_rate=p.endpoint_rate,
            endpoint_burst=p.endpoint_burst,
            clock=self._clock,
        )

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
