"""Micro-benchmark: what metrics cost per request, and what a scrape costs the other requests.

1. Hot path, before/after: the previous hand-written counters and histogram (plain integers and a
   bisect, kept here verbatim as the reference) against the sidecar's
   :class:`proxy.observers.BuiltinObserver` given the pipeline's records; it counts into
   :class:`proxy.metrics.OperationMetrics`' plain numbers too, which move into prometheus_client's
   own Counter and Histogram children when the registry is collected (not timed here: once per
   scrape, on the loop, before rendering in a worker thread). One "request" records what the
   pipeline records for a GET answered on the first attempt (attempt + request); POSTs add an
   injected key. Not like for like: "before" is the counting calls alone, "after" the whole
   observer (the operation's look-up, the record unpacked, the fail-fast, budget, limiter and
   access-log tests; the access log is off).
2. Scrape with 1,000 operations populated: the render time, and the longest delay a concurrent
   request sees through a running sidecar (keep-alive client, one request at a time, against
   ``bench/fake_stripe.py`` in its own process) while /metrics is scraped back to back; once with
   the render off the event loop (what ships) and once rendered on the loop (the old way).

    .venv/bin/python bench/metrics_micro.py

One run on a shared machine: quote the ratios, not the absolute figures.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
import timeit
from bisect import bisect_left
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from proxy.app import Sidecar  # noqa: E402
from proxy.config import config_from_dict  # noqa: E402
from proxy.log import Logger  # noqa: E402
from proxy.metrics import LATENCY_BUCKETS, Metrics  # noqa: E402
from proxy.observers import BuiltinObserver  # noqa: E402
from proxy.records import AttemptRecord, RequestRecord  # noqa: E402

OPERATIONS = 1000


class _OldHistogram:
    """The previous hand-written histogram (bucket counts and a sum, no locks)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value


class OldOperationMetrics:
    """The previous per-operation hot path: plain numbers, turned into samples when scraped."""

    __slots__ = ("attempt_duration", "attempts", "keys_injected", "request_duration", "requests")

    def __init__(self) -> None:
        self.requests: dict[tuple[int, str], int] = {}
        self.attempts: dict[str, int] = {}
        self.keys_injected = 0
        self.request_duration = _OldHistogram()
        self.attempt_duration = _OldHistogram()

    def request(self, status: int, outcome: str, duration: float) -> None:
        key = (status // 100, outcome)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.request_duration.observe(duration)

    def attempt(self, outcome: str, duration: float) -> None:
        attempts = self.attempts
        attempts[outcome] = attempts.get(outcome, 0) + 1
        self.attempt_duration.observe(duration)

    def key_injected(self) -> None:
        self.keys_injected += 1


_DURATIONS = (0.03, 0.12, 0.3, 0.6)


def _observer(metrics: Metrics) -> BuiltinObserver:
    """The sidecar's observer, counting into ``metrics``, its access log off."""
    return BuiltinObserver(metrics, Logger(io.StringIO(), access_log=False))


def _attempt(op: str, outcome: str, seconds: float, retry_in: float | None = None) -> AttemptRecord:
    return AttemptRecord(op, 1, outcome, 200, None, None, "req_1", None, seconds, retry_in)


def _answer(op: str, status: int, outcome: str, seconds: float, key: bool) -> RequestRecord:
    method = op.split(" ", 1)[0]
    return RequestRecord(
        op, method, status, outcome, 1, seconds, "req_1", None, key, "answered", 0.0
    )


def _old_us(*, post: bool, n: int = 200_000) -> float:
    op = OldOperationMetrics()
    request, attempt, key = op.request, op.attempt, op.key_injected
    durations = list(_DURATIONS) * (n // 4)

    def run() -> None:
        for d in durations:
            attempt("success", d)
            if post:
                key()
            request(200, "success", d)

    return min(timeit.repeat(run, number=1, repeat=5)) / len(durations) * 1e6


def _observer_us(*, post: bool, n: int = 200_000) -> float:
    # The pipeline makes the records for every observer; only the observer's calls are timed.
    name = "POST /v1/customers" if post else "GET /v1/balance"
    observer = _observer(Metrics(CollectorRegistry()))
    attempt, request = observer.attempt, observer.request
    pairs = [
        (_attempt(name, "success", d), _answer(name, 200, "success", d, post)) for d in _DURATIONS
    ] * (n // 4)

    def run() -> None:
        for a, r in pairs:
            attempt(a)
            request(r)

    return min(timeit.repeat(run, number=1, repeat=5)) / len(pairs) * 1e6


def hot_path() -> None:
    """Print the per-request cost of recording metrics, before and after."""
    print("1. hot path: metrics recorded per request (microseconds, lower is better)")
    print(f"   {'request':8} {'before':>8} {'after':>8} {'after/before':>13}")
    for post in (False, True):
        before = _old_us(post=post)
        after = _observer_us(post=post)
        name = "POST" if post else "GET"
        print(f"   {name:8} {before:8.3f} {after:8.3f} {after / before:13.2f}")


def populate(metrics: Metrics) -> None:
    """1,000 operations, each with the series a busy sidecar would have."""
    observer = _observer(metrics)
    for i in range(OPERATIONS):
        name = f"POST /v1/bench_{i}/*"
        observer.attempt(_attempt(name, "timeout", 0.3, retry_in=0.1))  # and a retry counted
        observer.attempt(_attempt(name, "success", 0.3))
        for status, outcome in ((200, "success"), (402, "card_declined"), (503, "upstream_5xx")):
            observer.request(_answer(name, status, outcome, 0.2, status == 200))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: bytes) -> None:
    writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    await reader.readexactly(length)


async def _delays(port: int, *, scrapes: int) -> tuple[float, int]:
    """Longest request latency (ms) while ``scrapes`` scrapes run back to back; requests made."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = asyncio.Event()

    async def scraper() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(scrapes):
            await _get(r, w, b"/metrics")
        w.close()
        done.set()

    task = asyncio.create_task(scraper()) if scrapes else None
    worst, count, end = 0.0, 0, time.perf_counter() + 1.0
    while not done.is_set() if task else time.perf_counter() < end:
        sent = time.perf_counter()
        await _get(reader, writer, b"/v1/balance")
        worst = max(worst, time.perf_counter() - sent)
        count += 1
    writer.close()
    return worst * 1e3, count


async def scrape() -> None:
    """Print render figures and the worst delay a concurrent request sees during scrapes."""
    port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_stripe.py"), "--port", str(port)],
        start_new_session=True,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        config = config_from_dict(
            {
                "server": {"listen": "127.0.0.1:0"},
                "upstream": {"override": f"http://127.0.0.1:{port}"},
                "ratelimit": {"enabled": False},
                "log": {"access_log": False},
            }
        )
        devnull = open(os.devnull, "w")  # noqa: SIM115
        sidecar = Sidecar(config, log_stream=devnull)
        sc_port = await sidecar.start()
        populate(sidecar.metrics)
        body = sidecar.metrics.render()
        render_ms = min(timeit.repeat(sidecar.metrics.render, number=1, repeat=3)) * 1e3
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        print(f"\n2. scrape, {OPERATIONS} operations: {series} series, {len(body) // 1024} KiB,")
        print(f"   render {render_ms:.0f} ms of CPU (in a worker thread: the loop keeps running)")
        idle, n_idle = await _delays(sc_port, scrapes=0)
        off_loop, n_off = await _delays(sc_port, scrapes=5)
        render_async = sidecar.metrics.render_async

        async def on_loop() -> bytes:
            return sidecar.metrics.render()

        sidecar.metrics.render_async = on_loop  # type: ignore[method-assign]
        blocking, n_block = await _delays(sc_port, scrapes=5)
        sidecar.metrics.render_async = render_async  # type: ignore[method-assign]
        print("   longest delay of a concurrent request (ms), requests made meanwhile:")
        print(f"   {'no scrape (1 s)':34} {idle:8.1f}   {n_idle}")
        print(f"   {'5 scrapes, rendered off the loop':34} {off_loop:8.1f}   {n_off}")
        print(f"   {'5 scrapes, rendered on the loop':34} {blocking:8.1f}   {n_block}")
        await sidecar.stop()
    finally:
        upstream.terminate()
        upstream.wait(5)


def main() -> None:
    """Run both parts."""
    hot_path()
    try:
        import uvloop

        uvloop.run(scrape())
    except ImportError:
        asyncio.run(scrape())


if __name__ == "__main__":
    main()
