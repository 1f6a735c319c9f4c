"""Self-healing end to end on the simulator: held keys and failover, pool resets, concurrency.

Each test runs app traffic through a real sidecar in front of the simulator, makes trouble in
the simulator, and polls /diagnosis (with a deadline) for the action the sidecar took and, once
health returns, for its undoing. Windows and hysteresis are the short ones of the diagnosis
scenarios.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_diagnosis_scenarios import FAST, Traffic, diagnosis, until

from proxy.app import held_keys
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.simulator import start_simulator

PRIMARY = "sk_test_heldPrimaryKey000000000pppp"
SECOND = "sk_test_heldSecondKey0000000000ssss"
OTHER = "sk_test_otherAccountKey00000000oooo"
# What an app sends when the sidecar holds the keys: anything (it is replaced).
APP = {"Authorization": "Bearer sk_test_appPlaceholder"}
TOKEN = "client-token-0123456789abcdef"


@pytest.fixture
async def sim() -> Any:
    async with start_simulator() as handle:
        yield handle


async def _sim_post(sim: Any, path: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.post(sim.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()


async def _checked(sidecar: Any, rounds: int = 1) -> None:
    async def done() -> bool:
        return bool(sidecar.keeper.rounds >= rounds)

    await until(done, 10, f"{rounds} key check round(s)")


def _actions(doc: dict[str, Any], kind: str, result: str | None = None) -> list[dict[str, Any]]:
    return [a for a in doc["actions"] if a["kind"] == kind and result in (None, a["result"])]


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as resp:
        return resp.status, await resp.text(), resp.headers


async def _surfaces(sidecar: Any) -> list[str]:
    """Logs, /metrics, /diagnosis and /status, as text."""
    sidecar.log.flush()
    texts = [sidecar.log._stream.getvalue()]
    for path in ("/metrics", "/diagnosis", "/status"):
        texts.append((await _get(sidecar.url + path))[1])
    return texts


def _nowhere(texts: list[str], *keys: str) -> None:
    for key in keys:
        for text in texts:
            assert key not in text and key[8:] not in text and key[-12:] not in text


async def test_revoked_primary_fails_over_with_no_app_visible_failure(sim: Any, make_sidecar: Any) -> None:
    """Primary revoked mid-run: 0 failed app requests; auth_failure and the failover on /diagnosis."""
    sidecar = await make_sidecar(sim.url, secret_keys=[PRIMARY, SECOND], **FAST)
    await _checked(sidecar)
    async with Traffic(sidecar.url, APP) as traffic:
        await until(lambda: _answers(traffic, 20), 10, "20 answers")
        await _sim_post(sim, "/_sim/keys/revoke", {"key": PRIMARY})
        seen: dict[str, Any] = {}

        async def failed_over() -> bool:
            doc = await diagnosis(sidecar.url)
            seen.update(doc)
            return bool(_actions(doc, "key_failover")) and any(
                d["kind"] == "auth_failure" for d in doc["active"]
            )

        await until(failed_over, 10, "key_failover and auth_failure")
        after = len(traffic.statuses)
        await until(lambda: _answers(traffic, after + 20), 10, "20 more answers")
    assert traffic.statuses and set(traffic.statuses) == {200}
    action = _actions(seen, "key_failover")[0]
    assert (action["before"], action["after"], action["result"]) == ("…pppp", "…ssss", "ok")
    assert sidecar.keys.active.secret == SECOND
    texts = await _surfaces(sidecar)
    assert '"event":"key_failover"' in texts[0]
    assert 'stripe_sidecar_healing_actions_total{kind="key_failover",result="ok"} 1.0' in texts[1]
    _nowhere(texts, PRIMARY, SECOND)


async def _answers(traffic: Traffic, n: int) -> bool:
    return len(traffic.statuses) >= n


async def test_keys_of_two_accounts_never_fail_over_across(sim: Any, make_sidecar: Any) -> None:
    """A held key of another account is flagged at its check and never used after a 401."""
    await _sim_post(sim, "/_sim/keys/account", {"key": OTHER, "account": "acct_other"})
    sidecar = await make_sidecar(sim.url, secret_keys=[PRIMARY, OTHER], **FAST)
    await _checked(sidecar)
    doc = await diagnosis(sidecar.url)
    [check] = _actions(doc, "key_check", "failed")
    assert "acct_other" in check["reason"] and check["before"] == "…oooo"
    assert [d["kind"] for d in doc["active"]] == ["auth_failure"]
    await _sim_post(sim, "/_sim/keys/revoke", {"key": PRIMARY})
    status, _, headers = await _get(sidecar.url + "/v1/balance", APP)
    assert status == 401 and headers["Sidecar-Attempts"] == "1"
    assert sidecar.keys.active.secret == PRIMARY
    assert not _actions(await diagnosis(sidecar.url), "key_failover")
    _nowhere(await _surfaces(sidecar), PRIMARY, OTHER)


async def test_keys_file_rewritten_while_running_is_picked_up(
    sim: Any, make_sidecar: Any, tmp_path: Path
) -> None:
    """A second key written to keys.file is read, checked, and then failed over to."""
    path = tmp_path / "keys"
    path.write_text(f"# primary first\n{PRIMARY}\n")
    keys = {"file": str(path), "poll_interval": 0.05}
    sidecar = await make_sidecar(sim.url, keys=keys, **FAST)
    await _checked(sidecar)
    assert [k.secret for k in sidecar.keys.keys] == [PRIMARY]
    path.write_text(f"{PRIMARY}\n{SECOND}\n")
    await _checked(sidecar, 2)
    assert sidecar.keys.states() == {"…pppp": "ok", "…ssss": "ok"}
    await _sim_post(sim, "/_sim/keys/revoke", {"key": PRIMARY})
    status, _, headers = await _get(sidecar.url + "/v1/balance", APP)
    assert status == 200 and headers["Sidecar-Attempts"] == "2"
    texts = await _surfaces(sidecar)
    assert '"event":"keys_reloaded"' in texts[0]
    _nowhere(texts, PRIMARY, SECOND)


async def test_client_token_is_required_when_one_is_set(sim: Any, make_sidecar: Any) -> None:
    """With a client token, anything else is answered 401 by the sidecar and never forwarded."""
    sidecar = await make_sidecar(sim.url, secret_keys=[PRIMARY], client_token=TOKEN, **FAST)
    status, body, _ = await _get(sidecar.url + "/v1/balance", APP)
    assert status == 401 and "sidecar_client_token_required" in body
    status, _, _ = await _get(sidecar.url + "/v1/balance")
    assert status == 401
    status, _, _ = await _get(sidecar.url + "/v1/balance", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    _nowhere(await _surfaces(sidecar), PRIMARY)


def test_holding_keys_beyond_loopback_needs_a_client_token(tmp_path: Path) -> None:
    """Keys held on 0.0.0.0 without a token refuse to start, saying why; loopback or a token is fine."""
    wide = config_from_dict({"server": {"listen": "0.0.0.0:8080"}})
    with pytest.raises(ConfigError) as caught:
        held_keys(wide, [PRIMARY], None)
    assert "STRIPE_SIDECAR_CLIENT_TOKEN" in str(caught.value) and PRIMARY[-12:] not in str(caught.value)
    assert held_keys(wide, [PRIMARY], TOKEN) is not None
    assert held_keys(config_from_dict({"server": {"listen": "[::1]:8080"}}), [PRIMARY], None)
    assert held_keys(wide, [], None) is None
    path = tmp_path / "keys"
    path.write_text(f"{PRIMARY}\n")
    both = config_from_dict({"keys": {"file": str(path)}})
    with pytest.raises(ConfigError, match="not both"):
        held_keys(both, [SECOND], None)
    path.write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match=r"keys\.file: .* holds no key"):
        held_keys(both, [], None)


async def test_network_failure_resets_the_pools_and_undoes_it(make_sidecar: Any) -> None:
    """Upstream port closed: a pool_reset action is recorded; reopened: recorded as undone."""
    with socket_port() as port:
        stack = contextlib.AsyncExitStack()
        sim = await stack.enter_async_context(start_simulator(port=port))
        sidecar = await make_sidecar(sim.url, **FAST)
        try:
            async with Traffic(sidecar.url):
                await until(lambda: _has(sidecar, "pool_reset", None, absent=True), 5, "quiet")
                await stack.aclose()
                await until(lambda: _has(sidecar, "pool_reset", "ok"), 10, "pool reset")
                await stack.enter_async_context(start_simulator(port=port))
                await until(lambda: _has(sidecar, "pool_reset", "undone"), 30, "reset undone")
        finally:
            await stack.aclose()
    [reset] = _actions(await diagnosis(sidecar.url), "pool_reset", "ok")
    assert "connect step" in reset["reason"] and reset["diagnosis"] == "network_failure"


@contextlib.contextmanager
def socket_port() -> Any:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port


async def _has(sidecar: Any, kind: str, result: str | None, *, absent: bool = False) -> bool:
    found = bool(_actions(await diagnosis(sidecar.url), kind, result))
    return not found if absent else found


async def test_rate_limiting_tightens_concurrency_then_restores_it(
    sim: Any, make_sidecar: Any
) -> None:
    """Account rate limited: the operations' in-flight bound is tightened, then restored step by step."""
    from proxy.simulator.faults import profile_from_mapping

    sidecar = await make_sidecar(sim.url, healing={"restore_interval": 0.1}, **FAST)
    async with Traffic(sidecar.url, APP):
        await until(lambda: _answers_of(sidecar), 10, "traffic")
        sim.set_profile(profile_from_mapping({"account_rate": 5.0}))
        await until(lambda: _has(sidecar, "concurrency_tightened", "ok"), 10, "tightened")
        tightened = dict(sidecar.healer.tightened)
        assert tightened and all(t.compartment.limit == 4 for t in tightened.values())
        sim.set_profile("none")
        await until(lambda: _has(sidecar, "concurrency_restored", "undone"), 30, "restored")
    assert not sidecar.healer.tightened
    limits = sidecar.forwarder.compartments()
    assert all(limits[name].limit == t.original for name, t in tightened.items())
    doc = await diagnosis(sidecar.url)
    first = _actions(doc, "concurrency_tightened")[-1]
    assert first["before"].endswith(": 256 in flight") and first["after"].endswith(": 4 in flight")


async def _answers_of(sidecar: Any) -> bool:
    return bool(sidecar.forwarder.compartments())


async def test_stripe_outage_keeps_the_sidecar_ready(sim: Any, make_sidecar: Any) -> None:
    """While stripe_outage is active /ready stays 200: the pod must not leave its Service."""
    sidecar = await make_sidecar(sim.url, **FAST)
    async with Traffic(sidecar.url, APP):
        sim.set_profile("outage")

        async def outage() -> bool:
            return any(d["kind"] == "stripe_outage" for d in (await diagnosis(sidecar.url))["active"])

        await until(outage, 10, "stripe_outage raised")
        status, body, _ = await _get(sidecar.url + "/ready")
    assert status == 200 and '"ready":true' in body


def test_keys_file_env_name_is_documented() -> None:
    """The README names the environment variables and the keys.file option."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in ("STRIPE_SIDECAR_SECRET_KEYS", "STRIPE_SIDECAR_CLIENT_TOKEN", "keys.file"):
        assert name in readme


def test_keys_and_healing_sections_report_key_paths() -> None:
    """Bad keys/healing values and unknown keys are named by their key paths, all at once."""
    with pytest.raises(ConfigError) as caught:
        config_from_dict(
            {"keys": {"poll_interval": 0, "fiel": "x"}, "healing": {"tighten_factor": 1.5}}
        )
    problems = "\n".join(caught.value.problems)
    assert "keys.poll_interval: 0 is not a positive number" in problems
    assert "unknown key: keys.fiel (did you mean file?)" in problems
    assert "healing.tighten_factor: 1.5 is not a ratio in (0, 1]" in problems


def test_doctor_checks_the_keys_file_when_no_key_is_given(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`doctor --config` with keys.file names each held key (masked) when no key is given."""
    from proxy.cli import main

    monkeypatch.delenv("STRIPE_SIDECAR_SECRET_KEYS", raising=False)
    (tmp_path / "keys").write_text(f"{PRIMARY}\n{SECOND}\n")
    (tmp_path / "sidecar.yaml").write_text(f"keys: {{file: {tmp_path / 'keys'}}}\n")
    with socket_port() as port:
        status = main(["doctor", "--config", str(tmp_path / "sidecar.yaml"),
                       "--upstream", f"http://127.0.0.1:{port}", "--timeout", "2"])
    out = capsys.readouterr().out
    assert status == 1 and "key …pppp" in out and "key …ssss" in out
    assert PRIMARY not in out and SECOND not in out
