"""Stripe's form encoding (`metadata[ref]=x`, `expand[]=y`, `items[0][price]=z`) to nested dicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

Params = dict[str, Any]


def parse_form(body: str) -> Params:
    """Parse an `application/x-www-form-urlencoded` body or query string into nested params."""
    if not body:
        return {}
    return nest(parse_qsl(body, keep_blank_values=True))


def nest(pairs: Iterable[tuple[str, str]]) -> Params:
    """Turn flat `(key, value)` pairs with bracket paths into nested dicts and lists."""
    out: Params = {}
    nested = False
    for key, value in pairs:
        if "[" not in key:
            out[key] = value
            continue
        nested = True
        _insert(out, key, value)
    if nested:
        for k, v in out.items():
            if isinstance(v, dict | list) and k != "metadata":
                out[k] = _listify(v)
    return out


def _insert(out: Params, key: str, value: str) -> None:
    head, _, rest = key.partition("[")
    parts = [head, *rest.rstrip("]").split("][")]
    node: Any = out
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "":
            # `expand[]=a&expand[]=b`: an append to a list.
            if not isinstance(node, list):
                return  # `a=1&a[]=2`: contradictory shapes, keep the first
            if last:
                node.append(value)
                return
            child: Any = {}
            node.append(child)
            node = child
            continue
        if not isinstance(node, dict):
            return
        if last:
            node[part] = value
            return
        want_list = parts[i + 1] == ""
        child = node.get(part)
        if child is None or isinstance(child, str):
            child = [] if want_list else {}
            node[part] = child
        node = child


def _listify(node: Any) -> Any:
    """`{"0": a, "1": b}` (how SDKs index arrays) becomes `[a, b]`; metadata stays a dict."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, dict | list) and k != "metadata":
                node[k] = _listify(v)
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
        return node
    if isinstance(node, list):
        return [_listify(v) if isinstance(v, dict | list) else v for v in node]
    return node
