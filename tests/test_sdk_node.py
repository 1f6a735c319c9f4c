"""The official stripe-node SDK gets the same results through the sidecar as from Stripe.

tests/node/sdk_check.js runs one scripted sequence against a base URL and prints normalised
results; it runs once against a simulator and once through a sidecar in front of a second,
fresh simulator. Needs node and the locked npm package: `npm ci --prefix tests/node`.
Deselect with `-m "not node"`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.simulator import start_simulator

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "sdk_check.js"
INSTALL_HINT = "run `npm ci --prefix tests/node` (needs Node.js >= 20 and npm)"
SEED = 11


def require_node(node_dir: Path = NODE_DIR,
                 which: Callable[[str], str | None] = shutil.which) -> str:
    """The node executable, or fail the test saying how to install what is missing."""
    node = which("node")
    if node is None:
        pytest.fail(f"node is not on PATH: install Node.js, then {INSTALL_HINT}", pytrace=False)
    if not (node_dir / "node_modules" / "stripe" / "package.json").is_file():
        pytest.fail(f"the stripe npm package is not installed in {node_dir}: {INSTALL_HINT}",
                    pytrace=False)
    return node


async def run_check(node: str, base_url: str) -> dict[str, Any]:
    """Run sdk_check.js against `base_url` without blocking the loop; its parsed output."""
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), base_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    result: dict[str, Any] = json.loads(out)
    return result


def test_missing_node_or_package_fails_with_install_hint(tmp_path: Path) -> None:
    """A missing node or node_modules fails (never skips) and names the npm ci command."""
    with pytest.raises(pytest.fail.Exception, match="npm ci --prefix tests/node"):
        require_node(tmp_path, lambda _: None)
    with pytest.raises(pytest.fail.Exception, match=r"stripe npm package.*npm ci --prefix"):
        require_node(tmp_path, lambda _: "/usr/bin/node")
    (tmp_path / "node_modules" / "stripe").mkdir(parents=True)
    (tmp_path / "node_modules" / "stripe" / "package.json").write_text("{}")
    assert require_node(tmp_path, lambda _: "/usr/bin/node") == "/usr/bin/node"


@pytest.mark.node
async def test_node_sdk_results_match_through_sidecar(make_sidecar: Callable[..., Any]) -> None:
    """stripe-node's objects, errors, uploads and OAuth are the same via the sidecar, no dupes."""
    node = require_node()
    async with start_simulator(seed=SEED) as sim:
        direct = await run_check(node, sim.url)
        direct_books = sim.books()
    async with start_simulator(seed=SEED) as sim:
        sidecar = await make_sidecar(sim.url)
        via = await run_check(node, sidecar.url)
        via_books = sim.books()

    s = direct["steps"]
    assert s["customer update"]["fields"]["name"] == "Zoë Ångström ✓ & Co = 100%"
    assert s["customer page"]["fields"]["has_more"] is True
    assert len(s["customer auto-paged"]["value"]) == 5
    assert s["customer retrieve deleted"]["fields"]["deleted"] is True
    assert s["payment succeeded"]["fields"]["status"] == "succeeded"
    declined = s["payment declined"]
    assert (declined["raised"], declined["statusCode"], declined["code"]) == (
        "StripeCardError", 402, "card_declined")
    assert declined["decline_code"] == "generic_decline"
    assert (s["missing customer"]["raised"], s["missing customer"]["statusCode"]) == (
        "StripeInvalidRequestError", 404)
    assert s["missing currency"]["param"] == "currency"
    assert (s["bad key"]["raised"], s["bad key"]["statusCode"]) == (
        "StripeAuthenticationError", 401)
    assert s["readonly write"]["raised"] == "StripePermissionError"
    assert s["keyed replay"]["replayed"] == "true"
    assert s["keyed mismatch"]["raised"] == "StripeIdempotencyError"
    assert s["file contents small"]["bytes"] == s["file upload small"]["fields"]["size"]
    assert s["file contents large"]["bytes"] == 1536 * 1024
    assert s["oauth code"]["fields"]["token_type"] == "bearer"
    assert s["oauth code reused"]["raised"] == "StripeInvalidGrantError"
    assert s["meter event"]["object"] == "v2.billing.meter_event"

    assert via == direct
    assert via_books["duplicates"] == 0
    assert via_books["side_effects"] == direct_books["side_effects"]
    assert via_books["by_operation"] == direct_books["by_operation"]
    assert via_books["refs"] == direct_books["refs"]
