"""/status in a real headless Chromium: the DOM after its scripts ran, and a screenshot."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.simulator import start_simulator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get)"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--no-first-run", "--window-size=1280,1000"]
FAST = {
    "diagnosis": {"interval": 0.1, "window": 10.0, "raise_after": 0.2, "clear_after": 30.0,
                  "stripe_outage": {"min_count": 3}},
    "retry": {"max_attempts": 1},
    "log": {"access_log": False},
}


async def _chromium(*args: str) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return out.decode()


async def _outage(sidecar_url: str, sim: Any) -> None:
    """Drive calls through an outage until /diagnosis shows stripe_outage."""
    sim.set_profile("outage")
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for path in ("/v1/balance", "/v1/customers"):
                async with s.get(sidecar_url + path, headers={"Authorization": "Bearer sk_test_x1"}) as r:
                    await r.read()
            async with s.get(sidecar_url + "/diagnosis") as r:
                if any(d["kind"] == "stripe_outage" for d in (await r.json())["active"]):
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("stripe_outage was not raised within 10 s")


async def test_status_page_names_the_active_diagnosis_in_chromium(
    make_sidecar: Any, tmp_path: Path
) -> None:
    """After its scripts ran, the page's verdict and cards name stripe_outage; the screenshot is a real image."""
    async with start_simulator() as sim:
        sidecar = await make_sidecar(sim.url, **FAST)
        await _outage(sidecar.url, sim)
        dom = await _chromium("--virtual-time-budget=5000", "--dump-dom", sidecar.url + "/status")
        shot = tmp_path / "status.png"
        await _chromium("--virtual-time-budget=3000", f"--screenshot={shot}", sidecar.url + "/status")
    assert 'id="verdict" class="critical"' in dom
    assert "Trouble: stripe_outage" in dom
    assert 'data-kind="stripe_outage"' in dom and "What to do:" in dom
    assert "<td>GET /v1/balance</td>" in dom and "<svg" in dom and "polyline" in dom
    assert "updated" in dom  # the script ran (it stamps the time)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    keep = Path("/tmp/stripe-sidecar-status.png")
    keep.write_bytes(data)  # for a person to look at after the run


async def test_status_page_shows_the_outbox_in_chromium(make_sidecar: Any, tmp_path: Path) -> None:
    """With a queue operation in an outage, the page's Outbox table counts the queued write and the store is up."""
    async with start_simulator(profile="outage") as sim:
        sidecar = await make_sidecar(
            sim.url,
            retry={"max_attempts": 1},
            operations={"POST /v1/customers": {"fallback": "queue"}},
            outbox={"store": f"sqlite:///{tmp_path}/outbox.db", "poll_interval": 0.05},
        )
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": "Bearer sk_test_statuspage00000000"}
            async with s.post(sidecar.url + "/v1/customers", data={"email": "a@example.com"}, headers=headers) as r:
                assert r.status == 202
            deadline = time.monotonic() + 5
            while True:  # the gauges and counts refresh every poll_interval
                async with s.get(sidecar.url + "/diagnosis") as r:
                    counts = (await r.json())["outbox"]["counts"]
                if counts["queued"] + counts["delivering"] == 1:
                    break
                assert time.monotonic() < deadline, counts
                await asyncio.sleep(0.05)
        dom = await _chromium("--virtual-time-budget=3000", "--dump-dom", sidecar.url + "/status")
    assert "<h2>Outbox</h2>" in dom
    assert 'data-state="queued">1<' in dom or 'data-state="delivering">1<' in dom
    assert "up · sqlite:///" in dom
    assert "sk_test_statuspage" not in dom
