"""Two sidecar replicas and one account limit: alone vs sharing the limiter on Redis.

Real processes on loopback: one ``redis-server``, one simulator (``stripe-sidecar simulate
--account-rate``), two ``stripe-sidecar serve`` replicas; each replica's app offers a fixed rate
(open loop, the mix of tests/loadgen.py) with one API key. Run once with each replica learning
alone, once with ``STRIPE_SIDECAR_RATELIMIT_SHARED``; per second and overall from ``--skip``
on, the simulator's books say what reached Stripe and how much of it was rate limited.

    .venv/bin/python bench/fleet_ratelimit.py                 # 2 x 150 req/s, limit 100/s, 30 s
    .venv/bin/python bench/fleet_ratelimit.py --seconds 60 --modes shared

Target (issue 9): sharing, Stripe's rate-limited share of what reaches it under 10% while the
app's successes use at least 80% of the limit. A benchmark, not a test: it fails nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from loadgen import Run, offer  # noqa: E402
from redisserver import RedisServer, free_port  # noqa: E402
from sidecarproc import SidecarProcess  # noqa: E402


def _books(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sim/books", timeout=5) as resp:
        books: dict[str, Any] = json.load(resp)
        return books


async def _wait_http(url: str, deadline: float) -> None:
    while True:
        try:
            await asyncio.to_thread(_books, url)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def run_mode(
    shared: bool, args: argparse.Namespace, work: Path
) -> tuple[list[dict[str, Any]], list[Run], dict[str, Any]]:
    """One run: books at each second (from replica 0's clock), every app result, final books."""
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "proxy", "simulate", "--port", str(port),
         "--account-rate", str(args.limit)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sim_url = f"http://127.0.0.1:{port}"
    redis = RedisServer(work / f"redis-{shared}").start()
    env = {"STRIPE_SIDECAR_RATELIMIT_SHARED": redis.url} if shared else {}
    replicas = [
        SidecarProcess(work / f"{'shared' if shared else 'alone'}-{i}",
                       {"upstream": {"override": sim_url}, "log": {"access_log": False}},
                       env=env).start()
        for i in range(args.replicas)
    ]  # fmt: skip
    try:
        await _wait_http(sim_url, time.monotonic() + 20)
        await asyncio.gather(*(r.started() for r in replicas))
        marks: list[dict[str, Any]] = []

        def mark() -> dict[str, Any]:
            books = _books(sim_url)
            marks.append(books)
            return books

        runs = await asyncio.gather(
            *(offer(r.url, args.rate, args.seconds, mark=mark if i == 0 else None)
              for i, r in enumerate(replicas))
        )  # fmt: skip
        end = _books(sim_url)
    finally:
        for r in replicas:
            r.stop()
        sim.terminate()
        sim.wait(10)
        redis.stop()
    return marks, list(runs), end


def report(label: str, args: argparse.Namespace, marks: list[dict[str, Any]], runs: list[Run],
           end: dict[str, Any]) -> dict[str, float]:
    """Print the per-second table and the summary of one run; return the summary."""
    def limited(b: dict[str, Any]) -> int:
        return sum(b["rate_limited"].values())

    print(f"\n{label}: {args.replicas} replicas x {args.rate:g} req/s, account limit "
          f"{args.limit:g}/s, {args.seconds:g} s")
    print(f"{'second':>6} {'reached':>8} {'limited':>8} {'share':>7} {'app ok':>7}")
    points = [*marks, end]
    for t in range(len(points) - 1):
        a, b = points[t], points[t + 1]
        reached = b["requests"] - a["requests"]
        lim = limited(b) - limited(a)
        ok = sum(1 for run in runs for r in run.results
                 if t <= r.started < t + 1 and r.status == 200)  # fmt: skip
        share = f"{lim / reached:.1%}" if reached else "-"
        print(f"{t:>6} {reached:>8} {lim:>8} {share:>7} {ok:>7}")
    start = marks[args.skip]
    reached = end["requests"] - start["requests"]
    lim = limited(end) - limited(start)
    measured = args.seconds - args.skip
    ok = sum(1 for run in runs for r in run.after(args.skip) if r.status == 200)
    refused = sum(1 for run in runs for r in run.after(args.skip)
                  if r.code == "sidecar_rate_limited")  # fmt: skip
    summary = {
        "reached": reached,
        "limited": lim,
        "limited_share": lim / reached if reached else 0.0,
        "ok_per_second": ok / measured,
        "limit_used": ok / measured / args.limit,
        "refused_by_sidecar": refused,
    }
    print(f"from {args.skip} s on: Stripe got {reached} requests, {lim} rate limited "
          f"({summary['limited_share']:.1%}, target < 10%); app successes {ok / measured:.1f}/s "
          f"= {summary['limit_used']:.0%} of the limit (target >= 80%); answered 429 "
          f"sidecar_rate_limited by the sidecars: {refused}")
    return summary


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rate", type=float, default=150.0, help="req/s each replica's app offers")
    parser.add_argument("--limit", type=float, default=100.0, help="the account's req/s")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--skip", type=int, default=4, help="seconds left out of the summary")
    parser.add_argument("--modes", default="alone,shared", help="alone, shared or both")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        for mode in args.modes.split(","):
            marks, runs, end = await run_mode(mode == "shared", args, Path(tmp))
            results[mode] = report(
                "sharing the limiter on Redis" if mode == "shared" else "each replica alone",
                args, marks, runs, end,
            )
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
