"""A Stripe-shaped upstream for tests, the demo and benchmarks.

It speaks enough of Stripe's API (customers, payment intents, refunds, balance, files,
OAuth, v2 meter events) for the official SDKs, keeps Stripe's idempotency rules, injects
seeded faults, and keeps books of what it executed so tests can count duplicates.

    async with start_simulator(profile="bad_day", seed=7) as sim:
        ...  # point a client at sim.url
        assert sim.books()["duplicates"] == 0

Control endpoints (never faulted, never counted): `GET /_sim/books`, `POST /_sim/reset`,
`GET|POST /_sim/faults`, `POST /_sim/keys/revoke`, `POST /_sim/keys/restore`,
`GET /_sim/scenarios`, `POST /_sim/scenarios/bad_requests` (see `scenarios.py`).
"""

from proxy.simulator.faults import PROFILES, FaultProfile
from proxy.simulator.runner import SimulatorHandle, run_simulator, start_simulator
from proxy.simulator.server import create_app

__all__ = [
    "PROFILES",
    "FaultProfile",
    "SimulatorHandle",
    "create_app",
    "run_simulator",
    "start_simulator",
]
