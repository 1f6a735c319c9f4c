"""`stripe-sidecar demo`: one workload direct and through the sidecar, checked against books."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.demo import Progress, classify_answer, compare, percentile, run_demo

ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "payments attempted",
    "succeeded",
    "declined (402, expected)",
    "failed",
    "success % (excl. declines)",
    "duplicate charges",
    "lost writes",
    "upstream attempts / payment",
    "p50 / p99 latency (ms)",
)


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """The comparison table's rows as ``label -> (direct, through sidecar)``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["direct", "through",
                                                                        "sidecar"])
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break  # the table ends at the first blank line
        label = next(label for label in ROWS if line.startswith(label + " "))
        cells = re.split(r"\s{2,}", line[len(label):].strip())
        assert len(cells) == 2, line
        rows[label] = (cells[0], cells[1])
    return rows


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- pure parts -----------------------------------------------------------------------------------
def test_classify_answer_separates_declines_from_failures() -> None:
    """A 402 is a decline, a succeeded PaymentIntent a success, anything else a failure."""
    assert classify_answer(200, b'{"status":"succeeded"}') == ("succeeded", "")
    assert classify_answer(402, b'{"error":{"code":"card_declined"}}')[0] == "declined"
    assert classify_answer(502, b"<html>Bad Gateway</html>") == ("failed", "HTTP 502")
    assert classify_answer(429, b'{"error":{"code":"lock_timeout"}}') == (
        "failed",
        "HTTP 429 lock_timeout",
    )
    assert classify_answer(200, b'{"status":"requires_action"}')[0] == "failed"


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 pick the nearest-rank value; an empty run gives 0."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_progress_redraws_one_line_on_a_tty_at_most_ten_times_a_second() -> None:
    """On a terminal the line is redrawn with \\r, throttled by the clock, and ended once."""
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, clock=clock, tty=True)
    progress.start("direct", 3)
    progress.record("succeeded")  # too soon after the first drawing: not drawn
    clock.now += 0.2
    progress.record("failed")
    progress.record("declined")
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[direct] 2/3  ok 1  declined 0  failed 1" in text
    assert "[direct] 3/3  ok 1  declined 1  failed 1" in text


def test_progress_writes_plain_lines_when_not_a_tty() -> None:
    """Off a terminal each drawing is its own line, at most one a second plus the last."""
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, clock=clock, tty=False)
    progress.start("through sidecar", 2)
    clock.now += 0.5
    progress.record("succeeded")
    clock.now += 1.0
    progress.record("succeeded")
    progress.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split("  ")[0] for line in lines] == ["[through sidecar] 0/2"] + [
        "[through sidecar] 2/2"
    ] * 2


# -- on loopback, against the simulator ---------------------------------------------------------
async def test_demo_prints_the_table_with_consistent_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """run_demo prints every row; each column adds up and the sidecar charges nobody twice."""
    status = await run_demo(requests=120, concurrency=10, profile="bad_day", seed=7)
    out, err = capsys.readouterr()
    assert status == 0
    rows = table(out)
    assert set(rows) == set(ROWS)
    for column in (0, 1):
        attempted = int(rows["payments attempted"][column])
        parts = [int(rows[name][column]) for name in ("succeeded", "declined (402, expected)",
                                                      "failed")]
        assert attempted == 120
        assert sum(parts) == attempted
        assert int(rows["declined (402, expected)"][column]) > 0
    assert rows["duplicate charges"] == ("0", "0")
    assert rows["upstream attempts / payment"][0] == "1.00"  # the app itself never retries
    assert int(rows["failed"][0]) > 0  # bad_day with this seed does hurt the direct run
    assert re.fullmatch(r"\d+ / \d+", rows["p50 / p99 latency (ms)"][1])
    assert "created 0 duplicate charges" in " ".join(out.split())
    assert "[direct] 120/120" in err and "[through sidecar] 120/120" in err


async def test_numbers_match_the_simulators_books() -> None:
    """Every direct failure is an injected fault; executed refs match what the app saw."""
    c = await compare(requests=120, concurrency=10, profile="bad_day", seed=7,
                      progress=Progress(io.StringIO(), tty=False))
    direct, sidecar = c.direct, c.sidecar
    faults = direct.books["faults"]
    # The app sends each payment once, so the direct run saw exactly the injected faults, and
    # lost exactly the writes whose connection dropped after Stripe ran them.
    assert direct.upstream_attempts == direct.attempted == 120
    assert direct.failed == sum(faults.values()) > 0
    assert direct.lost_writes == faults.get("drop_after", 0) > 0
    for run in (direct, sidecar):
        assert run.executed_refs == run.succeeded + run.declined + run.lost_writes
        assert run.succeeded + run.declined + run.failed == run.attempted
    assert sidecar.duplicates == sidecar.lost_writes == 0
    assert sidecar.upstream_attempts > sidecar.attempted  # it did retry
    assert sidecar.failed < direct.failed
    assert c.counts.retries.get("card_declined", 0) == 0


async def test_outage_fails_fast_through_the_sidecar() -> None:
    """With Stripe down the breaker opens, so most payments never reach the simulator."""
    c = await compare(requests=120, concurrency=10, profile="outage", seed=7,
                      progress=Progress(io.StringIO(), tty=False))
    assert c.direct.failed == c.sidecar.failed == 120
    assert c.counts.fail_fast.get("circuit_open", 0) > 0
    assert c.sidecar.upstream_attempts < c.sidecar.attempted / 2


async def test_bad_arguments_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown profile or a zero count gives exit status 2 and names every problem."""
    status = await run_demo(requests=0, concurrency=10, profile="bad_dya", seed=7)
    err = capsys.readouterr().err
    assert status == 2
    assert "--requests: 0" in err and "unknown fault profile 'bad_dya'" in err


def test_cli_demo_exits_zero() -> None:
    """`python -m proxy demo --requests 40`, as a new user types it, prints the table."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--requests", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert rows["payments attempted"] == ("40", "40")
    assert "Traceback" not in done.stderr
