"""Micro-benchmark: the cost of naming a request's operation, before and after Stripe's table.

"before" is the previous router (a regular expression guessing which segments are IDs), kept here
verbatim as the reference; "after" is :class:`proxy.routes.Router` (a trie over Stripe's own
table). Both keep the same recent-path cache, so two cases are measured: a path seen for the first
time (every GET/POST of one object has its own ID) and a repeated path (list and create calls).

    .venv/bin/python bench/routes_micro.py

Prints microseconds per call and the after/before ratio (lower is better). One process, no I/O.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.routes import DEFAULT_ROUTES, HostRoute, Router

_ID_SEGMENT = re.compile(r"/(?=[^/]*[0-9A-Z.\-~%:@])[^/]+")
_OLD_ROUTES = (
    HostRoute("POST", "/v1/files", "files"),
    HostRoute("GET", "/v1/files/{id}/contents", "files"),
    HostRoute("GET", "/v1/quotes/{id}/pdf", "files"),
    HostRoute("*", "/oauth/", "connect"),
    HostRoute("*", "/v2/billing/meter_event_stream", "meter_events"),
)


class OldRouter:
    """The router before this change (regex guess + template cache + recent-path cache)."""

    def __init__(self, routes: tuple[HostRoute, ...], max_operations: int = 1000) -> None:
        self._routes = routes
        self._max = max_operations
        self._templates: dict[tuple[str, str], tuple[str, str]] = {}
        self._recent: dict[tuple[str, str], tuple[str, str]] = {}

    def resolve(self, method: str, path: str) -> tuple[str, str]:
        seen = self._recent.get((method, path))
        if seen is not None:
            return seen
        result = self._resolve(method, path)
        if len(self._recent) >= 4096:
            self._recent.clear()
        self._recent[(method, path)] = result
        return result

    def _resolve(self, method: str, path: str) -> tuple[str, str]:
        cut = path.find("/", 1)
        template = path[:cut] + _ID_SEGMENT.sub("/{id}", path[cut:]) if cut > 0 else path
        key = (method, template)
        hit = self._templates.get(key)
        if hit is not None:
            return hit
        host = "api"
        for route in self._routes:
            if (route.method == "*" or route.method == method) and template.startswith(
                route.prefix
            ):
                host = route.host
                break
        if len(self._templates) >= self._max:
            return (f"{method} other", host)
        result = (f"{method} {template}", host)
        self._templates[key] = result
        return result


# A typical mix: reads and updates of single objects, actions, lists, creates.
SHAPES = (
    ("GET", "/v1/customers/cus_{n}"),
    ("POST", "/v1/customers/cus_{n}"),
    ("POST", "/v1/payment_intents/pi_{n}/confirm"),
    ("GET", "/v1/payment_intents/pi_{n}"),
    ("POST", "/v1/subscriptions/sub_{n}"),
    ("GET", "/v1/accounts/acct_{n}/persons/person_{n}"),
    ("POST", "/v1/customers"),
    ("GET", "/v1/balance"),
)


def _requests(count: int, *, distinct: bool) -> list[tuple[str, str]]:
    out = []
    for i in range(count):
        method, shape = SHAPES[i % len(SHAPES)]
        out.append((method, shape.format(n=f"Nf{i if distinct else 0}xY")))
    return out


def _per_call_us(make: object, requests: list[tuple[str, str]], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        router = make()  # type: ignore[operator]
        resolve = router.resolve
        started = time.perf_counter()
        for method, path in requests:
            resolve(method, path)
        t = time.perf_counter() - started
        best = min(best, t / len(requests) * 1e6)
    return best


def main() -> None:
    """Print per-call cost before/after and the ratio, for first-seen and repeated paths."""
    cases = {
        "first-seen path (distinct IDs)": _requests(40_000, distinct=True),
        "repeated path (recent cache)": _requests(40_000, distinct=False),
    }
    print(f"{'case':34} {'before us':>10} {'after us':>10} {'after/before':>13}")
    for name, requests in cases.items():
        before = _per_call_us(lambda: OldRouter(_OLD_ROUTES), requests)
        after = _per_call_us(lambda: Router(DEFAULT_ROUTES), requests)
        print(f"{name:34} {before:10.3f} {after:10.3f} {after / before:13.2f}")


if __name__ == "__main__":
    main()
