"""A small HTTP/1.1 load generator on uvloop + httptools, run in its own process by run.py.

Two modes, each printing one JSON object on stdout:

- ``open``: a fixed rate (open loop, like wrk2). Request *i* is due at ``start + i / rate``
  whether or not earlier answers came back; it goes out on a free keep-alive connection, or
  waits for one, and its latency counts from the moment it was due and dispatched, so a slow
  target cannot hide its queueing (no coordinated omission).
- ``closed``: saturation when wrk is not installed: every connection sends its next request
  as soon as the previous answer arrives.

With ``--cpu-pid`` it samples that process's CPU (all threads) right before the first request
and right after the last answer, so the CPU per request covers exactly the requests counted.

    python bench/loadgen.py open --port 8080 --workload POST --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import time

import httptools

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS, cpu_delta, cpu_seconds, sys_share

_now = time.perf_counter


class _Conn(asyncio.Protocol):
    """One keep-alive client connection; reports each complete answer to the generator."""

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.t0 = 0.0
        self.busy = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.on_error(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        if self.busy:
            self.gen.on_error(self)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.lost = True
        self.gen.on_answer(self, status)

    def send(self, request: bytes, t0: float) -> None:
        self.t0 = t0
        self.busy = True
        assert self.transport is not None
        self.transport.write(request)


class _Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.request = WORKLOADS[args.workload].request_bytes(f"127.0.0.1:{args.port}")
        self.loop = asyncio.get_running_loop()
        self.free: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors = 0
        self.outstanding = 0
        self.closed_loop = False
        self.stop_at = 0.0
        self.idle = asyncio.Event()

    async def connect(self) -> _Conn:
        _, conn = await self.loop.create_connection(
            lambda: _Conn(self), "127.0.0.1", self.args.port
        )
        return conn

    def _replace(self) -> None:
        async def reopen() -> None:
            try:
                conn = await self.connect()
            except OSError:
                self.errors += 1
                return
            self._use(conn)

        self.loop.create_task(reopen())

    def _use(self, conn: _Conn) -> None:
        """A connection is free: give it a waiting request, the next closed-loop one, or park it."""
        if self.closed_loop:
            if _now() < self.stop_at:
                self.outstanding += 1
                conn.send(self.request, _now())
            return
        if self.waiting:
            conn.send(self.request, self.waiting.popleft())
        else:
            self.free.append(conn)

    def dispatch(self, t0: float) -> None:
        self.outstanding += 1
        if self.free:
            self.free.popleft().send(self.request, t0)
        else:
            self.waiting.append(t0)  # every connection busy: the wait counts as latency

    def on_answer(self, conn: _Conn, status: int) -> None:
        self.latencies.append(_now() - conn.t0)
        self.statuses[status] += 1
        self._done(conn)

    def on_error(self, conn: _Conn) -> None:
        self.errors += 1
        self._done(conn, broken=True)

    def _done(self, conn: _Conn, broken: bool = False) -> None:
        if not conn.busy:
            return
        conn.busy = False
        self.outstanding -= 1
        if broken or conn.lost:
            if conn.transport is not None:
                conn.transport.abort()
            self._replace()
        else:
            self._use(conn)
        if self.outstanding == 0:
            self.idle.set()


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


async def _run(args: argparse.Namespace) -> dict[str, object]:
    gen = _Generator(args)
    conns = [await gen.connect() for _ in range(args.connections)]
    gen.free.extend(conns)
    cpu0 = cpu_seconds(args.cpu_pid) if args.cpu_pid else None
    start = _now()
    if args.mode == "closed":
        gen.closed_loop = True
        gen.stop_at = start + args.duration
        ready = list(gen.free)
        gen.free.clear()
        for conn in ready:
            gen.outstanding += 1
            conn.send(gen.request, _now())
        await asyncio.sleep(args.duration)
    else:
        total = int(args.rate * args.duration)
        sent = 0
        while sent < total:
            now = _now()
            due = min(total, int((now - start) * args.rate) + 1)
            while sent < due:
                gen.dispatch(now)
                sent += 1
            delay = start + sent / args.rate - _now()
            await asyncio.sleep(delay if delay > 0 else 0)
    gen.idle.clear()
    if gen.outstanding:
        with contextlib.suppress(TimeoutError):  # what never came back counts as errors
            await asyncio.wait_for(gen.idle.wait(), timeout=10.0)
    elapsed = _now() - start
    cpu1 = cpu_seconds(args.cpu_pid) if args.cpu_pid else None
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    lat = sorted(gen.latencies)
    done = len(lat)
    ok = gen.statuses.get(200, 0)
    return {
        "mode": args.mode,
        "workload": args.workload,
        "requests": done,
        "ok": ok,
        "non_200": done - ok,
        "errors": gen.errors + gen.outstanding,
        "elapsed_s": elapsed,
        "rps": done / elapsed if elapsed > 0 else 0.0,
        "p50_us": _pct(lat, 50) * 1e6,
        "p90_us": _pct(lat, 90) * 1e6,
        "p99_us": _pct(lat, 99) * 1e6,
        "p999_us": _pct(lat, 99.9) * 1e6,
        "max_us": (lat[-1] if lat else float("nan")) * 1e6,
        "cpu_s": cpu_delta(cpu0, cpu1) if cpu0 and cpu1 else None,
        "sys_share": sys_share(cpu0, cpu1) if cpu0 and cpu1 else None,
    }


def main() -> None:
    """Parse arguments, run, print one JSON line."""
    p = argparse.ArgumentParser(description="HTTP/1.1 load generator (open or closed loop)")
    p.add_argument("mode", choices=("open", "closed"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="POST")
    p.add_argument("--rate", type=float, default=1000.0, help="requests/s (open mode)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--cpu-pid", type=int, default=0, help="process whose CPU to sample")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_run(args))
    else:
        result = uvloop.run(_run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
