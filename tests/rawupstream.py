"""A scriptable HTTP/1.1 upstream on loopback that records exactly what it received.

Tests use it where byte-level control matters: the request as it arrived (raw header names and
order, body), and answers written verbatim (chunked, HEAD, 304, dropped connections).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class Received:
    """One request as the upstream saw it."""

    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    conn_id: int

    def header(self, name: str) -> bytes | None:
        """The first value of a header, by case-insensitive name."""
        lname = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def names(self) -> list[bytes]:
        """Header names in order, as sent."""
        return [n for n, _ in self.headers]


# An answer is raw bytes, None to drop the connection, or a coroutine function for streaming.
Answer = bytes | None | Callable[[asyncio.Transport], Awaitable[None]]


@dataclass
class RawUpstream:
    """Serves ``handler(received) -> Answer``; records every request in ``received``."""

    handler: Callable[[Received], Answer]
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _transports: list[asyncio.Transport] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The base URL to point the sidecar at."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        """Listen on a free loopback port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Proto(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for t in self._transports:
            t.abort()

    def close_idle_connections(self) -> None:
        """Close every open connection, as a server's keep-alive timeout would."""
        for t in self._transports:
            t.close()
        self._transports.clear()


class _Proto(asyncio.Protocol):
    def __init__(self, up: RawUpstream) -> None:
        self.up = up
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        up.connections += 1
        self.conn_id = up.connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up._transports.append(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport in self.up._transports:
            self.up._transports.remove(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        rec = Received(
            self.parser.get_method().decode(), self.url, self.headers, self.body, self.conn_id
        )
        self.up.received.append(rec)
        answer = self.up.handler(rec)
        assert self.transport is not None
        if answer is None:
            self.transport.abort()
        elif isinstance(answer, bytes):
            self.transport.write(answer)
        else:
            asyncio.get_running_loop().create_task(answer(self.transport))


def json_answer(status: int, body: bytes, *extra: bytes, reason: bytes = b"OK") -> bytes:
    """A plain keep-alive JSON answer with optional extra header lines."""
    head = b"".join(e + b"\r\n" for e in extra)
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b" % (
        status,
        reason,
        len(body),
        head,
        body,
    )


def held(release: asyncio.Event, answer: bytes) -> Callable[[asyncio.Transport], Awaitable[None]]:
    """An answer written only once ``release`` is set (a request kept in flight on purpose)."""

    async def write_when_released(transport: asyncio.Transport) -> None:
        await release.wait()
        transport.write(answer)

    return write_when_released
