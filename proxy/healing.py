"""Healing actions: what the sidecar does by itself about a diagnosis, and undoes after.

:class:`Healer` subscribes to the diagnosis engine's raise and clear events (never to requests)
and acts on the sidecar's own state:

- ``network_failure`` raised: the upstream pools' idle connections are closed (``pool_reset``),
  so the next request connects anew and resolves Stripe's host name again; recorded as undone
  when the diagnosis clears.
- ``rate_limited`` raised: each affected operation's bulkhead compartment is tightened to its
  recent peak of requests in flight times ``tighten_factor`` (``concurrency_tightened``); when
  it clears, the bound doubles every ``restore_interval`` until it is back where it was
  (``concurrency_restored``, the last step recorded as undone).
- ``stripe_outage``: nothing to do here. ``/ready`` stays ready (a pod must not leave its
  Service because Stripe is down) and answers carry ``Sidecar-Diagnosis`` instead.

Each action kind runs at most once per ``min_interval`` (a skipped one is recorded as such);
undoing is never held back. Every action is recorded with the engine (``record_action``), which
logs it once and counts it in ``stripe_sidecar_healing_actions_total``. The clock is injected;
:meth:`Healer.tick` runs after each evaluation (``proxy.app``), never per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from proxy.bulkhead import Compartment
from proxy.diagnosis import Diagnosis, DiagnosisEngine, DiagnosisEvent
from proxy.upstream import Pool

__all__ = ["Healer", "HealingSettings"]

_MAX_OPERATIONS = 10  # operations tightened per raise at most (the evidence lists them)


@dataclass(frozen=True, slots=True)
class HealingSettings:
    """The ``healing:`` section."""

    enabled: bool = True
    min_interval: float = 30.0  # seconds between two actions of one kind
    tighten_factor: float = 0.5  # rate_limited: bound = recent peak in flight x this ...
    min_in_flight: int = 4  # ... but never below this
    restore_interval: float = 5.0  # after it clears, the bound doubles once per this


class _Tightened:
    """One operation's compartment while its bound is below where it was."""

    __slots__ = ("compartment", "original")

    def __init__(self, compartment: Compartment, original: int) -> None:
        self.compartment = compartment
        self.original = original


class Healer:
    """Takes and undoes the healing actions for the engine's diagnoses."""

    def __init__(
        self,
        engine: DiagnosisEngine,
        settings: HealingSettings,
        *,
        pools: Callable[[], Iterable[Pool]],
        compartments: Callable[[], Mapping[str, Compartment]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self.settings = settings
        self._pools = pools
        self._compartments = compartments
        self._clock = clock
        self._last: dict[str, float] = {}  # action kind -> when it was last taken
        self.tightened: dict[str, _Tightened] = {}
        self._restoring = False
        self._next_restore = 0.0
        self.unsubscribe = engine.subscribe(self.on_event)

    # -- events ---------------------------------------------------------------------------------
    def on_event(self, event: DiagnosisEvent) -> None:
        """A diagnosis was raised or cleared: act, or undo."""
        d = event.diagnosis
        if event.type == "raised":
            if d.kind == "network_failure":
                self._reset_pools(d)
            elif d.kind == "rate_limited":
                self._restoring = False
                self._tighten(d)
        elif d.kind == "network_failure" and "pool_reset" in self._last:
            self._engine.record_action(
                "pool_reset", d.kind,
                "Stripe is reachable again: connections are pooled and reused as before.",
                "undone", before="reset", after="pooling",
            )  # fmt: skip
        elif d.kind == "rate_limited" and self.tightened:
            self._restoring = True
            self._next_restore = self._clock() + self.settings.restore_interval

    def _allowed(self, kind: str, diagnosis: str) -> bool:
        """Whether ``kind`` may run now; a held-back action is recorded as skipped."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.settings.min_interval:
            self._engine.record_action(
                kind, diagnosis,
                f"Held back: the last {kind} was {now - last:.0f} s ago (healing.min_interval "
                f"{self.settings.min_interval:g} s).",
                "skipped",
            )  # fmt: skip
            return False
        self._last[kind] = now
        return True

    # -- network_failure ------------------------------------------------------------------------
    def _reset_pools(self, d: Diagnosis) -> None:
        if not self._allowed("pool_reset", d.kind):
            return
        pools = list(self._pools())
        idle = sum(p.idle_count for p in pools)
        for pool in pools:
            pool.close()
        step = d.evidence.get("failing_step", "connect")
        self._engine.record_action(
            "pool_reset", d.kind,
            f"Calls to Stripe fail at the {step} step: the {idle} idle connection(s) were "
            "closed, so the next call connects anew and resolves Stripe's host name again.",
            "ok", before=f"{idle} idle connection(s)", after="0 idle connections",
        )  # fmt: skip

    # -- rate_limited ---------------------------------------------------------------------------
    def _tighten(self, d: Diagnosis) -> None:
        ops = [op for op in d.evidence.get("operations", []) if isinstance(op, str)]
        if not ops or not self._allowed("concurrency_tightened", d.kind):
            return
        s = self.settings
        compartments = self._compartments()
        for name in ops[:_MAX_OPERATIONS]:
            comp = compartments.get(name)
            if comp is None:
                continue
            before = comp.limit
            bound = max(s.min_in_flight, int(max(comp.peak, comp.in_flight, 1) * s.tighten_factor))
            if bound >= before:
                continue  # already at or below what tightening would give
            comp.limit = bound
            held = self.tightened.get(name)
            if held is None:
                self.tightened[name] = _Tightened(comp, before)
            self._engine.record_action(
                "concurrency_tightened", d.kind,
                f"Stripe rate limits {name}: at most {bound} of its requests go at once (they "
                f"peaked at {comp.peak}); the rest wait their turn.",
                "ok", before=f"{name}: {before} in flight", after=f"{name}: {bound} in flight",
            )  # fmt: skip

    def tick(self) -> None:
        """After each evaluation: start each operation's peak afresh; step restores along."""
        for comp in self._compartments().values():
            comp.peak = comp.in_flight
        if not self._restoring or self._clock() < self._next_restore:
            return
        self._next_restore = self._clock() + self.settings.restore_interval
        for name, held in list(self.tightened.items()):
            comp = held.compartment
            before = comp.limit
            comp.limit = min(held.original, before * 2)
            done = comp.limit >= held.original
            if done:
                del self.tightened[name]
            self._engine.record_action(
                "concurrency_restored", "rate_limited",
                f"Stripe no longer rate limits: {name} may have {comp.limit} requests in flight"
                + (" again, as before." if done else f" (on its way back to {held.original})."),
                "undone" if done else "ok",
                before=f"{name}: {before} in flight", after=f"{name}: {comp.limit} in flight",
            )  # fmt: skip
        if not self.tightened:
            self._restoring = False
