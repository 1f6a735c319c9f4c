"""The aiohttp shell: the only module that touches requests, responses and sockets.

One pass per request: count it; outage and edge faults (load balancer, limiter, resets);
auth; parse; idempotency; run the endpoint (after `slow`/`work_seconds`); save; answer, or
reset the connection for `drop_after`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from aiohttp import BodyPartReader, web

from proxy.simulator import errors
from proxy.simulator.auth import key_from_header, livemode
from proxy.simulator.call import Call, Outcome, ref_of
from proxy.simulator.errors import ApiError
from proxy.simulator.faults import (
    EDGE_FAULTS,
    FaultKind,
    FaultProfile,
    profile_as_dict,
    profile_from_mapping,
)
from proxy.simulator.files import Upload
from proxy.simulator.forms import nest, parse_form
from proxy.simulator.idempotency import MAX_KEY_LENGTH, Lookup
from proxy.simulator.routes import Route, match
from proxy.simulator.state import SimState

SIMULATOR: Final = web.AppKey("simulator", SimState)

JSON: Final = "application/json"
MAX_BODY: Final = 64 * 1024 * 1024  # Stripe accepts uploads well past aiohttp's 1 MiB default

_HTML: Final[dict[int, bytes]] = {
    status: (
        f"<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()
    for status, title in ((502, "Bad Gateway"), (503, "Service Temporarily Unavailable"),
                          (504, "Gateway Time-out"))
}
_HTML_FAULTS: Final[dict[str, int]] = {"html_502": 502, "html_503": 503, "gateway_504": 504}


def create_app(profile: FaultProfile | str = "none", *, seed: int = 0) -> web.Application:
    """A Stripe-shaped aiohttp application with the given fault profile and seed."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SIMULATOR] = SimState(profile, seed=seed)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


def _fingerprint_default(value: object) -> str:
    if isinstance(value, Upload):
        return value.fingerprint()
    raise TypeError(type(value).__name__)


# Built once: json.dumps with options constructs a new encoder on every call.
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode
_FINGERPRINT: Final = json.JSONEncoder(separators=(",", ":"), sort_keys=True,
                                       default=_fingerprint_default).encode


def _dumps(body: Any) -> bytes:
    return _ENCODE(body).encode()


def _respond(status: int, body: bytes, headers: dict[str, str],
             content_type: str = JSON) -> web.Response:
    headers["Content-Type"] = content_type
    return web.Response(status=status, body=body, headers=headers)


def _html(status: int) -> web.Response:
    return web.Response(status=status, body=_HTML[status],
                        headers={"Content-Type": "text/html"})


def _abort(request: web.Request) -> web.Response:
    """Reset the connection without an answer.

    The returned response is never written: aiohttp notices the closed transport and
    drops it quietly, where raising would log a traceback for every simulated reset.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=204)


async def _handle(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    path = request.path
    if path.startswith("/_sim/"):
        return await _control(request, sim)
    method = request.method
    found = match(method, path)
    sim.books.record_request(found[0].operation if found else f"{method} unrecognized")
    profile = sim.profile
    early, fault = _before_executing(request, sim, found[0].operation if found else None)
    if early is not None:
        return early
    request_id = sim.store.new_id("req")
    headers = {"Request-Id": request_id}
    version = request.headers.get("Stripe-Version")
    if version is not None:
        headers["Stripe-Version"] = version
    # Keys only matter on POST (v1 GET and DELETE are idempotent anyway); empty means none.
    idem_key = (request.headers.get("Idempotency-Key") or None) if method == "POST" else None
    if idem_key is not None:
        headers["Idempotency-Key"] = idem_key
    try:
        key = key_from_header(request.headers.get("Authorization"))
        if found is None:
            sim.keys.check(key, writes=False)
            raise errors.unrecognized_url(method, path)
        route, ids = found
        params = await _params(request, route)
        if key is None and route.template == "/oauth/token":
            secret = params.pop("client_secret", None)  # OAuth also takes the key in the form
            key = secret if isinstance(secret, str) else None
        key = sim.keys.check(key, writes=route.writes)
        sim.scenarios.check(route.operation)
        call = Call(ids, params, livemode(key), f"{request.scheme}://{request.host}", request_id,
                    sim.keys.account_of(key))
        if idem_key is None:
            if fault == "server_error_saved":
                raise errors.server_error(should_retry=False)
            outcome = await _execute(sim, profile, route, call, fault)
            response = _outcome_response(outcome, headers)
        else:
            response = await _idempotent(sim, profile, route, call, fault, key, idem_key,
                                         path, headers)
    except ApiError as err:
        inner = err.body.get("error")
        if isinstance(inner, dict) and err.status != 401:  # no account, no dashboard log
            live = "_live_" in request.headers.get("Authorization", "")
            inner.setdefault("request_log_url", errors.request_log_url(
                request_id, sim.store.now(), livemode=live))
        headers.update(err.headers)
        return _respond(err.status, _dumps(err.body), headers)
    if fault == "drop_after":
        return _abort(request)
    return response


def _before_executing(
    request: web.Request, sim: SimState, operation: str | None
) -> tuple[web.StreamResponse | None, FaultKind | None]:
    """What happens before Stripe looks at a request: an outage, a rate limit, a drawn fault.

    Returns the answer that ends the request here (or None) and the fault drawn for it.
    """
    if sim.profile.outage:
        sim.books.record_fault("outage")
        return _html(503), None
    if sim.limits.enabled:
        limited = _rate_limit(request, sim, operation)
        if limited is not None:
            return limited, None
    fault = sim.draw_fault()
    if fault is not None:
        sim.books.record_fault(fault)
        if fault in EDGE_FAULTS:
            return _edge_fault(request, sim, fault), fault
    return None, fault


def _rate_limit(request: web.Request, sim: SimState, operation: str | None) -> web.Response | None:
    """Stripe's rate limiters: the 429 this request gets (booked), or None if it may pass."""
    account = key_from_header(request.headers.get("Authorization")) or ""
    reason = sim.limits.check(account, operation)
    if reason is None:
        return None
    sim.books.record_rate_limited(reason)
    return _early_error(request, sim, errors.rate_limited(reason))


def _edge_fault(request: web.Request, sim: SimState, fault: FaultKind) -> web.StreamResponse:
    """Answer a fault that strikes before the API runs (nothing executes or is saved)."""
    if fault == "drop_before":
        return _abort(request)
    status = _HTML_FAULTS.get(fault)
    if status is not None:
        return _html(status)
    if fault == "rate_limited":
        err = errors.rate_limited(sim.rate_limited_reason())
    elif fault == "lock_timeout":
        err = errors.lock_timeout()
    else:
        err = errors.server_error(should_retry=True)
    return _early_error(request, sim, err)


def _early_error(request: web.Request, sim: SimState, err: ApiError) -> web.Response:
    """Answer an error raised before the API runs (a limiter, the edge): nothing is saved."""
    headers = {"Request-Id": sim.store.new_id("req"), **dict(err.headers)}
    version = request.headers.get("Stripe-Version")
    if version is not None:
        headers["Stripe-Version"] = version
    if request.method == "POST" and "Idempotency-Key" in request.headers:
        headers["Idempotency-Key"] = request.headers["Idempotency-Key"]
    return _respond(err.status, _dumps(err.body), headers)


async def _execute(sim: SimState, profile: FaultProfile, route: Route, call: Call,
                   fault: FaultKind | None) -> Outcome:
    """Wait out `slow`/`work_seconds`, run the endpoint, and book its side effect."""
    delay = profile.slow_seconds if fault == "slow" else 0.0
    if route.writes:
        delay += profile.work_seconds
    if delay:
        await asyncio.sleep(delay)
    outcome = route.endpoint(sim.store, call)
    if outcome.wrote:
        sim.books.record_write(ref_of(call.params))
    return outcome


def _outcome_response(outcome: Outcome, headers: dict[str, str]) -> web.Response:
    body = outcome.body if isinstance(outcome.body, bytes) else _dumps(outcome.body)
    return _respond(outcome.status, body, headers, outcome.content_type)


async def _idempotent(sim: SimState, profile: FaultProfile, route: Route, call: Call,
                      fault: FaultKind | None, key: str, idem_key: str, path: str,
                      headers: dict[str, str]) -> web.Response:
    """Run a POST under an idempotency key, with Stripe's save-and-replay rules."""
    if len(idem_key) > MAX_KEY_LENGTH:
        raise errors.idempotency_key_too_long(len(idem_key))
    fingerprint = _FINGERPRINT([path, call.params])
    state, saved = sim.idempotency.lookup(key, idem_key, fingerprint)
    if state is Lookup.IN_FLIGHT:
        raise errors.idempotency_in_use(idem_key)
    if state is Lookup.MISMATCH:
        raise errors.idempotency_mismatch(idem_key)
    if state is Lookup.REPLAY and saved is not None:
        # As on Stripe: this request keeps its own Request-Id; Original-Request names the
        # request whose answer is replayed.
        sim.books.replays += 1
        headers.update(saved.headers)
        headers["Original-Request"] = saved.request_id
        headers["Idempotent-Replayed"] = "true"
        return _respond(saved.status, saved.body, headers, saved.content_type)

    sim.idempotency.begin(key, idem_key, fingerprint)
    extra: tuple[tuple[str, str], ...] = ()
    try:
        if fault == "server_error_saved":
            err = errors.server_error(should_retry=False)
            outcome = Outcome.failed(err)
            extra = err.headers
        else:
            outcome = await _execute(sim, profile, route, call, fault)
    except BaseException:
        # Validation failed (ApiError) or the run was cancelled: nothing began, nothing saved.
        sim.idempotency.abandon(key, idem_key)
        raise
    body = outcome.body if isinstance(outcome.body, bytes) else _dumps(outcome.body)
    sim.idempotency.finish(key, idem_key, status=outcome.status, body=body,
                           content_type=outcome.content_type, request_id=call.request_id,
                           headers=extra)
    headers.update(extra)
    headers["Original-Request"] = call.request_id
    return _respond(outcome.status, body, headers, outcome.content_type)


async def _params(request: web.Request, route: Route) -> dict[str, Any]:
    """Parse the request's parameters the way its route sends them."""
    if route.body == "query":
        return parse_form(request.query_string)
    if route.body == "form":
        raw = await request.read()
        return parse_form(raw.decode("utf-8", "replace"))
    if route.body == "json":
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise errors.invalid("Invalid JSON body.") from None
        if not isinstance(data, dict):
            raise errors.invalid("The request body must be a JSON object.")
        return data
    if not request.content_type.startswith("multipart/"):
        raw = await request.read()
        return parse_form(raw.decode("utf-8", "replace"))
    pairs: list[tuple[str, str]] = []
    uploads: dict[str, Upload] = {}
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue
        if part.filename is not None:
            uploads[part.name] = Upload(part.filename, bytes(await part.read()))
        else:
            pairs.append((part.name, await part.text()))
    params = nest(pairs)
    params.update(uploads)
    return params


async def _control(request: web.Request, sim: SimState) -> web.Response:
    """The `/_sim/*` endpoints tests and benchmarks use; never faulted, never counted."""
    route = (request.method, request.path)
    try:
        if route == ("GET", "/_sim/books"):
            return _control_json(sim.books_dict())
        if route == ("POST", "/_sim/reset"):
            sim.reset()
            return _control_json({"reset": True})
        if route == ("GET", "/_sim/faults"):
            return _control_json({"seed": sim.seed, **profile_as_dict(sim.profile)})
        if route == ("POST", "/_sim/faults"):
            data = await _json_object(request)
            seed = data.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise ValueError(f"seed: {seed!r} is not an integer")
            sim.set_profile(profile_from_mapping(data), seed=seed)
            return _control_json({"seed": sim.seed, **profile_as_dict(sim.profile)})
        if route == ("POST", "/_sim/keys/revoke"):
            data = await _json_object(request)
            key = data.get("key")
            if not isinstance(key, str) or not key:
                raise ValueError("key: a non-empty string is required")
            sim.keys.revoke(key)
            return _control_json({"revoked": errors.mask_key(key)})
        if route == ("POST", "/_sim/keys/restore"):
            key = (await _json_object(request)).get("key")
            if not isinstance(key, str) or not key:
                raise ValueError("key: a non-empty string is required")
            sim.keys.revoked.discard(key)
            return _control_json({"restored": errors.mask_key(key)})
        if route == ("POST", "/_sim/keys/account"):
            data = await _json_object(request)
            key, acct = data.get("key"), data.get("account")
            if not isinstance(key, str) or not key or not isinstance(acct, str) or not acct:
                raise ValueError("key, account: non-empty strings are required")
            sim.keys.accounts[key] = acct
            return _control_json({"key": errors.mask_key(key), "account": acct})
        if route == ("POST", "/_sim/scenarios/bad_requests"):
            return _control_json(sim.scenarios.set_bad_requests(await _json_object(request)))
        if route == ("GET", "/_sim/scenarios"):
            return _control_json(sim.scenarios.as_dict())
    except ValueError as exc:
        return _control_json({"error": str(exc)}, status=400)
    return _control_json({"error": f"no simulator endpoint {request.method} {request.path}"},
                         status=404)


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise ValueError("body: not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body: a JSON object is required")
    return data


def _control_json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(body), headers={"Content-Type": JSON})
