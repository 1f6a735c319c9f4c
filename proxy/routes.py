"""Stripe paths to operation names and upstream hosts.

An operation is ``METHOD /template`` in Stripe's own words (``GET /v1/customers/{customer}``): the
label every metric, log line, breaker and limiter uses. The templates come from the table shipped
beside this module (``stripe_operations.txt``, every call the official SDK makes), matched segment
by segment, so an ID is recognised by where it stands, never by what it looks like.

A path the table does not know folds into a bounded name: the segments the table knows at that
place are kept, and the first one it does not know ends the name as ``*``
(``POST /v1/customers/{customer}/brand_new`` -> ``POST /v1/customers/{customer}/*``). Past
``max_operations`` such folded names, the rest count as ``METHOD other``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

__all__ = ["DEFAULT_ROUTES", "HostRoute", "OperationTable", "Router", "operation_table"]

_TABLE_FILE = "stripe_operations.txt"
_RECENT_MAX = 4096


@dataclass(frozen=True, slots=True)
class HostRoute:
    """Send operations matching ``method`` (``*`` for any) and ``template`` prefix to ``host``."""

    method: str
    prefix: str
    host: str


# Where Stripe serves what an SDK sends to one base URL (stripe-node sends everything there).
DEFAULT_ROUTES: tuple[HostRoute, ...] = (
    HostRoute("POST", "/v1/files", "files"),
    HostRoute("GET", "/v1/files/{file}/contents", "files"),
    HostRoute("GET", "/v1/quotes/{quote}/pdf", "files"),
    HostRoute("*", "/oauth/", "connect"),
    HostRoute("*", "/v2/billing/meter_event_stream", "meter_events"),
)


class _Node:
    """One path position in the table: literal segments first, then one placeholder."""

    __slots__ = ("literals", "name", "ops", "param", "path")

    def __init__(self, name: str = "") -> None:
        self.path = ""  # the template up to here, as a folded name would spell it
        self.name = name  # the placeholder's name ("{customer}"), "{id}" where Stripe's vary
        self.literals: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.ops: dict[str, str] = {}  # method -> operation ("GET /v1/customers/{customer}")


class OperationTable:
    """Stripe's operations as a trie by path segment, built once."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.root = _Node()
        self.operations: tuple[str, ...] = ()
        ops: list[str] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            method, _, template = line.partition(" ")
            self._add(method, template)
            ops.append(f"{method} {template}")
        self.operations = tuple(ops)
        self._known = frozenset(ops)
        _set_paths(self.root)

    def _add(self, method: str, template: str) -> None:
        node = self.root
        for seg in template.strip("/").split("/"):
            if seg.startswith("{"):
                if node.param is None:
                    node.param = _Node(seg)
                elif node.param.name != seg:
                    node.param.name = "{id}"  # Stripe names this place differently per call
                node = node.param
            else:
                child = node.literals.get(seg)
                if child is None:
                    child = node.literals[seg] = _Node()
                node = child
        node.ops[method] = f"{method} {template}"

    def match(self, method: str, segments: Sequence[str]) -> str | None:
        """The table's operation for a path split on ``/`` (leading empty part dropped)."""
        return _match(self.root, segments, 0, method)

    def fold(self, method: str, segments: Sequence[str]) -> str:
        """The bounded name of a path the table has no operation for."""
        node = self.root
        for seg in segments:
            child = node.literals.get(seg)
            if child is None:
                child = node.param if seg else None
                if child is None:
                    return f"{method} {node.path}/*"
            node = child
        return f"{method} {node.path}"

    def accepts(self, operation: str) -> bool:
        """Whether ``operation`` is in the table, or is a name an unknown path can fold into."""
        if operation in self._known:
            return True
        method, _, path = operation.partition(" ")
        if not path.startswith("/"):
            return False
        node = self.root
        segments = path[1:].split("/")
        for i, seg in enumerate(segments):
            if seg == "*":
                return i == len(segments) - 1
            child = node.literals.get(seg)
            if child is None and node.param is not None and seg == node.param.name:
                child = node.param
            if child is None:
                return False
            node = child
        return method not in node.ops  # else the table's own name is the one to use

    def suggest(self, operation: str) -> str | None:
        """The table's operation closest to a mistyped (or old-style ``{id}``) one."""
        method, _, path = operation.partition(" ")
        # Any placeholder where Stripe has one: "GET /v1/customers/{id}" is {customer} there.
        segments = ["{}" if s.startswith("{") else s for s in path[1:].split("/")]
        renamed = self.match(method, segments)
        if renamed is not None:
            return renamed
        close = difflib.get_close_matches(operation, self.operations, n=1, cutoff=0.6)
        return close[0] if close else None

    def prefix_matches(self, prefix: str) -> bool:
        """Whether some operation (or folded name) starts with ``prefix``."""
        if any(op.partition(" ")[2].startswith(prefix) for op in self.operations):
            return True
        stack = [self.root]
        while stack:
            node = stack.pop()
            if f"{node.path}/*".startswith(prefix):
                return True
            stack.extend(node.literals.values())
            if node.param is not None:
                stack.append(node.param)
        return False


def _set_paths(node: _Node) -> None:
    """Spell each node's folded-name prefix, once every placeholder's name is settled."""
    stack = [node]
    while stack:
        parent = stack.pop()
        for seg, child in parent.literals.items():
            child.path = f"{parent.path}/{seg}"
            stack.append(child)
        if parent.param is not None:
            parent.param.path = f"{parent.path}/{parent.param.name}"
            stack.append(parent.param)


def _match(node: _Node, segments: Sequence[str], i: int, method: str) -> str | None:
    if i == len(segments):
        return node.ops.get(method)
    seg = segments[i]
    child = node.literals.get(seg)
    if child is not None:
        found = _match(child, segments, i + 1, method)
        if found is not None:
            return found
    param = node.param
    if param is not None and seg:
        return _match(param, segments, i + 1, method)
    return None


@functools.cache
def operation_table() -> OperationTable:
    """The table shipped with the package (read once)."""
    text = resources.files("proxy").joinpath(_TABLE_FILE).read_text(encoding="utf-8")
    return OperationTable(text.splitlines())


class Router:
    """Resolves a request path to (operation, host name)."""

    def __init__(
        self,
        routes: Sequence[HostRoute],
        *,
        max_operations: int = 200,
        table: OperationTable | None = None,
    ) -> None:
        self._routes = tuple(routes)
        self._max = max_operations
        self._table = table if table is not None else operation_table()
        self._hosts: dict[str, tuple[str, str]] = {}  # operation -> (operation, host)
        for op in self._table.operations:
            self._hosts[op] = (op, self._host(op))
        self._folded: dict[str, tuple[str, str]] = {}
        # Raw (method, path) seen lately: list and create calls repeat their paths exactly.
        self._recent: dict[tuple[str, str], tuple[str, str]] = {}

    def resolve(self, method: str, path: str) -> tuple[str, str]:
        """Return ``(operation, host)`` for a request; ``path`` excludes the query string."""
        seen = self._recent.get((method, path))
        if seen is not None:
            return seen
        result = self._resolve(method, path)
        if len(self._recent) >= _RECENT_MAX:
            self._recent.clear()  # paths with IDs rarely repeat: keep this small, not clever
        self._recent[(method, path)] = result
        return result

    def _resolve(self, method: str, path: str) -> tuple[str, str]:
        segments = path[1:].split("/")
        op = self._table.match(method, segments)
        if op is not None:
            return self._hosts[op]
        name = self._table.fold(method, segments)
        hit = self._folded.get(name)
        if hit is not None:
            return hit
        host = self._host(name)
        if len(self._folded) >= self._max:
            return (f"{method} other", host)
        result = self._folded[name] = (name, host)
        return result

    def _host(self, operation: str) -> str:
        method, _, template = operation.partition(" ")
        for route in self._routes:
            if (route.method == "*" or route.method == method) and template.startswith(
                route.prefix
            ):
                return route.host
        return "api"
