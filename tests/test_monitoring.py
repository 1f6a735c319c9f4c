"""Alert rules and the Grafana dashboard: promtool checks and unit-tests the rules, and a real
Prometheus server scrapes a running sidecar: every metric name the rules and the dashboard use
is in what it scraped, every dashboard query runs, and every rule evaluates cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ports import free_port
from rawclient import exchange
from rawupstream import Received, json_answer

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
RULE_TESTS = ROOT / "tests" / "promtool" / "alerts.test.yaml"
METRIC = re.compile(r"\bstripe_sidecar_\w+")
# Grafana's variables, as a query sent for the last few minutes would have them.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}

BALANCE = b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_x\r\n\r\n"
CHARGE = (
    b"POST /v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_x\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\namount=2000"
)
CUSTOMER = (
    b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_x\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 21\r\n\r\nemail=a%40example.com"
)
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: 17\r\n\r\n"
    b"<h1>overload</h1>"
)


def tool(name: str) -> str:
    """A Debian tool `make test` installs (package prometheus), else a clear failure."""
    path = shutil.which(name)
    assert path, f"{name} is not installed: run `make test` (apt-get install prometheus)"
    return path


def rule_exprs() -> list[str]:
    """The PromQL of every rule in config/prometheus-alerts.yaml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """The PromQL of every target and query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"label_values\((\w+),.*\)", r"\1", var["definition"]))
    return exprs


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts the alert rules file."""
    run = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules`: each alert fires on its series, and stays quiet on healthy ones."""
    run = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    rules = yaml.safe_load(RULES.read_text())["groups"]
    assert tested == {r["alert"] for g in rules for r in g["rules"]}, "every alert has a unit test"


def test_dashboard_shape() -> None:
    """The dashboard is Grafana JSON: unique panel ids, panels on the 24-column grid, every query
    on the ${datasource} variable, and only the sidecar's own metrics."""
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert p["description"], p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}
    for expr in dashboard_exprs():
        assert METRIC.search(expr), expr


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why, in JSON
        body = exc.read()
        # 503 "Service Unavailable" in plain text while it starts up: not an answer yet.
        return json.loads(body) if body.startswith(b"{") else None
    except OSError:
        return None


async def _poll(what: str, check: Callable[[], Any], proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)


def _upstream(r: Received) -> bytes:
    """Balance reads succeed; writes always meet a busy Stripe (503, retryable)."""
    if r.method == "GET":
        return json_answer(200, b'{"object":"balance","available":[]}')
    return BUSY


async def _no_wait(delay: float) -> None:
    return None


async def test_prometheus_scrapes_every_metric_rules_and_dashboard_use(raw_upstream: Any, make_sidecar: Any, tmp_path: Path) -> None:
    """A real Prometheus scraping a sidecar that saw successes, retries, a spent retry budget, an
    open breaker and a write queued in its outbox has every metric the rules and the dashboard
    name; each dashboard query runs and each rule evaluates without error."""
    up = await raw_upstream(_upstream)
    sc = await make_sidecar(
        up.url,
        sleep=_no_wait,
        # One retry per charge while the budget lasts (a fifth of the requests, no floor): the
        # second charge finds it spent. The charges' breaker opens after 6 failed attempts (the
        # fourth charge): fail-fast answers follow.
        retry={"max_attempts": 2, "budget_ratio": 0.2, "budget_min_per_second": 0.0},
        breaker={"consecutive_failures": 6, "min_calls": 100},
        # Customer creations that cannot reach Stripe wait in the outbox (answered 202), and its
        # worker's delivery rounds meet the busy Stripe again.
        operations={"POST /v1/customers": {"fallback": "queue"}},
        outbox={"store": f"sqlite:///{tmp_path / 'outbox.db'}", "poll_interval": 0.1, "backoff_base": 0.1},
    )
    for _ in range(3):
        assert (await exchange(sc.port, BALANCE))[0][0].status == 200
    statuses = [(await exchange(sc.port, CHARGE))[0][0].status for _ in range(8)]
    assert statuses == [503] * 8
    assert (await exchange(sc.port, CUSTOMER))[0][0].status == 202

    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "stripe-sidecar", "static_configs": [{"targets": [f"127.0.0.1:{sc.port}"]}]}
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        used = {m for e in rule_exprs() + dashboard_exprs() for m in METRIC.findall(e)}

        def names() -> set[str] | None:
            answer = _api(port, "label/__name__/values")
            got = set(answer["data"]) if answer and answer["status"] == "success" else set()
            return got if used <= got else None

        try:
            await _poll("every metric in a scrape", names, proc, log)
        except AssertionError:
            answer = _api(port, "label/__name__/values") or {"data": []}
            raise AssertionError(f"not scraped: {sorted(used - set(answer['data']))}") from None

        for expr in dashboard_exprs():
            query = expr
            for var, value in VARIABLES.items():
                query = query.replace(var, value)
            answer = await asyncio.to_thread(_api, port, "query", query=query)
            assert answer and answer["status"] == "success", f"{expr}: {answer}"

        def evaluated() -> list[dict[str, Any]] | None:
            answer = _api(port, "rules")
            if not answer or answer["status"] != "success":
                return None
            rules = [r for g in answer["data"]["groups"] for r in g["rules"]]
            # "unknown" until a rule's first evaluation; then "ok" or "err" with lastError.
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = await _poll("every rule evaluated", evaluated, proc, log)
        assert len(rules) == len(rule_exprs())
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
