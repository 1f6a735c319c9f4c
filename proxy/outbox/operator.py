"""``stripe-sidecar outbox list|show|retry|drop``: the running sidecar's /outbox endpoints.

Talks HTTP to the sidecar (``--url``, default ``http://`` + ``STRIPE_SIDECAR_LISTEN`` or
127.0.0.1:8080); changes send ``STRIPE_SIDECAR_CLIENT_TOKEN`` as the API key when it is set.
Returns the exit status: 0 done, 1 the sidecar answered an error or could not be reached.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import quote, urlencode

import httpx

__all__ = ["default_url", "run"]


def default_url(environ: Mapping[str, str]) -> str:
    """Where the sidecar listens, from its own environment variable."""
    listen = environ.get("STRIPE_SIDECAR_LISTEN") or "127.0.0.1:8080"
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def _table(doc: dict[str, Any], out: TextIO) -> None:
    counts = doc.get("counts", {})
    print("  ".join(f"{state} {n}" for state, n in counts.items()), file=out)
    items = doc.get("items", [])
    if not items:
        return
    print(file=out)
    print(f"{'id':<28} {'state':<10} {'operation':<36} {'rounds':>6}  {'received':<24} reason",
          file=out)  # fmt: skip
    for i in items:
        print(
            f"{i['id']:<28} {i['state']:<10} {i['operation']:<36} {i['rounds']:>6}  "
            f"{i['received_at']:<24} {i['reason']}",
            file=out,
        )


def run(
    action: str,
    *,
    url: str,
    item_id: str | None = None,
    state: str | None = None,
    operation: str | None = None,
    limit: int = 100,
    reason: str | None = None,
    as_json: bool = False,
    token: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Do one outbox command against the sidecar at ``url``; the exit status."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = "/outbox" if item_id is None else f"/outbox/{quote(item_id, safe='')}"
    query: dict[str, str] = {}
    method = "GET"
    if action == "list":
        query = {k: v for k, v in (("state", state), ("operation", operation)) if v}
        query["limit"] = str(limit)
    elif action == "retry":
        method, path = "POST", path + "/retry"
    elif action == "drop":
        method = "DELETE"
        if reason:
            query["reason"] = reason
    target = url.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")
    try:
        with httpx.Client(timeout=10.0, transport=transport) as http:
            resp = http.request(method, target, headers=headers)
    except httpx.HTTPError as exc:
        print(f"stripe-sidecar outbox: cannot reach the sidecar at {url}: {exc}", file=err)
        return 1
    try:
        doc = resp.json()
    except ValueError:
        print(f"stripe-sidecar outbox: {url} answered {resp.status_code}, not JSON", file=err)
        return 1
    if resp.status_code >= 400:
        message = doc.get("error", {}).get("message", resp.text)
        print(f"stripe-sidecar outbox: {resp.status_code}: {message}", file=err)
        return 1
    if action == "list" and not as_json:
        _table(doc, out)
    else:
        print(json.dumps(doc, indent=2), file=out)
    return 0
