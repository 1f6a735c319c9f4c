"""A/B of sidecar builds against Envoy: CPU per request at saturation, interleaved rounds.

``run.py`` measures one sidecar next to the references; this measures several sidecars (another
checkout, another interpreter) next to Envoy in the same rounds, so that their ratios see the same
moments of a shared machine. Each variant is ``NAME=TREE[:PYTHON][@CONFIG]`` (PYTHON defaults
to the tree's ``.venv/bin/python``); every variant runs ``python -m proxy serve`` with the
shipped defaults, as in ``run.py``, unless given a config file (``--config`` for every variant,
``@CONFIG`` for one: e.g. an older tree whose defaults refused bench traffic). Per round, every
target gets one ``wrk -t1 -c50`` run per workload, in a rotating order; the table gives, per
variant, the median and min-max over rounds of its CPU us/req and of its ratio to Envoy's in the
same round.

    python bench/ab.py --rounds 5 before=/work/wt/old@old-bench.yaml after=.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402


def start_nginx(
    env: run.Environment, procs: run.Processes, workdir: Path
) -> tuple[int, subprocess.Popen[bytes]]:
    """Start nginx as the upstream (``run.nginx_conf``); its port and process once it answers."""
    assert env.nginx is not None
    port = run.free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(run.nginx_conf(workdir, port))
    up = procs.start(
        "upstream",
        [env.nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
    )
    run.wait_ready(port, up, "upstream", procs)
    return port, up


def parse_variant(spec: str) -> tuple[str, Path, str, Path | None]:
    """``NAME=TREE[:PYTHON][@CONFIG]``: the name, the tree, its interpreter, its config or None."""
    name, _, where = spec.partition("=")
    where, _, config = where.partition("@")
    tree, _, python = where.partition(":")
    root = Path(tree).resolve()
    own = Path(config).resolve() if config else None
    return name, root, python or str(root / ".venv/bin/python"), own


def _start(
    procs: run.Processes,
    name: str,
    tree: Path,
    python: str,
    upstream: str,
    workdir: Path,
    config: Path | None = None,
) -> run.Target:
    port = run.free_port()
    listen = ["--listen", f"127.0.0.1:{port}", "--upstream", upstream]
    extra = ["--config", str(config)] if config else []
    proc = procs.start(
        name,
        [python, "-m", "proxy", "serve", *listen, *extra],
        stdout=workdir / f"{name}-access.log",
        cwd=tree,
    )
    run.wait_ready(port, proc, name, procs)
    return run.Target(name, name, port, proc.pid)


def main() -> None:
    """Parse arguments, run the rounds, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=TREE[:PYTHON][@CONFIG]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workloads", default="POST,GET")
    p.add_argument("--config", type=Path, help="one config file for every variant (default: none)")
    args = p.parse_args()
    env = run.Environment(run.shutil.which("wrk"), run.shutil.which("nginx"), run.find_envoy())
    if not (env.wrk and env.nginx and env.envoy):
        sys.exit("needs wrk, nginx and envoy (see README.md)")
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-ab-"))
    procs = run.Processes(workdir)
    try:
        up_port, _ = start_nginx(env, procs, workdir)
        upstream = f"http://127.0.0.1:{up_port}"
        targets = []
        for spec in args.variants:
            name, root, python, own_config = parse_variant(spec)
            config = own_config or (args.config.resolve() if args.config else None)
            targets.append(_start(procs, name, root, python, upstream, workdir, config))
        port = run.free_port()
        econf = workdir / "envoy.yaml"
        econf.write_text(run.envoy_conf(port, up_port))
        eproc = procs.start(
            "envoy",
            [env.envoy, "-c", str(econf), "--concurrency", "1", "--disable-hot-restart"],
        )
        run.wait_ready(port, eproc, "envoy", procs)
        targets.append(run.Target("envoy", "envoy", port, eproc.pid))
        workloads = args.workloads.split(",")
        cpu: dict[tuple[str, str], list[float]] = {}
        for t in targets:  # warm-up: pools filled, operations resolved
            for wl in workloads:
                run.saturate(env, t, wl, 2, 50, workdir)
        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for wl in workloads:
                for t in order:
                    res = run.saturate(env, t, wl, args.seconds, 50, workdir)
                    cpu.setdefault((t.name, wl), []).append(res["cpu_us"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        _table(targets, workloads, cpu, args.rounds)
    finally:
        procs.stop_all()


def _table(
    targets: list[run.Target], workloads: list[str], cpu: dict[tuple[str, str], list[float]], n: int
) -> None:
    print("| workload | target | CPU us/req (median, min-max) | x Envoy (median, min-max) |")
    print("|---|---|---:|---:|")
    for wl in workloads:
        envoy = cpu[("envoy", wl)]
        for t in targets:
            mine = cpu[(t.name, wl)]
            ratios = [a / b for a, b in zip(mine, envoy, strict=True)]
            print(
                f"| {wl} | {t.name} | {statistics.median(mine):.1f} "
                f"({min(mine):.1f}-{max(mine):.1f}) | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
    print(f"\n{n} interleaved rounds; ratios are to Envoy in the same round.")


if __name__ == "__main__":
    main()
