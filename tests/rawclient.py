"""A raw HTTP/1.1 client on loopback: send exact bytes, parse exact answers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass
class Answer:
    """One parsed answer."""

    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> bytes | None:
        """First value of a header by case-insensitive name."""
        lname = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _Collector:
    def __init__(self, head_only: bool) -> None:
        self.answers: list[Answer] = []
        self.current = Answer()
        self.head_only = head_only
        self.done = 0
        self.parser: httptools.HttpResponseParser | None = None

    def on_status(self, reason: bytes) -> None:
        self.current.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        if self.head_only and self.current.status >= 200:
            self._complete()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        if not self.head_only:
            self._complete()

    def _complete(self) -> None:
        self.answers.append(self.current)
        self.current = Answer()
        self.done += 1


async def exchange(
    port: int,
    data: bytes,
    *,
    answers: int = 1,
    head_only: bool = False,
    timeout: float = 10.0,
    interim: bool = False,
    check_closed: bool = False,
) -> tuple[list[Answer], bool]:
    """Send ``data``; read until ``answers`` answers arrived or the server closed.

    Returns the answers and whether the server closed the connection. That a connection stays
    open cannot be seen without waiting, so the close is looked for only with ``check_closed``
    (up to a second for the EOF after the last answer); otherwise it is reported only when seen.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    collector = _Collector(head_only)
    parser = httptools.HttpResponseParser(collector)
    collector.parser = parser
    closed = False
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while collector.done < answers:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                parser.feed_data(chunk)
            if check_closed and collector.done >= answers and not closed:
                # Was the connection closed right after the answer?
                try:
                    async with asyncio.timeout(1.0):
                        closed = (await reader.read(1)) == b""
                except TimeoutError:
                    closed = False
    finally:
        writer.close()
    out = collector.answers
    if not interim:
        out = [a for a in out if a.status >= 200 or a.status == 0]
    return out, closed


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection for tests that interleave writes and reads."""
    return await asyncio.open_connection("127.0.0.1", port)
