"""The access-log line: valid JSON, exact fields, written whole, nothing lost at flush.

The lines come from the built-in observer, as the sidecar writes them.
"""

from __future__ import annotations

import io
import json

import pytest
from prometheus_client import CollectorRegistry

from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.observers import BuiltinObserver
from proxy.records import RequestRecord


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _record(**changes: object) -> RequestRecord:
    fields: dict[str, object] = {
        "operation": "POST /v1/payment_intents",
        "method": "POST",
        "status": 200,
        "outcome": "success",
        "attempts": 1,
        "duration": 0.0123456,
        "request_id": "req_AbC123xyz",
        "error_code": None,
        "key_injected": True,
        "give_up": "answered",
        "limiter_wait": 0.0,
    }
    fields.update(changes)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def _observer(log: Logger) -> BuiltinObserver:
    """The sidecar's observer, writing to ``log`` (and counting into a registry of its own)."""
    return BuiltinObserver(Metrics(CollectorRegistry()), log)


def _lines(*records: RequestRecord, clock: _Clock | None = None) -> list[str]:
    out = io.StringIO()
    log = Logger(out, clock=clock or _Clock(1_764_504_000.5))
    observer = _observer(log)
    for record in records:
        observer.request(record)
    log.flush()
    return out.getvalue().splitlines()


def test_a_request_line_has_every_field_in_order():
    """One JSON object per answer, the fields and their order exactly as documented."""
    (line,) = _lines(_record())
    assert line == (
        '{"ts":"2025-11-30T12:00:00.500Z","level":"info","event":"request",'
        '"operation":"POST /v1/payment_intents","status":200,"outcome":"success","attempts":1,'
        '"duration_ms":12.35,"request_id":"req_AbC123xyz","key_injected":true}'
    )


@pytest.mark.parametrize(
    "request_id",
    [None, "req_1", "req-with.dots:and-dashes", 'req"quote', "req\\back", "réq_unicode", "req\nline", "", "9req"],
)
def test_any_request_id_gives_valid_json_with_that_id(request_id):
    """Stripe's ids go in as they are; anything else is escaped, so the line always parses."""
    (line,) = _lines(_record(request_id=request_id, key_injected=False))
    parsed = json.loads(line)
    assert parsed["request_id"] == request_id
    assert parsed["key_injected"] is False


@pytest.mark.parametrize(
    "seconds",
    [0.0, 0.000001, 0.000004999, 0.0000051, 0.00123456, 0.0099999, 0.01, 0.1234, 1.0, 2.345678, 29.99999, 123.456789],
)
def test_duration_is_milliseconds_with_two_decimals(seconds):
    """duration_ms prints as f"{ms:.2f}" would (the hot path uses integer maths)."""
    (line,) = _lines(_record(duration=seconds))
    text = line.split('"duration_ms":', 1)[1].split(",", 1)[0]
    assert text == f"{seconds * 1000:.2f}"


def test_the_timestamp_follows_the_clock_across_milliseconds_and_seconds():
    """Lines within one millisecond share its text; the next millisecond and second show."""
    clock = _Clock(1_764_504_000.9985)
    out = io.StringIO()
    log = Logger(out, clock=clock)
    observer = _observer(log)
    for now in (1_764_504_000.9985, 1_764_504_000.9987, 1_764_504_000.9995, 1_764_504_001.0005):
        clock.now = now
        observer.request(_record())
    log.flush()
    stamps = [json.loads(line)["ts"] for line in out.getvalue().splitlines()]
    assert stamps == [
        "2025-11-30T12:00:00.998Z",
        "2025-11-30T12:00:00.998Z",
        "2025-11-30T12:00:00.999Z",
        "2025-11-30T12:00:01.000Z",
    ]


def test_a_full_buffer_writes_whole_lines_and_flush_writes_the_rest():
    """Lines are buffered, written whole when the buffer fills, and none is lost at flush."""
    out = io.StringIO()
    log = Logger(out, clock=_Clock(1_764_504_000.0))
    observer = _observer(log)
    for i in range(700):
        observer.request(_record(attempts=i))
    written = out.getvalue()
    assert written.endswith("\n") and written.count("\n") == 512
    log.flush()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["attempts"] for line in lines] == list(range(700))
