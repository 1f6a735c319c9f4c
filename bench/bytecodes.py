"""Python bytecodes per request of the sidecar, by function: what callgrind's count hides.

``callgrind.py`` counts instructions; two trees can run the same number and still differ in
CPU time, because an instruction of the interpreter's loop costs more time than one of C code
that copies or hashes bytes (sampled with ``perf record -e cpu-clock``, the time in
``_PyEval_EvalFrameDefault`` grows with bytecodes executed, about 4.4 ns each on the bench
machine, while the rest does not follow its instruction count). So this counts what the loop
runs: the sidecar is started (the shipped defaults unless ``--config``) behind
``bench/fake_stripe.py``, warmed up, then every bytecode executed on its event loop's thread
is counted per function (``sys.settrace`` with opcode events) for exactly ``--requests``
requests. Deterministic: two runs give the same figures to a bytecode or two (timers that fire
during the run, such as the metrics flush, add a few).

    python bench/bytecodes.py --workload POST
    python bench/bytecodes.py --tree /work/wt/old --config old-bench.yaml --top 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from callgrind import _free_port, _send, _wait_port, check_answers, start_fake_stripe, stop  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def _serve(out: str, serve_args: list[str]) -> int:
    """Run ``proxy serve``; SIGUSR1 starts counting, SIGUSR2 stops and writes ``out`` (JSON)."""
    ops: collections.Counter[types.CodeType] = collections.Counter()
    calls: collections.Counter[types.CodeType] = collections.Counter()

    def local(frame: types.FrameType, event: str, _: Any) -> Any:
        if event == "opcode":
            ops[frame.f_code] += 1
        return local

    def on_call(frame: types.FrameType, _event: str, _arg: Any) -> Any:
        calls[frame.f_code] += 1  # a call, or a coroutine resumed
        frame.f_trace_opcodes = True
        return local

    def start(*_: object) -> None:
        ops.clear()
        calls.clear()
        sys.settrace(on_call)
        Path(out + ".started").touch()

    def stop(*_: object) -> None:
        sys.settrace(None)
        rows = [
            [f"{Path(c.co_filename).name}:{c.co_firstlineno}:{c.co_qualname}", ops[c], calls[c]]
            for c in set(ops) | set(calls)
        ]
        Path(out + ".tmp").write_text(json.dumps(rows))
        os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from proxy.cli import main

    return main(serve_args)


def _await_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {path.name} after {timeout:.0f} s")
        time.sleep(0.05)


def measure(
    tree: Path,
    workload: str,
    requests: int,
    connections: int,
    warmup: int,
    python: str | None = None,
    config: Path | None = None,
) -> list[tuple[str, float, float]]:
    """(function, bytecodes per request, calls per request) for every function that ran."""
    work = Path(tempfile.mkdtemp(prefix="sidecar-bytecodes-"))
    port = _free_port()
    python = python or str(tree / ".venv" / "bin" / "python")
    out = work / "counts.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port = start_fake_stripe(procs)
        sidecar = subprocess.Popen(
            [
                python, str(Path(__file__).resolve()), "--serve-counting", str(out), "--",
                "serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{up_port}",
                *(["--config", str(config)] if config else []),
            ],
            cwd=tree, stdout=open(work / "access.log", "wb"), stderr=open(work / "err", "wb"),  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        procs.append(sidecar)
        _wait_port(port, sidecar)
        asyncio.run(_send(port, workload, warmup, connections))
        os.kill(sidecar.pid, signal.SIGUSR1)
        _await_file(Path(str(out) + ".started"), sidecar)
        statuses = asyncio.run(_send(port, workload, requests, connections))
        os.kill(sidecar.pid, signal.SIGUSR2)
        _await_file(out, sidecar)
        check_answers(statuses, requests)
        rows = json.loads(out.read_text())
        return [(name, n / requests, c / requests) for name, n, c in rows]
    finally:
        stop(procs)


def main() -> None:
    """Parse arguments, measure, print bytecodes per request and the functions that run most."""
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-counting":
        sys.exit(_serve(sys.argv[2], sys.argv[4:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=BENCH.parent, help="checkout with a .venv")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="POST")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--python", help="the interpreter (default: the tree's .venv/bin/python)")
    p.add_argument("--config", type=Path, help="a config file (default: the shipped defaults)")
    p.add_argument("--top", type=int, default=25, help="functions listed (0: none)")
    args = p.parse_args()
    rows = measure(
        args.tree.resolve(),
        args.workload,
        args.requests,
        args.connections,
        args.warmup,
        args.python,
        args.config.resolve() if args.config else None,
    )
    total = sum(r[1] for r in rows)
    frames = sum(r[2] for r in rows)
    print(
        f"{args.tree} {args.workload}: {total:,.0f} bytecodes/request "
        f"in {frames:.1f} Python frames (calls and resumptions)"
    )
    if args.top:
        print(f"{'bytecodes':>10} {'frames':>7}  function")
        for name, n, c in sorted(rows, key=lambda r: -r[1])[: args.top]:
            print(f"{n:10.1f} {c:7.2f}  {name}")


if __name__ == "__main__":
    main()
