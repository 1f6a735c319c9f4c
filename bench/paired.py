"""CPU per request of sidecar builds loaded at the same moment on one core: a ~1% A/B.

Run one after another (``ab.py``), two builds see different moments of a shared machine, and
their CPU per request swings by 10-15% between rounds; each process also has its own layout
(hash seed, addresses), which moves its figure by about 1.5% for its whole life. Here every
variant runs as ``--instances`` processes, all pinned to CPU 0 and loaded at the same time
(one ``wrk -t1`` each, with the nginx upstream, pinned to CPU 1), so the moment is the same for
all; the instances take turns in the start order, and each round's ratio is to the first
variant's instances in that round. Two builds of the same tree come out within about 1%.

The core is shared, so no process is saturated alone and the figures are higher than
``run.py``'s at saturation; read the ratios. Every variant runs the shipped defaults unless
given a config (``NAME=TREE[:PYTHON][@CONFIG]``, as in ``ab.py``).

    python bench/paired.py now=. before=/work/wt/old@old-bench.yaml nodiag=.@nodiag.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import ab  # noqa: E402
import run  # noqa: E402
from workloads import WORKLOADS, cpu_delta, cpu_seconds  # noqa: E402


def _pin(pid: int, cpu: str) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], capture_output=True, check=True)


def _load(
    env: run.Environment, targets: list[run.Target], script: Path, seconds: int, connections: int
) -> dict[str, float]:
    """Load every target at once; CPU microseconds per request of each."""
    assert env.wrk is not None
    pids = {t.name: t.pid for t in targets if t.pid is not None}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wrk = ["taskset", "-c", "1", env.wrk, "-t1", f"-c{connections}", f"-d{seconds}s"]
    wrks = {
        t.name: subprocess.Popen(
            [*wrk, "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{t.port}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for t in targets
    }
    outs = {name: p.communicate(timeout=seconds + 60)[0] for name, p in wrks.items()}
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    per: dict[str, float] = {}
    for name, out in outs.items():
        m = re.search(r"^WRKJSON (.*)$", out, re.M)
        if m is None:
            raise RuntimeError(f"wrk against {name} printed no summary:\n{out}")
        summary = json.loads(m.group(1))
        if summary["status"] or summary["connect"] or summary["timeout"]:
            raise RuntimeError(f"{name}: errors under load: {summary}")
        per[name] = cpu_delta(before[name], after[name]) / summary["requests"] * 1e6
    return per


def main() -> None:
    """Parse arguments, run the rounds, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=TREE[:PYTHON][@CONFIG]; the first is 1.00x")
    p.add_argument("--instances", type=int, default=3, help="processes per variant")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--connections", type=int, default=12, help="per process")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="POST")
    args = p.parse_args()
    env = run.Environment(shutil.which("wrk"), shutil.which("nginx"), None)
    if not (env.wrk and env.nginx and shutil.which("taskset")):
        sys.exit("needs wrk, nginx and taskset (see README.md)")
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-paired-"))
    procs = run.Processes(workdir)
    try:
        up_port, up = ab.start_nginx(env, procs, workdir)
        group = subprocess.run(["pgrep", "-g", str(up.pid)], capture_output=True, text=True)
        for pid in group.stdout.split():
            _pin(int(pid), "1")  # nginx's master and worker
        variants = [ab.parse_variant(spec) for spec in args.variants]
        targets: list[run.Target] = []
        owner: dict[str, str] = {}
        for i in range(args.instances):  # instance i of every variant, the order turned by i
            turn = i % len(variants)
            for name, root, python, config in variants[turn:] + variants[:turn]:
                t = ab._start(
                    procs, f"{name}.{i + 1}", root, python, f"http://127.0.0.1:{up_port}", workdir,
                    config,
                )  # fmt: skip
                assert t.pid is not None
                _pin(t.pid, "0")
                targets.append(t)
                owner[t.name] = name
        script = workdir / f"{args.workload}.lua"
        script.write_text(WORKLOADS[args.workload].wrk_script())
        _load(env, targets, script, 2, args.connections)  # warm-up
        ratios: dict[str, list[float]] = {name: [] for name, *_ in variants}
        cpu: dict[str, list[float]] = {name: [] for name, *_ in variants}
        first = variants[0][0]
        for r in range(args.rounds):
            per = _load(env, targets, script, args.seconds, args.connections)
            base = statistics.mean(v for n, v in per.items() if owner[n] == first)
            for n, v in per.items():
                ratios[owner[n]].append(v / base)
                cpu[owner[n]].append(v)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        print(f"| {args.workload} | CPU us/req (median) | x {first} (median, quartiles) |")
        print("|---|---:|---:|")
        for name, *_ in variants:
            got = ratios[name]
            q = statistics.quantiles(got, n=4) if len(got) > 1 else [got[0]] * 3
            print(
                f"| {name} | {statistics.median(cpu[name]):.1f} | "
                f"{statistics.median(ratios[name]):.3f}x ({q[0]:.3f}-{q[2]:.3f}) |"
            )
        print(
            f"\n{args.instances} processes per variant on one core, {args.rounds} rounds of "
            f"{args.seconds} s, {args.connections} connections each."
        )
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
