"""Per-record cost of the diagnosis observer (ns per attempt/request record), one run.

    .venv/bin/python bench/diagnosis_observer.py

Measures what the request path pays for diagnosis: ``DiagnosisRecorder.attempt`` and
``.request`` on successful records (the common case) and on failures, with time.monotonic as
the clock as in the sidecar. The rules run on a timer and are not part of this cost.
"""

from __future__ import annotations

import time

from proxy.diagnosis import DiagnosisRecorder
from proxy.records import AttemptRecord, RequestRecord

N = 500_000
OPS = ["POST /v1/customers", "POST /v1/payment_intents", "GET /v1/balance"]


def per_record(fn, records) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter_ns()
    for r in records:
        fn(r)
    return (time.perf_counter_ns() - t0) / len(records)


def main() -> None:
    rec = DiagnosisRecorder(30.0, time.monotonic)
    ok = [AttemptRecord(OPS[i % 3], 1, "success", 200, None, None, "req_x", None, 0.05, None)
          for i in range(N)]
    bad = [AttemptRecord(OPS[i % 3], 1, "server_error", 500, "api_error", None, "req_x", None,
                         0.05, 0.5) for i in range(N)]
    req = [RequestRecord(OPS[i % 3], "POST", 200, "success", 1, 0.05, "req_x", None, False, None,
                         0.0) for i in range(N)]
    base = per_record(lambda r: None, ok)
    print(f"empty loop           {base:6.0f} ns/record")
    print(f"attempt (success)    {per_record(rec.attempt, ok) - base:6.0f} ns/record")
    print(f"attempt (failure)    {per_record(rec.attempt, bad) - base:6.0f} ns/record")
    print(f"request              {per_record(rec.request, req) - base:6.0f} ns/record")


if __name__ == "__main__":
    main()
