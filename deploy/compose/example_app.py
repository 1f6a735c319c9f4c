"""The example app of docker-compose.yml: the official Stripe SDK, its base URL set to the sidecar.

It never retries and sends no idempotency keys of its own: the sidecar makes its calls safe to
retry. Environment: STRIPE_API_KEY, STRIPE_API_BASE (http://localhost:8080), EXAMPLE_ROUNDS
(default: forever), EXAMPLE_PAUSE (seconds between rounds, default 1).
"""

from __future__ import annotations

import os
import time

import stripe


def main() -> None:
    """Create a PaymentIntent and read the balance, round after round; print what happened."""
    base = os.environ.get("STRIPE_API_BASE", "http://localhost:8080")
    # The one setting: every Stripe host (API, files, connect) goes to the sidecar.
    client = stripe.StripeClient(
        os.environ["STRIPE_API_KEY"],
        base_addresses={"api": base, "files": base, "connect": base},
        max_network_retries=0,
    )
    rounds = int(os.environ.get("EXAMPLE_ROUNDS", "0"))
    pause = float(os.environ.get("EXAMPLE_PAUSE", "1"))
    done = 0
    while rounds == 0 or done < rounds:
        try:
            intent = client.v1.payment_intents.create(
                params={"amount": 2000, "currency": "usd", "payment_method_types": ["card"]}
            )
            balance = client.v1.balance.retrieve()
            line = f"payment_intent {intent.id} {intent.status}; balance {balance.object}"
            print(line, flush=True)
        except stripe.StripeError as exc:
            print(f"failed: {type(exc).__name__}: {exc.user_message or exc}", flush=True)
        done += 1
        if rounds == 0 or done < rounds:
            time.sleep(pause)


if __name__ == "__main__":
    main()
