"""Instructions per request of the sidecar, counted by callgrind: repeatable on a busy machine.

CPU seconds swing by tens of percent on a shared machine; instruction counts do not. This starts
``bench/fake_stripe.py`` as the upstream and the sidecar (the shipped default config, as in
``run.py``) under ``valgrind --tool=callgrind`` with instrumentation off, warms it up, switches
counting on for exactly ``--requests`` requests sent over ``--connections`` keep-alive
connections (each sends its next request when its answer is complete), switches it off, and
prints the instructions per request. ``--tree`` measures another checkout (its own ``.venv``), so
an A/B of two trees is two runs of this script.

    python bench/callgrind.py --workload POST --requests 3000
    python bench/callgrind.py --tree /work/wt/old --workload GET

Instructions are not cycles (cache misses and syscalls' kernel time are not counted), but the
sidecar's own per-request work is; that is what a change to the Python code moves.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httptools

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from workloads import WORKLOADS  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f} s")


class _Client(asyncio.Protocol):
    """One keep-alive connection sending ``count`` requests one after another."""

    def __init__(self, request: bytes, count: int, done: asyncio.Future[list[int]]) -> None:
        self.request = request
        self.left = count
        self.done = done
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._next()

    def _next(self) -> None:
        if self.left == 0:
            if not self.done.done():
                self.done.set_result(self.statuses)
            return
        self.left -= 1
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"connection lost after {self.statuses!r}"))


async def _send(port: int, workload: str, total: int, connections: int) -> list[int]:
    loop = asyncio.get_running_loop()
    request = WORKLOADS[workload].request_bytes(f"127.0.0.1:{port}")
    futures = []
    transports = []
    for i in range(connections):
        count = total // connections + (1 if i < total % connections else 0)
        done: asyncio.Future[list[int]] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda c=count, d=done: _Client(request, c, d), "127.0.0.1", port
        )
        futures.append(done)
        transports.append(transport)
    results = await asyncio.gather(*futures)
    for transport in transports:
        transport.close()
    return [s for r in results for s in r]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _totals(outfile_glob: str) -> dict[str, int]:
    """The counts of the last dump written, by event (``Ir``, and misses with ``--simulate``)."""
    dumps = sorted(glob.glob(outfile_glob), key=os.path.getmtime)
    names: list[str] = []
    for line in Path(dumps[-1]).read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            return dict(zip(names or ["Ir"], map(int, line.split()[1:]), strict=False))
    raise RuntimeError(f"no totals in {dumps[-1]}")


def start_fake_stripe(procs: list[subprocess.Popen[bytes]]) -> int:
    """Start ``bench/fake_stripe.py`` (kept in ``procs``); its port once it listens."""
    port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(BENCH / "fake_stripe.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    procs.append(upstream)
    _wait_port(port, upstream)
    return port


def check_answers(statuses: list[int], requests: int) -> None:
    """Every request sent got a 200, or the measurement means nothing."""
    bad = [s for s in statuses if s != 200]
    if bad or len(statuses) != requests:
        raise RuntimeError(f"{len(statuses)} answers, not 200: {bad[:5]}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop every process started (each leads its own process group), the last first."""
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def measure(
    tree: Path,
    workload: str,
    requests: int,
    connections: int,
    warmup: int,
    keep: Path | None = None,
    python: str | None = None,
    config: Path | None = None,
    simulate: bool = False,
) -> dict[str, float]:
    """Events per request of the sidecar in ``tree`` (run by ``python``) for ``workload``.

    ``Ir`` is instructions; ``simulate`` adds callgrind's cache and branch simulation (``D1mr``,
    ``ILmr``, ``Bcm``, ... : misses the instruction count hides), about twice as slow.
    """
    work = keep or Path(tempfile.mkdtemp(prefix="sidecar-callgrind-"))
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    python = python or str(tree / ".venv" / "bin" / "python")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port = start_fake_stripe(procs)
        out = str(work / "callgrind.out.%p")
        sidecar = subprocess.Popen(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                *(["--cache-sim=yes", "--branch-sim=yes"] if simulate else []),
                python, "-m", "proxy", "serve",
                "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{up_port}",
                *(["--config", str(config)] if config else []),
            ],
            cwd=tree, stdout=open(work / "access.log", "wb"), stderr=open(work / "err", "wb"),  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        procs.append(sidecar)
        _wait_port(port, sidecar)
        statuses = asyncio.run(_send(port, workload, warmup, connections))
        _control(sidecar.pid, "--instr=on")
        _control(sidecar.pid, "--zero")
        statuses = asyncio.run(_send(port, workload, requests, connections))
        _control(sidecar.pid, "--dump")
        _control(sidecar.pid, "--instr=off")
        check_answers(statuses, requests)
        totals = _totals(str(work / "callgrind.out.*"))
        return {event: count / requests for event, count in totals.items()}
    finally:
        stop(procs)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Parse arguments, measure, print instructions per request."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=BENCH.parent, help="checkout with a .venv")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="POST")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--keep", type=Path, help="keep the dumps here (for callgrind_annotate)")
    p.add_argument("--python", help="the interpreter (default: the tree's .venv/bin/python)")
    p.add_argument("--config", type=Path, help="a config file (default: the shipped defaults)")
    p.add_argument("--simulate", action="store_true", help="also count cache and branch misses")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    per = measure(
        args.tree.resolve(),
        args.workload,
        args.requests,
        args.connections,
        args.warmup,
        args.keep,
        args.python,
        args.config.resolve() if args.config else None,
        args.simulate,
    )
    print(f"{args.tree} {args.workload}: {per['Ir']:,.0f} instructions/request")
    if args.simulate:
        print("  per request: " + ", ".join(f"{e} {n:,.0f}" for e, n in per.items() if e != "Ir"))


if __name__ == "__main__":
    main()
