"""The books: what the simulator received, executed and injected, for tests to count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Books:
    """Counters of one simulator run; `as_dict()` is what `GET /_sim/books` serves."""

    requests: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    side_effects: int = 0
    duplicates: int = 0
    refs: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    replays: int = 0
    # Answers of the account/endpoint rate limiters, by Stripe-Rate-Limited-Reason.
    rate_limited: dict[str, int] = field(default_factory=dict)

    def record_request(self, operation: str) -> None:
        """Count one HTTP request for `operation` (a template, never a raw path)."""
        self.requests += 1
        self.by_operation[operation] = self.by_operation.get(operation, 0) + 1

    def record_fault(self, kind: str) -> None:
        """Count one injected fault."""
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def record_rate_limited(self, reason: str) -> None:
        """Count one request refused by a rate limiter (not a random fault)."""
        self.rate_limited[reason] = self.rate_limited.get(reason, 0) + 1

    def record_write(self, ref: str | None) -> None:
        """Count one executed write; a second execution of the same `ref` is a duplicate."""
        self.side_effects += 1
        if ref is not None:
            seen = self.refs.get(ref, 0)
            self.refs[ref] = seen + 1
            if seen:
                self.duplicates += 1

    def as_dict(self) -> dict[str, Any]:
        """A copy, safe to keep while the simulator goes on counting."""
        return {
            "requests": self.requests,
            "by_operation": dict(self.by_operation),
            "side_effects": self.side_effects,
            "duplicates": self.duplicates,
            "refs": dict(self.refs),
            "faults": dict(self.faults),
            "replays": self.replays,
            "rate_limited": dict(self.rate_limited),
        }
