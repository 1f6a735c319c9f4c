"""Structured JSON logs: one object per line, one event per thing that happened.

Secrets never reach this module: callers pass operations, outcomes and Stripe request IDs, never
headers. As a second line of defence, any string that looks like a Stripe API key is masked.
Lines are buffered: the owner flushes them on a timer (the sidecar every 0.5 s) and a full buffer
flushes itself, so the hot path pays for a string format, not a syscall.
"""

from __future__ import annotations

import json
import re
import sys
import time
from json.encoder import encode_basestring_ascii as _json_str
from typing import IO, Any

__all__ = ["Logger", "redact"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_FLUSH_AT = 512  # buffered lines that make a flush without waiting for the owner's timer
_CENTS = [f"{i:02d}" for i in range(100)]
_MILLIS = [f"{i:03d}" for i in range(1000)]
# int() of a float, without the type call (a third of its cost); the same value.
_trunc = float.__trunc__
_KEY = re.compile(
    r"\b((?:sk|rk|pk)_(?:live|test)_)[A-Za-z0-9]+|(Bearer|Basic)\s+[A-Za-z0-9+/=._-]+"
)


def redact(text: str) -> str:
    """Mask anything shaped like a Stripe API key or an Authorization value."""
    return _KEY.sub(lambda m: (m.group(1) or m.group(2) + " ") + "[redacted]", text)


class Logger:
    """Writes JSON events to a stream (stdout by default)."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        level: str = "info",
        access_log: bool = True,
        clock: Any = time.time,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._min = _LEVELS[level]
        self.access_enabled = access_log and self._min <= _LEVELS["info"]
        self._clock = clock
        self._buf: list[str] = []
        self._sec = -1
        self._sec_text = ""
        self._ms = -1
        self._ms_text = ""

    def _ts(self, ms: int) -> str:
        """The ISO 8601 UTC text of ``ms`` (epoch milliseconds)."""
        if ms != self._ms:  # many lines share a millisecond under load
            self._ms = ms
            sec = ms // 1000
            if sec != self._sec:
                self._second(sec)
            self._ms_text = f"{self._sec_text}.{_MILLIS[ms % 1000]}Z"
        return self._ms_text

    def _second(self, sec: int) -> None:
        self._sec = sec
        self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        """Log one event with its fields (strings are redacted)."""
        if _LEVELS[level] < self._min:
            return
        ts = self._ts(int(self._clock() * 1000))
        record: dict[str, Any] = {"ts": ts, "level": level, "event": event}
        for key, value in fields.items():
            record[key] = redact(value) if isinstance(value, str) else value
        self._write(json.dumps(record, separators=(",", ":"), default=str))
        self.flush()

    def access(
        self,
        operation: str,
        status: int,
        outcome: str,
        attempts: int,
        duration: float,
        request_id: str | None,
        idempotency_key_injected: bool,
    ) -> None:
        """The one line per request; ``operation`` arrives JSON-encoded (quoted) already.

        Written for the hot path: the timestamp text is reused within a millisecond, the
        duration is printed with integer maths (as ``f"{ms:.2f}"`` would), and the request id
        is encoded in C (as ``json.dumps`` does).
        """
        ms = _trunc(self._clock() * 1000.0)
        if ms == self._ms:
            ts = self._ms_text
        else:  # _ts() inlined: a new millisecond is most lines' case below ~10k lines/s
            self._ms = ms
            sec = ms // 1000
            if sec != self._sec:
                self._second(sec)
            ts = self._ms_text = f"{self._sec_text}.{_MILLIS[ms % 1000]}Z"
        cents = _trunc(duration * 100_000.0 + 0.5)  # hundredths of a millisecond, rounded
        buf = self._buf
        buf.append(
            f'{{"ts":"{ts}","level":"info","event":"request","operation":{operation},'
            f'"status":{status},"outcome":"{outcome}","attempts":{attempts},'
            f'"duration_ms":{cents // 100}.{_CENTS[cents % 100]},"request_id":'
            f"{'null' if request_id is None else _json_str(request_id)},"
            f'"key_injected":{"true" if idempotency_key_injected else "false"}}}'
        )
        if len(buf) >= _FLUSH_AT:
            self.flush()

    def _write(self, line: str) -> None:
        # The owner calls flush() on a timer (the sidecar: every 0.5 s); a full buffer flushes.
        buf = self._buf
        buf.append(line)
        if len(buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Write buffered lines out."""
        if not self._buf:
            return
        self._buf.append("")  # the last line's newline, without copying the whole text again
        data = "\n".join(self._buf)
        self._buf.clear()
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take requests down with it
