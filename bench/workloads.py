"""What the benchmark sends and answers, and how it reads a process's CPU and memory.

Shared by ``run.py`` (the orchestrator), ``loadgen.py`` (the Python load generator) and
``fake_stripe.py`` (the fallback upstream), so every target sees byte-identical traffic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "RESPONSE_BODY",
    "WORKLOADS",
    "CpuSample",
    "Workload",
    "cpu_delta",
    "cpu_seconds",
    "memory_kib",
    "sys_share",
]

# A Stripe-shaped answer of about 300 bytes (a PaymentIntent, trimmed).
RESPONSE_BODY = (
    b'{"id":"pi_3MtwBwLkdIwHu7ix28a3tqPa","object":"payment_intent","amount":2000,'
    b'"amount_received":0,"capture_method":"automatic",'
    b'"client_secret":"pi_3MtwBwLkdIwHu7ix28a3tqPa_secret_YrKJUKribcBjcG8HVhfZluoGH",'
    b'"created":1680800504,"currency":"usd","customer":"cus_123","livemode":false,'
    b'"status":"requires_payment_method"}'
)
STRIPE_VERSION = "2024-06-20"


@dataclass(frozen=True, slots=True)
class Workload:
    """One kind of request, sent identically to every target."""

    name: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def request_bytes(self, host: str) -> bytes:
        """The raw HTTP/1.1 request, keep-alive, as a Stripe SDK would send it."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.body or self.method == "POST":
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body

    def wrk_script(self) -> str:
        """A wrk Lua script sending this request and printing a JSON summary at the end."""
        out = [f'wrk.method = "{self.method}"', f'wrk.path = "{self.path}"']
        if self.body:
            out.append(f'wrk.body = "{self.body.decode()}"')
        for k, v in self.headers:
            out.append(f'wrk.headers["{k}"] = "{v}"')
        out.append(
            "done = function(summary, latency, requests)\n"
            "  local e = summary.errors\n"
            '  io.write(string.format(\'WRKJSON {"requests":%d,"duration_us":%d,'
            '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
            '"p50_us":%d,"p99_us":%d}\\n\', summary.requests, summary.duration,'
            " e.connect, e.read, e.write, e.status, e.timeout,"
            " latency:percentile(50), latency:percentile(99)))\n"
            "end"
        )
        return "\n".join(out) + "\n"


_COMMON = (
    ("Authorization", "Bearer sk_test_benchmarkbenchmarkbenchmark"),
    ("Stripe-Version", STRIPE_VERSION),
    ("User-Agent", "Stripe/v1 PythonBindings/12.0.0"),
    (
        "X-Stripe-Client-User-Agent",
        '{"bindings_version":"12.0.0","lang":"python"}'.replace('"', "'"),
    ),
    ("Accept-Encoding", "identity"),
)

WORKLOADS: dict[str, Workload] = {
    "GET": Workload("GET", "GET", "/v1/customers/cus_123", _COMMON),
    # No Idempotency-Key: the sidecar injects one (the heavier path).
    "POST": Workload(
        "POST",
        "POST",
        "/v1/payment_intents",
        (*_COMMON, ("Content-Type", "application/x-www-form-urlencoded")),
        b"amount=2000&currency=usd&customer=cus_123&payment_method_types%5B%5D=card"
        b"&description=bench&metadata%5Border_id%5D=6735",
    ),
}

_TICK = os.sysconf("SC_CLK_TCK")


class CpuSample(NamedTuple):
    """CPU used so far by a process: see :func:`cpu_seconds`."""

    user_s: float  # utime of the whole thread group (exited threads included), 10 ms ticks
    sys_s: float  # stime, likewise: the kernel's share (syscalls, loopback TCP)
    sched_s: float | None  # sum of live threads' run time from schedstat, ns resolution
    tids: frozenset[int]


def cpu_seconds(pid: int) -> CpuSample:
    """CPU used so far by a process and all its threads.

    utime and stime come from /proc/PID/stat (whole thread group, exited threads included,
    10 ms resolution); ``sched_s`` is the sum of every live thread's run time from
    /proc/PID/task/*/schedstat (nanosecond resolution; None if unavailable). :func:`cpu_delta`
    uses the precise figure when no thread came or went between two samples.
    """
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    user, system = int(fields[11]) / _TICK, int(fields[12]) / _TICK  # fields 14 and 15
    total_ns = 0
    tids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                    total_ns += int(fh.read().split()[0])
                tids.add(int(tid))
            except FileNotFoundError:
                continue  # the thread just exited
    except OSError:
        return CpuSample(user, system, None, frozenset())
    return CpuSample(user, system, total_ns / 1e9, frozenset(tids))


def cpu_delta(before: CpuSample, after: CpuSample) -> float:
    """CPU seconds between two samples (precise when no thread came or went)."""
    if before.sched_s is not None and after.sched_s is not None and before.tids == after.tids:
        return after.sched_s - before.sched_s
    return (after.user_s + after.sys_s) - (before.user_s + before.sys_s)


def sys_share(before: CpuSample, after: CpuSample) -> float | None:
    """The kernel's share (stime / (utime + stime)) of the CPU used between two samples."""
    user = after.user_s - before.user_s
    system = after.sys_s - before.sys_s
    return system / (user + system) if user + system > 0 else None


def memory_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a process in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm
