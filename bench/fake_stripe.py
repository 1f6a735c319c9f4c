"""The fallback upstream when nginx is not installed: a tiny uvloop + httptools server.

Answers every request with the same Stripe-shaped JSON (``workloads.RESPONSE_BODY``) and a
``Request-Id``, keep-alive, pipelining-safe. Runs in its own process; its CPU is not measured.

    python bench/fake_stripe.py --port 12111
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import httptools

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import RESPONSE_BODY, STRIPE_VERSION

_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: fake-stripe\r\nContent-Type: application/json\r\n"
    b"Cache-Control: no-cache, no-store\r\nStripe-Version: " + STRIPE_VERSION.encode() + b"\r\n"
    b"Content-Length: %d\r\n" % len(RESPONSE_BODY)
)


class _Conn(asyncio.Protocol):
    counter = 0

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        _Conn.counter += 1
        keep = self._parser.should_keep_alive()
        rid = b"Request-Id: req_bench%012x\r\n" % _Conn.counter
        tail = b"\r\n" if keep else b"Connection: close\r\n\r\n"
        assert self._transport is not None
        self._transport.write(_HEAD + rid + tail + RESPONSE_BODY)
        if not keep:
            self._transport.close()


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    """Serve until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.host, args.port))
    else:
        uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
