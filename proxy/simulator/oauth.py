"""Connect OAuth `POST /oauth/token`; its errors are flat (`{"error": "invalid_grant"}`).

Any code starting `ac_` is valid once; a reused or unknown code is `invalid_grant`, as on
Stripe. Issued access tokens are `sk_test_...` keys the simulator accepts.
"""

from __future__ import annotations

from proxy.simulator.call import Call, Outcome
from proxy.simulator.errors import oauth_error
from proxy.simulator.store import Store


def token(store: Store, call: Call) -> Outcome:
    """POST /oauth/token (authorization_code or refresh_token grants)."""
    p = call.params
    grant = p.get("grant_type")
    if not grant:
        raise oauth_error(400, "invalid_request", "No grant type specified")
    if grant == "authorization_code":
        code = p.get("code")
        if not code:
            raise oauth_error(400, "invalid_request", "No authorization code provided")
        code = str(code)
        if not code.startswith("ac_"):
            return Outcome.failed(oauth_error(
                400, "invalid_grant", f"Authorization code does not exist: {code}"))
        if code in store.used_codes:
            return Outcome.failed(oauth_error(
                400, "invalid_grant",
                "This authorization code has already been used. All tokens issued with this "
                "code have been revoked."))
        store.used_codes.add(code)
    elif grant == "refresh_token":
        refresh = str(p.get("refresh_token") or "")
        if refresh not in store.refresh_tokens:
            return Outcome.failed(oauth_error(
                400, "invalid_grant", f"Refresh token does not exist: {refresh}"))
    else:
        raise oauth_error(400, "unsupported_grant_type", f"Unsupported grant type: {grant}")
    mode = "live" if call.livemode else "test"
    refresh_token = store.new_id("rt")
    store.refresh_tokens.add(refresh_token)
    return Outcome.ok({
        "access_token": store.new_id(f"sk_{mode}"),
        "livemode": call.livemode,
        "refresh_token": refresh_token,
        "scope": str(p.get("scope") or "read_write"),
        "stripe_publishable_key": store.new_id(f"pk_{mode}"),
        "stripe_user_id": store.new_id("acct"),
        "token_type": "bearer",
    }, wrote=True)
