"""Scripted trouble for the diagnosis scenarios, switched on and off through `/_sim/scenarios`.

- bad requests: one operation answers 400 `invalid_request_error` (a code and a `param`) to
  the next `count` requests (or all, until cleared), as if a deploy started sending bad ones;
- keys: `POST /_sim/keys/restore` undoes `/_sim/keys/revoke` (health returns).

Slow answers, 429s and outages are fault profiles (`/_sim/faults`: `slow`, `rate_limited`,
`outage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.simulator import errors


@dataclass(slots=True)
class BadRequests:
    """One operation refusing its requests with 400."""

    code: str = "parameter_invalid_string"
    param: str = "email"
    remaining: int | None = None  # None: until cleared


@dataclass(slots=True)
class Scenarios:
    """The scripted troubles in force."""

    bad_requests: dict[str, BadRequests] = field(default_factory=dict)

    def check(self, operation: str) -> None:
        """Raise the 400 a bad-requests scenario gives this operation, if one is in force."""
        bad = self.bad_requests.get(operation)
        if bad is None:
            return
        if bad.remaining is not None:
            bad.remaining -= 1
            if bad.remaining <= 0:
                del self.bad_requests[operation]
        raise errors.invalid(
            f"Invalid string: the value of {bad.param} is not acceptable.",
            code=bad.code,
            param=bad.param,
        )

    def set_bad_requests(self, data: dict[str, Any]) -> dict[str, Any]:
        """Apply `{"operation": ..., "count"?, "code"?, "param"?}`; `count: 0` clears it."""
        operation = data.get("operation")
        if not isinstance(operation, str) or " /" not in operation:
            raise ValueError("operation: like 'POST /v1/customers' is required")
        count = data.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                                  or count < 0):
            raise ValueError(f"count: {count!r} is not a non-negative integer")
        if count == 0:
            self.bad_requests.pop(operation, None)
        else:
            self.bad_requests[operation] = BadRequests(
                str(data.get("code", "parameter_invalid_string")),
                str(data.get("param", "email")),
                count,
            )
        return self.as_dict()

    def as_dict(self) -> dict[str, Any]:
        """The scenarios in force, JSON-ready."""
        return {
            "bad_requests": {
                op: {"code": b.code, "param": b.param, "remaining": b.remaining}
                for op, b in self.bad_requests.items()
            }
        }
