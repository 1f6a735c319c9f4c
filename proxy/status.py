"""The diagnosis engine's surfaces: metrics, log events, the Sidecar-Diagnosis header, /status.

:class:`DiagnosisSurfaces` subscribes to a :class:`~proxy.diagnosis.DiagnosisEngine` and turns
each raise, clear and healing action into its metric, its one log event and (for critical
diagnoses) the cached header line every answer carries. :func:`status_page` renders the
self-contained operator page: no external assets, inline CSS and JS; it shows the /diagnosis
document it was rendered with at once, then refreshes itself by fetching /diagnosis.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.diagnosis import KINDS, DiagnosisEngine, DiagnosisEvent, HealingAction
from proxy.log import Logger

__all__ = ["DiagnosisSurfaces", "status_page"]

_RESULTS = frozenset({"ok", "failed", "skipped", "undone"})


class DiagnosisSurfaces:
    """Metrics, log events and the header line, kept in step with the engine's events."""

    def __init__(
        self,
        engine: DiagnosisEngine,
        *,
        registry: CollectorRegistry,
        log: Logger,
        set_header: Callable[[bytes], None],
    ) -> None:
        self._engine = engine
        self._log = log
        self._set_header = set_header
        self.active = Gauge(
            "stripe_sidecar_diagnosis_active",
            "Active diagnoses by kind (1 while raised).",
            ["kind"],
            registry=registry,
        )
        for kind in KINDS:
            self.active.labels(kind).set(0)
        self.actions = Counter(
            "stripe_sidecar_healing_actions",
            "Healing actions taken, by kind and result.",
            ["kind", "result"],
            registry=registry,
        )
        engine.subscribe(self.on_event)
        engine.subscribe_actions(self.on_action)

    def on_event(self, event: DiagnosisEvent) -> None:
        """A diagnosis was raised or cleared: gauge, one log event, header line."""
        d = event.diagnosis
        raised = event.type == "raised"
        self.active.labels(d.kind).set(1 if raised else 0)
        self._log.event(
            f"diagnosis_{event.type}",
            "warning" if raised and d.severity != "info" else "info",
            kind=d.kind,
            severity=d.severity,
            summary=d.summary,
            evidence=dict(d.evidence),
            action=d.action,
        )
        kinds = self._engine.critical_kinds()
        self._set_header(b"Sidecar-Diagnosis: %s\r\n" % ", ".join(kinds).encode() if kinds else b"")

    def on_action(self, action: HealingAction) -> None:
        """A healing action was taken: count it and log it."""
        result = action.result if action.result in _RESULTS else "other"
        self.actions.labels(action.kind, result).inc()
        self._log.event(
            "healing_action",
            kind=action.kind,
            diagnosis=action.diagnosis,
            reason=action.reason,
            result=action.result,
            before=action.before,
            after=action.after,
        )


def status_page(report: dict[str, Any], version: str) -> bytes:
    """The /status HTML page with ``report`` (the /diagnosis document) embedded."""
    # Embedded as a JSON script element; "<" escaped so no text can end the element early.
    data = json.dumps(report, separators=(",", ":")).replace("<", "\\u003c")
    return _PAGE.replace("__VERSION__", version).replace("__DATA__", data).encode()


# The page itself lives beside this module (HTML, CSS and JS in one file), read once.
_PAGE = resources.files("proxy").joinpath("status.html").read_text(encoding="utf-8")
