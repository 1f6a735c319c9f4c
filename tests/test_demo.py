"""`stripe-sidecar demo`: one workload direct and through the sidecar, checked against books."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import proxy.demo
from proxy.demo import (
    CIRCUIT_OPEN,
    OPERATION,
    Answer,
    LimitAnswer,
    OutagePlan,
    OutageReport,
    OutageTimeline,
    Progress,
    RateLimitPlan,
    RateLimitReport,
    SidecarView,
    classify_answer,
    compare,
    error_code,
    outage_drill,
    percentile,
    rate_limit_push,
    render_outage,
    render_rate_limit,
    run_demo,
    sidecar_view,
    summarize_limit,
    summarize_outage,
)
from proxy.demo_keys import KeyPhasePlan, KeyPhaseReport, key_failover_phase, render_key_phase

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


def outage_table(stdout: str) -> dict[str, tuple[str, str]]:
    """The outage table's rows with a target as ``label -> (measured, mark)``; labels repeat,
    so each is prefixed with its heading (``during the outage (7 s): Stripe / client``)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["measured", "target"])
    rows: dict[str, tuple[str, str]] = {}
    heading = ""
    for line in lines[start + 1:]:
        if not line.strip():
            break
        if not line.startswith("  "):
            heading = line.strip()
            continue
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 4:  # label, measured, target, mark
            rows[f"{heading}: {cells[0]}"] = (cells[1], cells[3])
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


def timeline(**changes: Any) -> OutageTimeline:
    """An outage from 1 s to 8 s into the phase, the breaker open at 1.1 s, closed at 11 s."""
    base = OutageTimeline(outage_start=1.0, outage_end=8.0, upstream_at_start=120,
                          upstream_at_end=130, opened_at=1.1, upstream_at_open=125, closed_at=11.0,
                          seconds=11.5)
    return dataclasses.replace(base, **changes)


def outage_answers() -> list[Answer]:
    """A healthy answer, one failure before the breaker opened, 99 fail-fast, then a recovery."""
    return [
        Answer(OPERATION, 0.5, 0.51, 200, ""),
        Answer("GET /v1/balance", 1.02, 1.09, 503, ""),
        *(Answer(OPERATION, 1.1 + i * 0.05, 1.101 + i * 0.05, 503, CIRCUIT_OPEN)
          for i in range(99)),
        Answer("GET /v1/balance", 9.0, 9.004, 503, CIRCUIT_OPEN),  # after the outage: still open
        Answer("GET /v1/balance", 10.9, 11.0, 200, ""),
    ]


def test_outage_summary_counts_each_window_against_stripes_books() -> None:
    """Requests are counted by when they were sent; Stripe's share uses its books' deltas."""
    r = summarize_outage(OutagePlan(), outage_answers(), timeline(), SidecarView())
    assert (r.requests, r.client_during, r.upstream_during) == (103, 100, 10)
    assert (r.client_after_open, r.upstream_after_open) == (99, 5)
    assert r.outage_share == 0.1 and r.open_share == 5 / 99
    assert r.fail_fast_answers == 100
    assert r.fail_fast_p99_ms == pytest.approx(1.0) and r.fail_fast_p50_ms == pytest.approx(1.0)
    assert r.opened_after == pytest.approx(0.1)
    assert r.first_success_after == pytest.approx(3.0) and r.closed_after == pytest.approx(3.0)


def test_outage_table_marks_each_target_ok_or_missed() -> None:
    """A share over its target, or a breaker that never opened or closed, is marked MISSED."""
    report = summarize_outage(OutagePlan(), outage_answers(), timeline(), SidecarView())
    rows = outage_table(render_outage(report))
    assert rows["during the outage (7 s): Stripe / client"] == ("10.0%", "ok")
    assert rows["from the breaker opening to the outage's end: Stripe / client"] == ("5.1%",
                                                                                     "MISSED")
    assert rows["fail-fast answers (sidecar_circuit_open): p50 / p99 latency (ms)"] == (
        "1.0 / 1.0", "ok")
    assert rows["after the outage's end (s): every breaker closed"] == ("3.00", "ok")

    never = [a for a in outage_answers() if not a.fail_fast and not a.ok]
    report = summarize_outage(OutagePlan(), never, timeline(opened_at=None, upstream_at_open=0,
                                                            closed_at=None), SidecarView())
    rows = outage_table(render_outage(report))
    assert rows["from the breaker opening to the outage's end: Stripe / client"] == ("n/a",
                                                                                     "MISSED")
    # No fail-fast answer at all is no evidence of fast ones.
    assert rows["fail-fast answers (sidecar_circuit_open): p50 / p99 latency (ms)"][1] == "MISSED"
    assert rows["after the outage's end (s): first successful answer"] == ("never", "MISSED")
    assert rows["after the outage's end (s): every breaker closed"] == ("never", "MISSED")


def test_sidecar_view_reads_transitions_and_fail_fast_over_every_operation() -> None:
    """Breaker transitions by scope and state, fail-fast answers by reason; zeros left out."""
    transitions = "stripe_sidecar_breaker_transitions_total"
    view = sidecar_view([
        (transitions, {"scope": "upstream", "state": "open"}, 2.0),
        (transitions, {"scope": "upstream", "state": "closed"}, 1.0),
        (transitions, {"scope": "GET /v1/balance", "state": "half_open"}, 0.0),
        ("stripe_sidecar_fail_fast_total", {"operation": OPERATION, "reason": "circuit_open"}, 7.0),
        ("stripe_sidecar_fail_fast_total", {"operation": "GET /v1/balance",
                                            "reason": "circuit_open"}, 5.0),
        ("stripe_sidecar_fail_fast_total", {"operation": OPERATION, "reason": "bulkhead_full"}, 0.0),
        ("stripe_sidecar_requests_total", {"operation": OPERATION}, 99.0),
    ])
    assert view.transitions == {"upstream": {"open": 2, "closed": 1}}
    assert view.fail_fast == {"circuit_open": 12}


def test_error_code_reads_stripe_shaped_bodies_only() -> None:
    """The code of a Stripe error body; "" for HTML, other JSON, or no code."""
    assert error_code(b'{"error":{"code":"sidecar_circuit_open"}}') == CIRCUIT_OPEN
    assert error_code(b"<html>503</html>") == ""
    assert error_code(b'["error"]') == ""
    assert error_code(b'{"error":{"type":"api_error"}}') == ""


def test_progress_without_a_total_counts_up() -> None:
    """A phase that runs until it is over shows its count alone."""
    out = io.StringIO()
    progress = Progress(out, clock=FakeClock(), tty=False)
    progress.start("outage", None)
    progress.record("failed")
    progress.finish()
    assert out.getvalue().splitlines()[-1].startswith("[outage] 1  ok 0  declined 0  failed 1")


# -- on loopback, against the simulator ---------------------------------------------------------
async def test_demo_prints_the_table_with_consistent_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """run_demo prints every row; each column adds up and the sidecar charges nobody twice."""
    status = await run_demo(requests=120, concurrency=10, profile="bad_day", seed=7, outage=False,
                            rate_limit=False, key_failover=False, outbox=False)
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
    assert "Outage:" not in out and "[outage]" not in err


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


@pytest.mark.wallclock
async def test_outage_phase_sheds_load_fails_fast_and_traffic_flows_again() -> None:
    """Stripe down for 7 s: it sees <= 15% of the app's requests (<= 5% once the breaker opened),
    the sidecar's count of fail-fast answers matches the app's, and traffic flows again."""
    report = await outage_drill(progress=Progress(io.StringIO(), tty=False))
    assert report.client_during >= 500  # the paced traffic really ran through the outage
    assert report.upstream_during > 0  # and Stripe did see some of it: the count is live
    assert report.outage_share <= 0.15, (report.upstream_during, report.client_during)
    assert report.opened_after is not None, "the breaker never opened"
    assert report.open_share <= 0.05, (report.upstream_after_open, report.client_after_open)
    # Once open, every request either failed fast or was one of the few that reached Stripe.
    assert report.fail_fast_answers >= report.client_after_open - report.upstream_after_open
    assert report.view.fail_fast.get("circuit_open") == report.fail_fast_answers
    assert report.first_success_after is not None, "traffic never flowed again"
    assert report.closed_after is not None, "a breaker never closed again"
    opened = {scope: s for scope, s in report.view.transitions.items() if s.get("open", 0)}
    assert opened and all(s.get("closed", 0) >= 1 for s in opened.values()), opened
    rows = outage_table(render_outage(report))
    assert rows["during the outage (7 s): Stripe / client"][1] == "ok"
    assert rows["from the breaker opening to the outage's end: Stripe / client"][1] == "ok"


async def test_run_demo_prints_the_outage_phase_and_exits_zero_on_a_miss(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outage table follows the comparison; a missed target is shown, the status stays 0."""
    missed = summarize_outage(OutagePlan(), outage_answers(), timeline(), SidecarView())

    async def drill(*args: object, **kwargs: object) -> OutageReport:
        return missed

    monkeypatch.setattr(proxy.demo, "outage_drill", drill)
    status = await run_demo(requests=20, concurrency=5, profile="none", seed=7, rate_limit=False,
                            key_failover=False, outbox=False)
    out = capsys.readouterr().out
    assert status == 0
    assert out.index("through sidecar") < out.index("Outage:")
    assert "MISSED" in out and out.endswith("Run time: 11.5 s, 103 requests.\n")


async def test_bad_arguments_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown profile or a zero count gives exit status 2 and names every problem."""
    status = await run_demo(requests=0, concurrency=10, profile="bad_dya", seed=7, outage=False)
    err = capsys.readouterr().err
    assert status == 2
    assert "--requests: 0" in err and "unknown fault profile 'bad_dya'" in err


def test_cli_demo_exits_zero() -> None:
    """`python -m proxy demo --requests 40` with the later phases skipped prints the table and
    exits 0 (each phase has its own test above)."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--requests", "40", "--skip-outage",
         "--skip-rate-limit", "--skip-key-failover", "--skip-outbox"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert rows["payments attempted"] == ("40", "40")
    assert "Traceback" not in done.stderr
    assert "Outage:" not in done.stdout
    assert "Rate limit:" not in done.stdout
    assert "key_failover" not in done.stdout
    assert "Outbox:" not in done.stdout


async def test_key_failover_phase_shows_the_failover_with_no_app_failure() -> None:
    """Primary key revoked mid-run: 0 failed app requests; failover and auth_failure printed live."""
    out = io.StringIO()
    report = await key_failover_phase(KeyPhasePlan(healthy=0.3, after=0.7), out=out)
    assert report.statuses and report.failed == 0
    assert report.switched >= 1 and report.key_in_use == "…c3d4"
    live = out.getvalue()
    assert live.index("is revoked") < live.index("action key_failover [ok]")
    assert "diagnosis raised: auth_failure (critical)" in live
    assert "sk_test_demo" not in live


def test_key_phase_table_marks_a_failure_missed() -> None:
    """The table counts non-2xx answers as failed and marks the zero target missed."""
    report = KeyPhaseReport(KeyPhasePlan(), statuses=[200, 200, 401], switched=1,
                            key_in_use="…c3d4", seconds=3.0)
    text = render_key_phase(report)
    assert re.search(r"failed \(target 0\)\s+1  MISSED", text)
    assert re.search(r"app requests\s+3", text) and "…c3d4" in text


def test_rate_limit_summary_counts_against_the_books() -> None:
    """summarize_limit takes Stripe's counts from the books' difference, the app's from its answers."""
    plan = RateLimitPlan(limit=50.0, offered=150.0, seconds=4.0, settle=2.0)
    answers = [LimitAnswer(0.5, 200, ""), LimitAnswer(2.5, 200, ""),
               LimitAnswer(2.6, 429, "sidecar_rate_limited"), LimitAnswer(3.0, 429, "rate_limit")]
    run = summarize_limit("through sidecar", plan, answers,
                          {"requests": 100, "rate_limited": {"global-rate": 10}},
                          {"requests": 200, "rate_limited": {"global-rate": 15}}, 4.1)
    assert (run.requests, run.succeeded, run.succeeded_after) == (4, 2, 1)
    assert (run.refused_by_sidecar, run.limited_by_stripe) == (1, 1)
    assert (run.stripe_requests_after, run.stripe_limited_after) == (100, 5)
    assert run.limited_share_after == 0.05
    report = RateLimitReport(plan, run, run)
    assert report.throughput(run) == 0.5
    text = render_rate_limit(report)
    assert "5 (5.0%)" in text and "0.5 (1.0%)" in text


@pytest.mark.wallclock
async def test_rate_limit_phase_learns_the_limit_through_the_sidecar() -> None:
    """The phase itself, shortened: directly ~2/3 rate limited; through the sidecar at most 10%,
    >= 80% of the limit used (tests/test_ratelimit_live.py measures the longer run)."""
    plan = RateLimitPlan(seconds=3.5, settle=2.0)
    report = await rate_limit_push(plan, progress=Progress(io.StringIO()))
    assert report.direct.limited_share_after > 0.5
    assert report.sidecar.limited_share_after <= 0.10, report.sidecar
    assert report.throughput(report.sidecar) >= 0.8 * report.plan.limit, report.sidecar
    assert report.sidecar.refused_by_sidecar > 0
    assert report.direct.refused_by_sidecar == 0


async def test_outbox_phase_queues_every_payment_and_performs_each_once() -> None:
    """Payments sent during the outage are all answered 202 and, afterwards, each performed once."""
    from proxy.demo_outbox import OutboxPhasePlan, outbox_phase, render_outbox_phase

    report = await outbox_phase(OutboxPhasePlan(payments=30, outage=1.5, settle=20.0))
    assert report.queued == 30 and report.statuses == {202: 30}
    assert report.performed == 30 and report.duplicates == 0 and report.lost == 0
    assert report.counts["delivered"] == 30
    text = render_outbox_phase(report)
    assert "MISSED" not in text and "answered 202 (queued)" in text


def test_outbox_phase_table_marks_a_duplicate_missed() -> None:
    """A payment performed twice or one never performed is marked MISSED."""
    from proxy.demo_outbox import OutboxPhasePlan, OutboxPhaseReport, render_outbox_phase

    report = OutboxPhaseReport(OutboxPhasePlan(payments=3), statuses={202: 3}, performed=3,
                               duplicates=1, counts={"delivered": 3})
    text = render_outbox_phase(report)
    assert "performed twice (target 0)" in text and text.count("MISSED") == 1
    report.lost, report.duplicates = 1, 0
    assert render_outbox_phase(report).count("MISSED") == 1
