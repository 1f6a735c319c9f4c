"""`stripe-sidecar doctor` against the simulator, a revoked key, and a closed port."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from proxy.cli import main
from proxy.doctor import doctor, mask, run_checks
from proxy.simulator import start_simulator

KEY = "sk_test_doctorKey00000000000wxyz"
OTHER = "sk_test_doctorKey00000000001abcd"


async def test_every_step_passes_against_the_simulator() -> None:
    """DNS, connect, clock and the key pass; TLS is skipped for http; exit status 0."""
    lines: list[str] = []
    async with start_simulator() as sim:
        status = await doctor(sim.url, [KEY], out=lines.append)
    text = "\n".join(lines)
    assert status == 0, text
    assert "[  ok] dns" in text and "[  ok] connect" in text and "[  ok] clock" in text
    assert "[skip] tls            skipped (http)" in text
    assert "[  ok] key …wxyz" in text and "acct_simulator" in text
    assert KEY not in text and KEY[:-4] not in text
    assert text.endswith("verdict: all checks passed")


async def test_a_revoked_key_fails_its_step_and_the_verdict() -> None:
    """A revoked key is named (last 4 only) as rejected; the others pass; exit status 1."""
    lines: list[str] = []
    async with start_simulator() as sim:
        from proxy.simulator.server import SIMULATOR

        sim.app[SIMULATOR].keys.revoke(OTHER)
        status = await doctor(sim.url, [KEY, OTHER], out=lines.append)
    text = "\n".join(lines)
    assert status == 1
    assert "[FAIL] key …abcd" in text and "rejected" in text and "[  ok] key …wxyz" in text
    assert "verdict: failed: key …abcd" in text


async def test_a_closed_port_fails_at_connect_and_skips_the_rest() -> None:
    """With nothing listening, connect fails, and TLS, clock and keys are skipped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps = await run_checks(f"http://127.0.0.1:{port}", [KEY], timeout=2.0)
    by_name = {step.name: step for step in steps}
    assert by_name["dns"].ok is True
    assert by_name["connect"].ok is False and "refused" in by_name["connect"].detail.lower()
    assert by_name["clock"].ok is None and by_name[f"key {mask(KEY)}"].ok is None


def test_cli_doctor_exits_1_on_a_closed_port(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    """The CLI prints a verdict per step and exits 1 when a step fails; keys come from the env."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STRIPE_SIDECAR_SECRET_KEYS", f"{KEY}, {OTHER}")
    status = main(["doctor", "--upstream", f"http://127.0.0.1:{port}", "--timeout", "2"])
    out = capsys.readouterr().out
    assert status == 1
    assert "[FAIL] connect" in out and "key …wxyz" in out and "key …abcd" in out
    assert KEY not in out and OTHER not in out


async def _tls_simulator(ca: Any) -> tuple[Any, int]:
    """The simulator served over TLS with a certificate for 127.0.0.1 signed by ``ca``."""
    import ssl

    from aiohttp import web

    from proxy.simulator import create_app

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    return runner, runner.addresses[0][1]


async def test_tls_steps_check_the_handshake_and_certificate(tmp_path: Any) -> None:
    """Over TLS with the CA trusted every step passes and the certificate's expiry is shown; with another CA, TLS fails."""
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    trusted, untrusted = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca.cert_pem.write_to_path(str(trusted))
    other.cert_pem.write_to_path(str(untrusted))
    runner, port = await _tls_simulator(ca)
    try:
        url = f"https://127.0.0.1:{port}"
        good = {s.name: s for s in await run_checks(url, [KEY], ca_file=str(trusted))}
        bad = {s.name: s for s in await run_checks(url, [KEY], ca_file=str(untrusted))}
    finally:
        await runner.cleanup()
    assert all(s.ok for s in good.values()), good
    assert "certificate for 127.0.0.1 valid until" in good["tls"].detail
    assert bad["tls"].ok is False and "certificate" in bad["tls"].detail.lower()
    assert bad["clock"].ok is None and bad[f"key {mask(KEY)}"].ok is None
