"""The outbox's decisions, pure: when an item expires, how long between rounds, what comes next.

No I/O, no clock: times come in as arguments (wall-clock seconds), randomness as a callable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.outbox.store import State

__all__ = [
    "Answer",
    "Next",
    "OutboxSettings",
    "after_round",
    "backoff",
    "before_round",
    "expiry",
    "store_url",
]

ENV_STORE = "STRIPE_SIDECAR_OUTBOX_STORE"
ENV_STATE_DIR = "STRIPE_SIDECAR_STATE_DIR"


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """The ``outbox:`` section."""

    # None: sqlite:///$STRIPE_SIDECAR_STATE_DIR/outbox.db, or ./outbox.db when that is unset.
    # Also STRIPE_SIDECAR_OUTBOX_STORE. Opened only when some operation has fallback: queue.
    store: str | None = None
    # Stripe prunes keys after at least 24 h; an item is never sent once its key is this old
    # minus the margin (clocks drift, a round takes time).
    idempotency_window: float = 86400.0
    safety_margin: float = 3600.0
    # Delivery: a claimed item is someone else's to claim again after `lease` (must outlast a
    # request's retries: above retry.deadline); rounds back off from backoff_base to backoff_max.
    lease: float = 60.0
    poll_interval: float = 1.0
    batch: int = 32
    concurrency: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    # Final items (delivered, failed, expired) are deleted this long after they settled.
    retention: float = 7 * 86400.0
    # POSTed each final result ({"event": "outbox_item_final", "item": {...}}), retried.
    callback_url: str | None = None
    callback_timeout: float = 5.0
    callback_attempts: int = 5


class Answer(enum.Enum):
    """What a delivery round came to, as the pipeline saw it."""

    SUCCESS = "success"  # Stripe answered 2xx/3xx
    TERMINAL = "terminal"  # Stripe's final answer (4xx, a declined card, a saved 500)
    RETRYABLE = "retryable"  # retries ended on an outcome worth another round later
    NOT_SENT = "not_sent"  # the sidecar held it back (breaker open, limiter, bulkhead, shutdown)


@dataclass(frozen=True, slots=True)
class Next:
    """Where an item goes after a round: its state, when it is due again, and why."""

    state: State
    next_at: float
    reason: str


def store_url(settings: OutboxSettings, environ: Mapping[str, str]) -> str:
    """The store to use: the environment's, the config's, else a file in the state directory.

    The default is ``sqlite:///$STRIPE_SIDECAR_STATE_DIR/outbox.db``, or ``outbox.db`` in the
    working directory when that variable is unset (a non-root user can write there; the
    container image sets the variable to its one volume).
    """
    url = environ.get(ENV_STORE) or settings.store
    if url:
        return url
    state_dir = environ.get(ENV_STATE_DIR) or "."
    return f"sqlite:///{state_dir}/outbox.db"


def expiry(received_at: float, settings: OutboxSettings) -> float:
    """From this moment on the item is never sent: its key may be gone from Stripe."""
    return received_at + settings.idempotency_window - settings.safety_margin


def backoff(rounds: int, settings: OutboxSettings, rand: Callable[[], float]) -> float:
    """Seconds before round ``rounds + 1``: doubling from the base to the cap, jitter x[0.5, 1]."""
    ceiling = min(settings.backoff_max, settings.backoff_base * 2.0 ** min(rounds, 30))
    return ceiling * (0.5 + rand() / 2)


def _too_old(received_at: float, expires_at: float, now: float) -> str:
    hours = (now - received_at) / 3600
    return (
        f"expired: received {hours:.2f} h ago, past Stripe's idempotency window less the "
        f"safety margin (until {expires_at:.0f}); a resend could be performed twice, so it "
        "is never sent again"
    )


def before_round(received_at: float, expires_at: float, now: float) -> Next | None:
    """Expire an item whose time is up before anything is sent; None: go ahead."""
    if now >= expires_at:
        return Next(State.EXPIRED, now, _too_old(received_at, expires_at, now))
    return None


def after_round(
    answer: Answer,
    detail: str,
    *,
    rounds: int,
    received_at: float,
    expires_at: float,
    now: float,
    retry_after: float,
    settings: OutboxSettings,
    rand: Callable[[], float],
) -> Next:
    """The item's next state after a round.

    ``rounds`` counts earlier rounds that sent something; ``retry_after`` is the wait the
    sidecar or Stripe asked for (0: none); ``detail`` names the outcome for the audit trail.
    A round whose next one would fall after the expiry expires the item now: nothing may be
    sent later, so waiting would only hide it.
    """
    if answer is Answer.SUCCESS:
        return Next(State.DELIVERED, now, "delivered")
    if answer is Answer.TERMINAL:
        return Next(State.FAILED, now, f"failed: Stripe's final answer ({detail})")
    if answer is Answer.NOT_SENT:
        wait = max(retry_after, settings.poll_interval)
        reason = f"not sent: {detail}"
    else:
        wait = max(retry_after, backoff(rounds, settings, rand))
        reason = f"retry later: {detail}"
    due = now + wait
    if due >= expires_at:
        return Next(State.EXPIRED, now, _too_old(received_at, expires_at, now))
    return Next(State.QUEUED, due, reason)
