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
