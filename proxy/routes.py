"""Stripe paths to operation templates and upstream hosts.

An operation is ``METHOD /template`` (``POST /v1/customers/{id}``): the label every metric, log
line, breaker and limiter uses. Templates replace IDs, so their number stays bounded; past
``max_operations`` distinct templates, new ones fold into ``METHOD other``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_ROUTES", "HostRoute", "Router"]

# A path segment holding an ID: Stripe IDs (cus_NffrFeUfNV2Hib) and custom ones carry digits,
# capitals, dots or dashes; resource and action names are lower-case words with underscores.
_ID_SEGMENT = re.compile(r"/(?=[^/]*[0-9A-Z.\-~%:@])[^/]+")


@dataclass(frozen=True, slots=True)
class HostRoute:
    """Send operations matching ``method`` (``*`` for any) and ``template`` prefix to ``host``."""

    method: str
    prefix: str
    host: str


# Where Stripe serves what an SDK sends to one base URL (stripe-node sends everything there).
DEFAULT_ROUTES: tuple[HostRoute, ...] = (
    HostRoute("POST", "/v1/files", "files"),
    HostRoute("GET", "/v1/files/{id}/contents", "files"),
    HostRoute("GET", "/v1/quotes/{id}/pdf", "files"),
    HostRoute("*", "/oauth/", "connect"),
    HostRoute("*", "/v2/billing/meter_event_stream", "meter_events"),
)


class Router:
    """Resolves a request path to (operation, host name), caching per distinct template."""

    def __init__(self, routes: Sequence[HostRoute], *, max_operations: int = 1000) -> None:
        self._routes = tuple(routes)
        self._max = max_operations
        self._templates: dict[tuple[str, str], tuple[str, str]] = {}
        # Raw (method, path) seen lately: list and create calls repeat their paths exactly.
        self._recent: dict[tuple[str, str], tuple[str, str]] = {}

    def resolve(self, method: str, path: str) -> tuple[str, str]:
        """Return ``(operation, host)`` for a request; ``path`` excludes the query string."""
        seen = self._recent.get((method, path))
        if seen is not None:
            return seen
        result = self._resolve(method, path)
        if len(self._recent) >= 4096:
            self._recent.clear()  # paths with IDs rarely repeat: keep this small, not clever
        self._recent[(method, path)] = result
        return result

    def _resolve(self, method: str, path: str) -> tuple[str, str]:
        cut = path.find("/", 1)  # the version segment (/v1) is never an ID
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

    @property
    def operations(self) -> list[str]:
        """Operation templates seen so far."""
        return sorted({op for op, _ in self._templates.values()})
