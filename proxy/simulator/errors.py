"""Stripe-shaped error bodies, and the exception that carries one out of an endpoint.

Shapes checked against Stripe's docs (error codes, rate limits, idempotency) and the SDKs'
error mapping: the wire `type` is one of api_error, card_error, idempotency_error,
invalid_request_error; stripe-python and stripe-node pick 401/403/429 exceptions by status.
"""

from __future__ import annotations

from typing import Any, Final

Body = dict[str, Any]

DOCS: Final = "https://stripe.com/docs/error-codes/"

RATE_LIMIT_MESSAGE: Final = (
    "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
LOCK_TIMEOUT_MESSAGE: Final = (
    "This object cannot be accessed right now because another API request or Stripe process "
    "is currently accessing it. If you see this error intermittently, retry the request. If "
    "you see this error frequently and are making multiple concurrent requests to a single "
    "object, make your requests serially or at a lower rate. See the rate limit documentation "
    "for more details."
)
SERVER_ERROR_MESSAGE: Final = (
    "Sorry, something went wrong. We've already been notified of the problem, but if you need "
    "any help, you can reach us at https://support.stripe.com/contact."
)
NO_KEY_MESSAGE: Final = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)

_KEY_PREFIXES: Final = ("sk_test_", "sk_live_", "rk_test_", "rk_live_", "pk_test_", "pk_live_")


class ApiError(Exception):
    """An error answer: HTTP status, JSON body and extra headers."""

    def __init__(self, status: int, body: Body, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers


def error(
    status: int,
    type_: str,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    **extra: Any,
) -> ApiError:
    """Build an `ApiError` with Stripe's `{"error": {...}}` body; absent fields are left out."""
    err: Body = {"type": type_, "message": message}
    if code is not None:
        err["code"] = code
        err["doc_url"] = DOCS + code.replace("_", "-")
    if param is not None:
        err["param"] = param
    err.update(extra)
    return ApiError(status, {"error": err}, headers)


def invalid(message: str, *, status: int = 400, code: str | None = None,
            param: str | None = None) -> ApiError:
    """An `invalid_request_error`."""
    return error(status, "invalid_request_error", message, code=code, param=param)


def parameter_missing(param: str) -> ApiError:
    """400 `parameter_missing` for a required parameter."""
    return invalid(f"Missing required param: {param}.", code="parameter_missing", param=param)


def invalid_integer(param: str, value: Any) -> ApiError:
    """400 `parameter_invalid_integer`."""
    return invalid(f"Invalid integer: {value}", code="parameter_invalid_integer", param=param)


def resource_missing(noun: str, ident: str, param: str = "id") -> ApiError:
    """404 `resource_missing`, e.g. "No such customer: 'cus_x'"."""
    return invalid(f"No such {noun}: '{ident}'", status=404, code="resource_missing", param=param)


def unrecognized_url(method: str, path: str) -> ApiError:
    """404 for a path or method the API does not have."""
    return invalid(
        f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or "
        "we can help at https://support.stripe.com/.",
        status=404,
    )


def request_log_url(request_id: str, now: int, *, livemode: bool) -> str:
    """The dashboard link Stripe puts in error bodies."""
    mode = "" if livemode else "test/"
    return f"https://dashboard.stripe.com/{mode}logs/{request_id}?t={now}"


def mask_key(key: str) -> str:
    """Mask an API key the way Stripe echoes it: prefix, stars, last four (`sk_test_****abcd`)."""
    prefix = next((p for p in _KEY_PREFIXES if key.startswith(p)), "")
    secret = key[len(prefix):]
    if len(secret) <= 4:
        return prefix + "*" * len(secret)
    return prefix + "*" * (len(secret) - 4) + secret[-4:]


def no_api_key() -> ApiError:
    """401 when no key was sent."""
    return error(401, "invalid_request_error", NO_KEY_MESSAGE,
                 headers=(("WWW-Authenticate", 'Basic realm="Stripe"'),))


def invalid_api_key(key: str) -> ApiError:
    """401 for a malformed, unknown or revoked key; the key is masked, never echoed."""
    return error(401, "invalid_request_error", f"Invalid API Key provided: {mask_key(key)}",
                 headers=(("WWW-Authenticate", 'Basic realm="Stripe"'),))


def permission_denied(key: str) -> ApiError:
    """403 for a restricted key without write permission (stripe SDKs raise PermissionError)."""
    return invalid(
        f"The provided key '{mask_key(key)}' does not have the required permissions for this "
        "endpoint on account 'acct_simulator'. Having the 'write' permission would allow this "
        "request to continue.",
        status=403,
    )


def idempotency_mismatch(key: str) -> ApiError:
    """400 `idempotency_error`: same key, different parameters or endpoint."""
    return error(
        400,
        "idempotency_error",
        "Keys for idempotent requests can only be used with the same parameters they were first "
        f"used with. Try using a key other than '{key}' if you meant to execute a different "
        "request.",
    )


def idempotency_in_use(key: str) -> ApiError:
    """409 `idempotency_key_in_use`: the first request with this key is still running."""
    return error(
        409,
        "idempotency_error",
        "There is currently another in-progress request using this Idempotent Key (that "
        "probably means you submitted twice, and the other request is still going through): "
        f"{key}. Please try again later.",
        code="idempotency_key_in_use",
    )


def idempotency_key_too_long(length: int) -> ApiError:
    """400 for a key over Stripe's 255-character limit."""
    return invalid(
        f"Invalid Idempotency-Key: keys can be at most 255 characters long, this one has {length}."
    )


def rate_limited(reason: str) -> ApiError:
    """429 from a limiter, with `Stripe-Rate-Limited-Reason`."""
    return error(
        429, "invalid_request_error", RATE_LIMIT_MESSAGE, code="rate_limit",
        headers=(("Stripe-Should-Retry", "true"), ("Stripe-Rate-Limited-Reason", reason)),
    )


def lock_timeout() -> ApiError:
    """429 `lock_timeout`: no limiter reason; the SDKs are told to retry."""
    return error(429, "invalid_request_error", LOCK_TIMEOUT_MESSAGE, code="lock_timeout",
                 headers=(("Stripe-Should-Retry", "true"),))


def server_error(*, should_retry: bool) -> ApiError:
    """500 `api_error`; `should_retry` sets `Stripe-Should-Retry`."""
    return error(500, "api_error", SERVER_ERROR_MESSAGE,
                 headers=(("Stripe-Should-Retry", "true" if should_retry else "false"),))


def oauth_error(status: int, code: str, description: str) -> ApiError:
    """OAuth errors are flat: `{"error": "invalid_grant", "error_description": ...}`."""
    return ApiError(status, {"error": code, "error_description": description})
