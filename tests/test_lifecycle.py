"""The sidecar's life as a process (`stripe-sidecar serve`): SIGTERM drain and grace, exit
status, and the file-descriptor limit. Real subprocesses, the simulator, loopback only."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ports import accepts, free_port
from rawclient import Answer, exchange

from proxy.simulator import start_simulator
from proxy.simulator.faults import FaultProfile

BALANCE = b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_x\r\n\r\n"
READY = b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def _create_customer(key: bytes | None) -> bytes:
    body = b"email=a%40example.com"
    key_line = b"Idempotency-Key: " + key + b"\r\n" if key is not None else b""
    return (
        b"POST /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk_test_x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n%bContent-Length: %d\r\n\r\n%b"
        % (key_line, len(body), body)
    )


class Sidecar:
    """A `python -m proxy serve` subprocess with a config file; its log goes to a file."""

    def __init__(self, tmp: Path, upstream: str, server: dict[str, Any], preexec: Callable[[], None] | None = None) -> None:
        self.port = free_port()
        config = {
            "server": {"listen": f"127.0.0.1:{self.port}", **server},
            "upstream": {"override": upstream},
            # Not under test here, and a static cap would turn a burst of 1,000 away.
        }
        path = tmp / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "sidecar.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )

    async def started(self) -> None:
        """Poll until the port accepts (the process must not exit meanwhile)."""
        deadline = time.monotonic() + 15
        while not await asyncio.to_thread(accepts, self.port):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "the sidecar never listened"
            await asyncio.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text()

    def events(self, name: str) -> list[dict[str, Any]]:
        """Parsed log lines of one event."""
        out = []
        for line in self.log().splitlines():
            if f'"event":"{name}"' in line:
                out.append(json.loads(line))
        return out

    async def exit_code(self, timeout: float = 20) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def _poll(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _in_flight(port: int) -> float:
    answers, _ = await exchange(port, METRICS)
    for line in answers[0].body.decode().splitlines():
        if line.startswith("stripe_sidecar_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


# -- shutdown ---------------------------------------------------------------------------------------


async def test_sigterm_drains_then_answers_held_requests_503_with_their_keys(tmp_path):
    """SIGTERM: /ready 503 at once, new requests served during the drain, listener closed after it, requests held at the grace end get 503 sidecar_shutting_down with their Idempotency-Key, exit status 3."""
    async with start_simulator(profile=FaultProfile(work_seconds=60.0)) as sim:  # writes hang
        sc = Sidecar(tmp_path, sim.url, {"drain_period": 2.0, "shutdown_grace": 3.0})
        try:
            await sc.started()
            own = asyncio.create_task(exchange(sc.port, _create_customer(b"app-key-1"), timeout=30, check_closed=True))
            injected = asyncio.create_task(exchange(sc.port, _create_customer(None), timeout=30, check_closed=True))
            await _poll(lambda: _eq(_in_flight(sc.port), 2), "both POSTs in flight")
            sc.proc.send_signal(signal.SIGTERM)
            await _poll(lambda: _ready_is(sc.port, 503), "/ready 503", timeout=2.0)
            ready, _ = await exchange(sc.port, READY)
            during, _ = await exchange(sc.port, BALANCE)  # a new connection, during the drain
            assert ready[0].json() == {"ready": False, "breakers": {}}
            assert during[0].status == 200, during[0].body
            await _poll(lambda: _not(asyncio.to_thread(accepts, sc.port)), "the listener to close")
            (own_answer,), own_closed = await own
            (inj_answer,), inj_closed = await injected
            code = await sc.exit_code()
        finally:
            sc.kill()
    for answer, closed in ((own_answer, own_closed), (inj_answer, inj_closed)):
        assert answer.status == 503, answer.body
        assert answer.json()["error"]["code"] == "sidecar_shutting_down"
        assert answer.header("Connection") == b"close" and closed
    assert own_answer.header("Idempotency-Key") == b"app-key-1"
    assert own_answer.header("Stripe-Should-Retry") is None  # the SDK's retry carries the same key
    assert inj_answer.header("Idempotency-Key").startswith(b"sidecar-")
    assert inj_answer.header("Stripe-Should-Retry") == b"false"  # a retry would lack this key
    assert code == 3
    (stopped,) = sc.events("stopped")
    assert stopped["clean"] is False and stopped["unfinished"] == 2
    assert stopped["level"] == "warning"
    logged = [e for e in sc.events("request") if e["outcome"] == "shutting_down"]
    assert len(logged) == 2 and all(e["status"] == 503 for e in logged)


async def test_clean_shutdown_exits_0_and_a_second_signal_ends_the_drain(tmp_path):
    """A request in flight at SIGTERM finishes with Connection: close; a kept-alive connection serves during the drain; a second SIGTERM ends a long drain; exit status 0."""
    async with start_simulator(profile=FaultProfile(work_seconds=1.0)) as sim:
        sc = Sidecar(tmp_path, sim.url, {"drain_period": 60.0, "shutdown_grace": 70.0})
        try:
            await sc.started()
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            writer.write(BALANCE)
            first = await _read_answer(reader)
            pending = asyncio.create_task(exchange(sc.port, _create_customer(b"app-key-2"), timeout=30))
            await _poll(lambda: _eq(_in_flight(sc.port), 1), "the POST in flight")
            sc.proc.send_signal(signal.SIGTERM)
            await _poll(lambda: _ready_is(sc.port, 503), "/ready 503")
            writer.write(BALANCE)  # the kept-alive connection, during the drain
            second = await _read_answer(reader)
            sc.proc.send_signal(signal.SIGTERM)  # the second one: no more draining
            await _poll(lambda: _not(asyncio.to_thread(accepts, sc.port)), "the listener to close")
            assert await reader.read() == b""  # the idle connection is closed after the drain
            writer.close()
            (posted,), _ = await pending
            code = await sc.exit_code()
        finally:
            sc.kill()
    assert first.status == 200 and second.status == 200
    assert second.header("Connection") is None  # kept alive: the drain was still on
    assert posted.status == 200 and posted.header("Connection") == b"close"
    assert code == 0
    (stopped,) = sc.events("stopped")
    assert stopped["clean"] is True and stopped["unfinished"] == 0


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected


async def _not(value: Any) -> bool:
    return not await value


async def _ready_is(port: int, status: int) -> bool:
    answers, _ = await exchange(port, READY)
    return answers[0].status == status


async def _read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> Answer:
    """Read one answer with a Content-Length body."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        answer = Answer(status=int(lines[0].split()[1]))
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                answer.headers.append((name.encode(), value.strip().encode()))
        length = int(answer.header("Content-Length") or b"0")
        answer.body = await reader.readexactly(length)
    return answer


# -- the file-descriptor limit ------------------------------------------------------------------


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def _one_client(port: int) -> tuple[str, Answer | None, Any]:
    """Open a connection, send one request; ("answered", answer, writer) or ("dropped", ...)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "dropped", None, None
    try:
        writer.write(BALANCE)
        answer = await _read_answer(reader, timeout=20)
    except (OSError, asyncio.IncompleteReadError):
        writer.close()
        return "dropped", None, None
    return "answered", answer, (reader, writer)


async def test_a_thousand_connections_under_ulimit_256_never_open_the_breaker(tmp_path):
    """With RLIMIT_NOFILE 256 and 1,000 client connections: each gets 200, 503 sidecar_overloaded (Connection: close, Retry-After) or a closed connection, never a hang; the breaker stays closed, admitted connections keep being served, and all is normal once they close."""
    async with start_simulator() as sim:
        sc = Sidecar(tmp_path, sim.url, {"drain_period": 0, "shutdown_grace": 5.0}, preexec=_low_fd_limit)
        held: list[Any] = []
        try:
            await sc.started()
            (limit,) = sc.events("fd_limit")
            (started,) = sc.events("started")
            results = await asyncio.gather(*(_one_client(sc.port) for _ in range(1000)))
            ok = [r for r in results if r[1] is not None and r[1].status == 200]
            refused = [r[1] for r in results if r[1] is not None and r[1].status != 200]
            dropped = [r for r in results if r[0] == "dropped"]
            held = [r[2] for r in ok]
            for r in results:
                if r[1] is not None and r[1].status != 200:
                    r[2][1].close()
            # Admitted connections go on being served while the others are turned away.
            again = []
            for reader, writer in held:
                writer.write(BALANCE)
                again.append(await _read_answer(reader))
            ready, _ = await exchange(sc.port, READY)
            metrics, _ = await exchange(sc.port, METRICS)
            for _, writer in held:
                writer.close()
            # Once they are closed, a new connection is admitted and served again.
            await _poll(lambda: _status_is(sc.port, 200), "a new connection to be served again")
            sc.proc.send_signal(signal.SIGTERM)
            code = await sc.exit_code()
        finally:
            for pair in held:
                pair[1].close()
            sc.kill()
    assert limit["soft"] == 256 and limit["hard"] == 256
    assert 0 < started["max_connections"] < 128
    assert len(ok) + len(refused) + len(dropped) == 1000
    assert 0 < len(ok) <= started["max_connections"]
    assert refused, "no connection was turned away"
    for answer in refused:
        assert answer.status == 503, answer.body
        assert answer.json()["error"]["code"] == "sidecar_overloaded"
        assert answer.header("Connection") == b"close" and answer.header("Retry-After") == b"1"
    assert all(a.status == 200 for a in again)
    assert ready[0].status == 200 and ready[0].json() == {"ready": True, "breakers": {}}
    text = metrics[0].body.decode()
    assert 'stripe_sidecar_breaker_state{scope="upstream"} 0.0' in text
    assert "stripe_sidecar_breaker_state" in text and " 2.0" not in _breaker_lines(text)
    assert code == 0


def _breaker_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("stripe_sidecar_breaker_state{"))


async def _status_is(port: int, status: int) -> bool:
    answers, _ = await exchange(port, BALANCE)
    return bool(answers) and answers[0].status == status


async def test_an_answer_still_streaming_at_the_grace_end_is_cut_and_counted(raw_upstream, make_sidecar):
    """A streamed answer whose upstream stalls is cut at the grace end (never left hanging), and stop() reports it unfinished."""
    never = asyncio.Event()

    async def stalls(transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: 100000\r\n\r\n" + b"a" * 40_000)
        await never.wait()

    up = await raw_upstream(lambda r: stalls)
    sc = await make_sidecar(up.url, upstream={"buffer_limit": 16384}, server={"shutdown_grace": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
    writer.write(b"GET /v1/files/file_1/contents HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        got = await reader.readuntil(b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200")
        clean = await sc.stop()
        try:
            while rest := await reader.read(65536):  # the connection ends: EOF or reset, never a hang
                got += rest
        except ConnectionResetError:
            pass
    writer.close()
    assert clean is False
    assert sc.report is not None and sc.report.unfinished + sc.report.connections_cut == 1
    assert len(got) < 100_000 and b"sidecar_shutting_down" not in got  # no 503 inside a body
