"""An open-loop app for rate tests: a fixed rate of mixed Stripe reads and writes, whatever comes back.

Open loop on purpose: requests start on schedule (the schedule is the load, not a wait for a
state), so a slow or refusing sidecar cannot lower the load it is offered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

KEY = "sk_test_51LoadGenerator0000abcd"

# (method, path, form body): reads and writes, two of each per cycle.
MIX = (
    ("POST", "/v1/customers", "email=a%40example.com&metadata[ref]={i}"),
    ("GET", "/v1/balance", None),
    ("POST", "/v1/payment_intents", "amount=1000&currency=usd&metadata[ref]={i}"),
    ("GET", "/v1/customers?limit=3", None),
)


@dataclass(slots=True)
class Result:
    """One app request: when it was started (seconds into the run), its status and error code."""

    started: float
    status: int
    code: str | None


@dataclass(slots=True)
class Run:
    """Every result of one run, and what the caller captured at each whole second."""

    results: list[Result] = field(default_factory=list)
    marks: dict[int, object] = field(default_factory=dict)

    def after(self, t: float) -> list[Result]:
        """The results of requests started at or after ``t`` seconds."""
        return [r for r in self.results if r.started >= t]


async def _one(session: aiohttp.ClientSession, base: str, i: int, t: float, run: Run) -> None:
    method, path, body = MIX[i % len(MIX)]
    data = body.format(i=i) if body is not None else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
    try:
        async with session.request(method, base + path, data=data, headers=headers) as resp:
            payload = await resp.json(content_type=None)
            code = payload.get("error", {}).get("code") if resp.status >= 400 else None
            run.results.append(Result(t, resp.status, code))
    except (aiohttp.ClientError, ValueError) as exc:
        run.results.append(Result(t, 0, type(exc).__name__))


async def offer(base: str, rate: float, seconds: float, mark: Callable[[], object] | None = None) -> Run:
    """Start ``rate`` requests/s at ``base`` for ``seconds``; return once all are answered.

    ``mark`` is called at each whole second of the run (its value kept in ``Run.marks``), e.g.
    to snapshot the simulator's books at the start of the measured window.
    """
    run = Run()
    connector = aiohttp.TCPConnector(limit=400)
    timeout = aiohttp.ClientTimeout(total=30)
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"Authorization": f"Bearer {KEY}"}
    ) as session:
        start = time.monotonic()
        total = round(rate * seconds)
        for i in range(total):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the offered load, not waiting for a state
            t = i / rate
            if mark is not None and int(t) not in run.marks:
                run.marks[int(t)] = mark()
            tasks.append(asyncio.create_task(_one(session, base, i, t, run)))
        await asyncio.gather(*tasks)
    return run
