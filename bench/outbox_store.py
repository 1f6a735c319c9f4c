"""Puts per second into the SQLite outbox store, by concurrency: what group commit buys.

    .venv/bin/python bench/outbox_store.py [--store URL]

Each put is durable when it returns (WAL, synchronous=FULL); puts that arrive while a commit is
under way share the next one. One run; read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from outbox_contract import new_item

from proxy.outbox import open_store


async def measure(url: str) -> None:
    store = await open_store(url, now=0.0)
    try:
        for concurrency, n in ((1, 300), (50, 2000), (500, 2000)):
            slots = asyncio.Semaphore(concurrency)
            waits: list[float] = []

            async def one(slots: asyncio.Semaphore = slots, waits: list[float] = waits) -> None:
                async with slots:
                    t = time.perf_counter()
                    await store.put(new_item())
                    waits.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            elapsed = time.perf_counter() - t0
            waits.sort()
            print(f"concurrency {concurrency:>4}: {n / elapsed:>7.0f} puts/s, "
                  f"p50 {waits[len(waits) // 2] * 1000:.1f} ms, "
                  f"p99 {waits[int(len(waits) * 0.99)] * 1000:.1f} ms")  # fmt: skip
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="store URL (default: a SQLite file in a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(measure(args.store or f"sqlite:///{tmp}/outbox.db"))


if __name__ == "__main__":
    main()
