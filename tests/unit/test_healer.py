"""Healing actions (proxy.healing) on a fake clock: what each diagnosis does, when, and its undoing."""

from __future__ import annotations

from typing import Any

from fakeclock import FakeClock

from proxy.bulkhead import Compartment
from proxy.diagnosis import Diagnosis, DiagnosisEngine, DiagnosisEvent
from proxy.healing import Healer, HealingSettings
from proxy.rules import DiagnosisSettings

OP = "POST /v1/payment_intents"


class FakePool:
    """A pool with some idle connections; close() drops them."""

    def __init__(self, idle: int) -> None:
        self.idle_count = idle
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        self.idle_count = 0


def setup(**settings: Any) -> tuple[Healer, DiagnosisEngine, FakeClock, dict[str, Compartment], list[FakePool]]:
    clock = FakeClock()
    engine = DiagnosisEngine(DiagnosisSettings(), clock=clock, wall=lambda: 1.7e9)
    comps = {OP: Compartment(256), "GET /v1/balance": Compartment(256)}
    pools = [FakePool(3), FakePool(2)]
    healer = Healer(engine, HealingSettings(**settings), pools=lambda: pools,
                    compartments=lambda: comps, clock=clock)
    return healer, engine, clock, comps, pools


def event(kind: str, type_: str = "raised", **evidence: Any) -> DiagnosisEvent:
    return DiagnosisEvent(type_, Diagnosis(kind, "warning", "s", evidence, "a", 1.7e9))  # type: ignore[arg-type]


def test_network_failure_resets_every_pool_and_clear_records_the_undo() -> None:
    """Raise: every pool closed, one ok action with the idle count; clear: one undone action."""
    healer, engine, _, _, pools = setup()
    healer.on_event(event("network_failure", failing_step="dns"))
    assert [p.closed for p in pools] == [1, 1]
    [action] = engine.actions
    assert (action.kind, action.result, action.before) == ("pool_reset", "ok", "5 idle connection(s)")
    assert "dns step" in action.reason
    healer.on_event(event("network_failure", "cleared"))
    assert [(a.kind, a.result) for a in engine.actions][-1] == ("pool_reset", "undone")


def test_an_action_runs_at_most_once_per_min_interval() -> None:
    """A second raise within min_interval is recorded as skipped and closes nothing."""
    healer, engine, clock, _, pools = setup(min_interval=30.0)
    healer.on_event(event("network_failure"))
    clock.advance(10)
    healer.on_event(event("network_failure"))
    assert [p.closed for p in pools] == [1, 1]
    assert [a.result for a in engine.actions] == ["ok", "skipped"]
    clock.advance(25)
    healer.on_event(event("network_failure"))
    assert [p.closed for p in pools] == [2, 2]


def test_rate_limited_tightens_to_half_the_peak_and_restores_by_doubling() -> None:
    """Peak 20 in flight: bound 10; after the clear it doubles per restore_interval back to 256."""
    healer, engine, clock, comps, _ = setup(restore_interval=5.0)
    comps[OP].peak = 20
    healer.on_event(event("rate_limited", operations=[OP, "GET /v1/unknown"]))
    assert comps[OP].limit == 10 and comps["GET /v1/balance"].limit == 256
    healer.tick()
    healer.on_event(event("rate_limited", "cleared"))
    limits = []
    for _ in range(12):
        clock.advance(5.0)
        healer.tick()
        limits.append(comps[OP].limit)
    assert limits[:6] == [20, 40, 80, 160, 256, 256]
    restores = [(a.after, a.result) for a in engine.actions if a.kind == "concurrency_restored"]
    assert restores[-1] == (f"{OP}: 256 in flight", "undone")
    assert [r for _, r in restores] == ["ok", "ok", "ok", "ok", "undone"]
    assert not healer.tightened


def test_tightening_never_goes_below_min_in_flight_nor_loosens() -> None:
    """A quiet operation is bounded at min_in_flight; an already lower bound is left alone."""
    healer, engine, _, comps, _ = setup(min_in_flight=4)
    comps["GET /v1/balance"].limit = 3
    healer.on_event(event("rate_limited", operations=[OP, "GET /v1/balance"]))
    assert comps[OP].limit == 4 and comps["GET /v1/balance"].limit == 3
    assert [a.kind for a in engine.actions] == ["concurrency_tightened"]


def test_a_new_raise_stops_a_restore_under_way() -> None:
    """rate_limited raised again mid-restore: the bound stops growing."""
    healer, _, clock, comps, _ = setup(restore_interval=1.0, min_interval=0.5)
    comps[OP].peak = 40
    healer.on_event(event("rate_limited", operations=[OP]))
    healer.on_event(event("rate_limited", "cleared"))
    clock.advance(1.0)
    healer.tick()
    assert comps[OP].limit == 40
    healer.on_event(event("rate_limited", operations=[]))
    clock.advance(1.0)
    healer.tick()
    assert comps[OP].limit == 40 and OP in healer.tightened
