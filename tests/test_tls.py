"""The upstream leg speaks TLS with certificate verification, as it must with api.stripe.com."""

from __future__ import annotations

import asyncio
import ssl

import trustme
from rawclient import exchange

BODY = b'{"object":"balance"}'


async def _tls_upstream(ca: trustme.CA, hostname: str) -> tuple[asyncio.base_events.Server, int]:
    """A TLS server on loopback presenting a certificate for ``hostname`` signed by ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY))
            await writer.drain()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def test_tls_upstream_with_trusted_ca_is_verified_and_used(make_sidecar, tmp_path):
    """With the upstream's CA trusted (upstream.ca_file), requests flow over TLS."""
    ca = trustme.CA()
    server, port = await _tls_upstream(ca, "127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        sc = await make_sidecar(f"https://127.0.0.1:{port}", upstream={"ca_file": str(ca_file)})
        answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers[0].status == 200
        assert answers[0].body == BODY
    finally:
        server.close()


async def test_untrusted_or_wrong_certificate_is_refused(make_sidecar, tmp_path):
    """A certificate from an unknown CA, or for another host name, fails with 502 and is never trusted."""
    ca = trustme.CA()
    other_ca = trustme.CA()
    ca_file = tmp_path / "other.pem"
    other_ca.cert_pem.write_to_path(str(ca_file))
    server, port = await _tls_upstream(ca, "127.0.0.1")
    wrong_name, wrong_port = await _tls_upstream(other_ca, "api.stripe.com")
    try:
        for url in (f"https://127.0.0.1:{port}", f"https://127.0.0.1:{wrong_port}"):
            sc = await make_sidecar(url, upstream={"ca_file": str(ca_file)}, retry={"max_attempts": 1})
            answers, _ = await exchange(sc.port, b"GET /v1/balance HTTP/1.1\r\nHost: x\r\n\r\n")
            a = answers[0]
            assert a.status == 502
            err = a.json()["error"]
            assert err["code"] == "sidecar_upstream_unreachable"
            assert "TLS" in err["message"]
    finally:
        server.close()
        wrong_name.close()
