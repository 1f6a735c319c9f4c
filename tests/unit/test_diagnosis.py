"""The diagnosis engine with a fake clock: each rule raises, holds, clears, and never flaps."""

from __future__ import annotations

import dataclasses
import random

from fakeclock import FakeClock

from proxy.diagnosis import DiagnosisEngine, DiagnosisEvent
from proxy.records import AttemptRecord, RequestRecord
from proxy.rules import DiagnosisSettings, LatencyThreshold

CREATE = "POST /v1/customers"
CONFIRM = "POST /v1/payment_intents/{intent}/confirm"
BALANCE = "GET /v1/balance"
OPS = (CREATE, CONFIRM, BALANCE)

SETTINGS = DiagnosisSettings(window=10.0, raise_after=3.0, clear_after=5.0)


def attempt(op: str, outcome: str = "success", status: int = 200, **kw: object) -> AttemptRecord:
    fields: dict[str, object] = dict(
        operation=op, attempt=1, outcome=outcome, status=status, error_code=None,
        rate_limited_reason=None, request_id=f"req_{random.randrange(10**9)}", transport=None,
        duration=0.05, retry_in=None,
    )
    fields.update(kw)
    return AttemptRecord(**fields)  # type: ignore[arg-type]


def request(op: str, status: int = 200) -> RequestRecord:
    return RequestRecord(op, "POST", status, "success", 1, 0.05, "req_1", None, False, None, 0.0)


class Harness:
    """An engine on a fake clock, fed traffic second by second."""

    def __init__(self, settings: DiagnosisSettings = SETTINGS) -> None:
        self.clock = FakeClock()
        self.engine = DiagnosisEngine(settings, clock=self.clock, wall=lambda: 1.8e9)
        self.events: list[DiagnosisEvent] = []
        self.engine.subscribe(self.events.append)

    def second(self, make: object, per_op: int = 10, ops: tuple[str, ...] = OPS) -> None:
        """Feed one second of traffic (``make(op, i)`` gives each record), then evaluate."""
        rec = self.engine.recorder
        for op in ops:
            for i in range(per_op):
                record = make(op, i)  # type: ignore[operator]
                rec.attempt(record)
                rec.request(request(op, record.status or 502))
        self.clock.advance(1.0)
        self.engine.evaluate()

    def run(self, seconds: int, make: object, **kw: object) -> None:
        for _ in range(seconds):
            self.second(make, **kw)  # type: ignore[arg-type]

    def kinds(self, type_: str) -> list[str]:
        return [e.diagnosis.kind for e in self.events if e.type == type_]


def healthy(op: str, i: int) -> AttemptRecord:
    return attempt(op)


def outage(op: str, i: int) -> AttemptRecord:
    return attempt(op, "gateway_error", 503, request_id=None)


def test_healthy_traffic_raises_nothing_over_ten_minutes() -> None:
    """Steady successes (with a rare decline and 404) raise nothing at all."""
    h = Harness(DiagnosisSettings())

    def mixed(op: str, i: int) -> AttemptRecord:
        if i == 3:
            return attempt(op, "card_declined", 402)
        if i == 7:
            return attempt(op, "validation", 404, error_code="resource_missing")
        return attempt(op, duration=0.02 + 0.01 * i)

    h.run(600, mixed)
    assert h.events == [] and h.engine.active == {}


def test_bad_day_faults_raise_nothing() -> None:
    """The simulator's bad_day mix (10% transient faults spread over kinds) raises nothing."""
    h = Harness(DiagnosisSettings())
    rng = random.Random(7)
    faults = [("server_error", 500), ("gateway_error", 502), ("rate_limited", 429),
              ("lock_timeout", 429), ("connection_error", 0)]

    def bad_day(op: str, i: int) -> AttemptRecord:
        if rng.random() < 0.10:
            outcome, status = rng.choice(faults)
            return attempt(op, outcome, status, rate_limited_reason="global-rate",
                           transport="reset" if status == 0 else None)
        return attempt(op)

    h.run(300, bad_day, per_op=20)
    assert h.events == []


def test_outage_raises_after_raise_after_and_clears_after_clear_after() -> None:
    """Gateway errors on every operation raise stripe_outage (critical) after 3 s, clear 5 s after."""
    h = Harness()
    h.run(2, outage)
    assert h.engine.active == {}
    h.run(2, outage)
    assert h.kinds("raised") == ["stripe_outage"]
    d = h.engine.active["stripe_outage"]
    assert d.severity == "critical"
    assert d.evidence["operations"] == sorted(OPS) and d.evidence["share"] == 1.0
    assert h.engine.critical_kinds() == ("stripe_outage",)
    h.run(15, healthy)  # the failures fall under half the threshold, then 5 s of health
    assert h.kinds("cleared") == ["stripe_outage"]
    assert h.engine.active == {}
    assert h.engine.recent[0].cleared_at is not None


def test_outage_on_one_operation_of_several_is_not_an_outage() -> None:
    """One failing operation while two others succeed is not called a Stripe outage."""
    h = Harness()
    h.run(10, lambda op, i: outage(op, i) if op == CREATE else attempt(op))
    assert "stripe_outage" not in h.engine.active


def test_outage_behind_open_breakers_does_not_clear_for_want_of_calls() -> None:
    """Once raised, a trickle of failing probes (too few to count) keeps stripe_outage active."""
    h = Harness()
    h.run(5, outage)
    h.run(30, outage, per_op=1, ops=(CREATE,))
    assert list(h.engine.active) == ["stripe_outage"]
    assert h.kinds("cleared") == []


def test_no_flap_when_failures_hover_around_the_threshold() -> None:
    """A failure share alternating just above and below 50% raises once and never clears/re-raises."""
    h = Harness()
    flip = [0]

    def hovering(op: str, i: int) -> AttemptRecord:
        share = 6 if flip[0] % 2 else 4
        return outage(op, i) if i < share else attempt(op)

    for _ in range(120):
        flip[0] += 1
        h.second(hovering)
    assert h.kinds("raised") == ["stripe_outage"]
    assert h.kinds("cleared") == []


def test_brief_blip_shorter_than_raise_after_raises_nothing() -> None:
    """Two seconds of errors then health never raise (raise_after is 3 s)."""
    h = Harness(dataclasses.replace(SETTINGS, window=2.0))
    h.run(1, outage)
    h.run(30, healthy)
    assert h.events == []


def test_network_failure_names_the_step() -> None:
    """Connect failures at the DNS step raise network_failure naming dns, not an outage."""
    h = Harness()

    def dns(op: str, i: int) -> AttemptRecord:
        return attempt(op, "connection_error", 0, transport="connect", transport_step="dns",
                       request_id=None)

    h.run(5, dns)
    assert h.kinds("raised") == ["network_failure"]
    d = h.engine.active["network_failure"]
    assert d.evidence["failing_step"] == "dns" and "DNS" in d.action
    assert "dns step" in d.summary
    h.run(20, healthy)
    assert h.kinds("cleared") == ["network_failure"]


def test_auth_failure_on_401_with_codes_and_examples() -> None:
    """401s raise auth_failure (critical) with the error code and up to 5 Request-Ids."""
    h = Harness()
    h.run(5, lambda op, i: attempt(op, "authentication", 401, error_code="api_key_expired"),
          per_op=2)
    d = h.engine.active["auth_failure"]
    assert d.severity == "critical" and "api_key_expired" in d.summary
    assert 1 <= len(d.evidence["example_request_ids"]) <= 5
    assert all(r.startswith("req_") for r in d.evidence["example_request_ids"])
    h.run(20, healthy)
    assert h.kinds("cleared") == ["auth_failure"]


def test_auth_failure_on_403_names_the_operation() -> None:
    """403s on one operation raise a warning that names that operation."""
    h = Harness()
    h.run(5, lambda op, i: attempt(op, "permission", 403) if op == CONFIRM and i < 2
          else attempt(op))
    d = h.engine.active["auth_failure"]
    assert d.severity == "warning"
    assert CONFIRM in d.summary and d.evidence["operations"] == [CONFIRM]


def test_rate_limited_by_reason() -> None:
    """429s with Stripe-Rate-Limited-Reason raise rate_limited, counted by reason."""
    h = Harness()

    def limited(op: str, i: int) -> AttemptRecord:
        if i < 4:
            return attempt(op, "rate_limited", 429, error_code="rate_limit",
                           rate_limited_reason="global-rate")
        return attempt(op)

    h.run(5, limited)
    d = h.engine.active["rate_limited"]
    assert d.evidence["reasons"]["global-rate"] > 0 and "global-rate" in d.summary
    h.run(20, healthy)
    assert h.kinds("cleared") == ["rate_limited"]


def test_lock_timeouts_name_contention() -> None:
    """Mostly lock_timeout 429s on one operation are reported as contention on objects."""
    h = Harness()
    h.run(5, lambda op, i: attempt(op, "lock_timeout", 429, error_code="lock_timeout")
          if op == CONFIRM and i < 6 else attempt(op))
    d = h.engine.active["rate_limited"]
    assert "contending" in d.summary and CONFIRM in d.summary


def test_latency_degraded_on_slow_successes() -> None:
    """A p99 of successful calls above the threshold raises latency_degraded, and clears."""
    h = Harness(dataclasses.replace(SETTINGS, latency_degraded=LatencyThreshold(p99=1.0)))
    h.run(5, lambda op, i: attempt(op, duration=2.5))
    d = h.engine.active["latency_degraded"]
    assert d.evidence["p99_ms"] > 1000 and d.evidence["threshold_ms"] == 1000
    h.run(20, healthy)
    assert h.kinds("cleared") == ["latency_degraded"]


def test_client_errors_spike_on_one_operation_with_codes_and_params() -> None:
    """A burst of 400s on one operation names it, the top error codes and params."""
    h = Harness()
    h.run(30, healthy)

    def bad(op: str, i: int) -> AttemptRecord:
        if op == CREATE and i < 8:
            return attempt(op, "validation", 400, error_code="parameter_invalid_string",
                           error_param="email")
        return attempt(op)

    h.run(6, bad)
    d = h.engine.active["client_errors_spike"]
    assert d.evidence["operations"] == [CREATE]
    assert d.evidence["top_errors"][0] == {"code": "parameter_invalid_string", "param": "email",
                                           "count": d.evidence["top_errors"][0]["count"]}
    assert "email" in d.summary
    h.run(20, healthy)
    assert h.kinds("cleared") == ["client_errors_spike"]


def test_a_usual_share_of_400s_is_learnt_and_not_a_spike() -> None:
    """An operation that has always answered 30% 400s does not raise once its baseline is learnt."""
    s = dataclasses.replace(SETTINGS, raise_after=3.0)
    s = dataclasses.replace(
        s, client_errors_spike=dataclasses.replace(s.client_errors_spike, baseline_half_life=5.0)
    )
    h = Harness(s)

    def usual(op: str, i: int) -> AttemptRecord:
        return attempt(op, "validation", 400, error_code="x") if i < 3 else attempt(op)

    h.run(2, usual)
    h.run(120, usual)
    assert "client_errors_spike" not in h.engine.active


def test_idempotency_misuse() -> None:
    """400 idempotency_error raises idempotency_misuse naming the operation."""
    h = Harness()
    h.run(7, lambda op, i: attempt(op, "idempotency_mismatch", 400, error_code="idempotency_error")
          if op == CREATE and i == 0 else attempt(op))
    d = h.engine.active["idempotency_misuse"]
    assert CREATE in d.summary
    h.run(20, healthy)
    assert h.kinds("cleared") == ["idempotency_misuse"]


def test_subscribers_see_each_raise_and_clear_once_and_can_unsubscribe() -> None:
    """A subscriber gets one raised and one cleared event; after unsubscribing, none."""
    h = Harness()
    seen: list[str] = []
    undo = h.engine.subscribe(lambda e: seen.append(e.type))
    h.run(10, outage)
    h.run(20, healthy)
    assert seen == ["raised", "cleared"]
    undo()
    h.run(10, outage)
    assert seen == ["raised", "cleared"]


def test_actions_are_recorded_and_published() -> None:
    """record_action keeps the action for /diagnosis and tells action subscribers."""
    h = Harness()
    got = []
    h.engine.subscribe_actions(got.append)
    h.engine.record_action("pool_reset", "network_failure", "Reconnect.", "ok", before="3", after="0")
    report = h.engine.report({})
    assert report["actions"][0]["kind"] == "pool_reset" and got[0].result == "ok"


def test_report_operations_have_ratio_latency_breaker_and_history() -> None:
    """/diagnosis operations carry success ratio, p50/p99, breaker state and per-second history."""
    h = Harness()
    h.run(3, healthy)
    ops = h.engine.report({CREATE: "open"})["operations"]
    assert ops[CREATE]["success_ratio"] == 1.0 and ops[CREATE]["breaker"] == "open"
    assert ops[BALANCE]["breaker"] == "closed"
    assert 25 <= ops[CREATE]["p50_ms"] <= 50 and ops[CREATE]["p99_ms"] <= 50
    assert sum(ops[CREATE]["history"]["requests"]) == 30


def test_store_unreachable_raises_after_raise_after_and_clears_once_it_answers() -> None:
    """A failing store is raised after raise_after with its redacted URL and effect; cleared clear_after after it answers."""
    h = Harness()
    url = "redis://:hunter2secret@redis.internal:6380/0"
    for _ in range(4):
        h.engine.report_store("ratelimit.shared", url, "ConnectionError: refused",
                              effect="each sidecar limits on its own")
        h.second(lambda op, i: attempt(op))
    assert h.kinds("raised") == ["store_unreachable"]
    d = h.engine.active["store_unreachable"]
    assert d.severity == "warning"
    stores = d.evidence["stores"]
    assert stores["ratelimit.shared"]["url"] == "redis://redis.internal:6380/0"
    assert "hunter2" not in repr(d.as_dict())
    assert "each sidecar limits on its own" in d.summary
    h.engine.report_store("outbox.store", "redis://redis.internal:6380/0", "timeout",
                          effect="writes are not queued", severity="critical")
    h.second(lambda op, i: attempt(op))
    assert h.engine.active["store_unreachable"].severity == "critical"
    assert h.engine.critical_kinds() == ("store_unreachable",)
    h.engine.report_store("ratelimit.shared", url, None)
    h.engine.report_store("outbox.store", url, None)
    h.run(4, lambda op, i: attempt(op))
    assert h.kinds("cleared") == []
    h.run(2, lambda op, i: attempt(op))
    assert h.kinds("cleared") == ["store_unreachable"]


def test_store_failure_keeps_its_first_time_while_it_lasts() -> None:
    """Repeated reports of a failing store keep the time of its first failure; after it answered, a new failure starts anew."""
    times = iter([100.0, 200.0, 300.0])
    engine = DiagnosisEngine(SETTINGS, clock=FakeClock(), wall=lambda: next(times))
    engine.report_store("ratelimit.shared", "redis://h/0", "down")
    engine.report_store("ratelimit.shared", "redis://h/0", "still down")
    assert engine._stores["ratelimit.shared"].since == 100.0
    engine.report_store("ratelimit.shared", "redis://h/0", None)
    assert engine._stores == {}
    engine.report_store("ratelimit.shared", "redis://h/0", "down again")
    snapshot_stores = engine._stores
    assert snapshot_stores["ratelimit.shared"].since == 200.0
    assert snapshot_stores["ratelimit.shared"].error == "down again"
