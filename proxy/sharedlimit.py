"""The adaptive limiter's state shared on Redis by every sidecar of one Stripe account.

Stripe counts requests per account, and every pod runs its own sidecar: N limiters that each
learn alone overshoot together (each sees only its own 429s and regrows on its own). With
``ratelimit.shared: redis://...`` they share what matters, with nothing on the request path:

- **The cubic is the fleet's.** When a sidecar's limiter cuts a scope (the account or an
  operation; ``RateLimiter.on_throttle``), it reports the rate Stripe accepted from it just
  before to an atomic server-side script (``THROTTLE``). The first report of an overload
  starts a *cut event*: the fleet's cubic restarts from the reported rate, times
  ``decrease_factor``, on Redis's own clock (``TIME``, so no two sidecars' clocks are
  compared). During the event's hold (``decrease_interval``, at least two sync intervals) the
  other sidecars' reports *join* it instead of cutting again: the event's base becomes the sum
  of what Stripe accepted from each of them (capped by the fleet's rate before the event), so
  one overload cuts the fleet once, from the fleet's accepted rate. A sidecar that learns of an
  event it has not joined (it saw no 429 of its own yet) joins it with its accepted rate.
- **Each sidecar takes a fair share.** Every ``shared_interval`` (0.25 s) each sidecar runs
  one script (``SYNC``) that stores its demand (requests/s its app asked of each adaptive
  scope, refused ones included) and returns the fleet's active scopes and every sidecar's
  demand. The fleet's rate is divided max-min fairly (water-filling) by demand, so a quiet
  replica leaves its share to a busy one; the limiter then paces locally at ``weight`` times
  the fleet's cubic, which it keeps computing between syncs. The shares add up to the fleet's
  rate, so N replicas together converge under the account's limit instead of N times over it.
- **Nothing per request.** Token grants are not fetched from Redis: pacing stays the local
  token bucket (a reservation costs what it cost without a fleet), and the shared part is a
  rate, which changes slowly. While every scope is dormant a sidecar only runs the same
  ``SYNC`` every interval (one round trip, no per-request work), which is how a dormant
  replica learns that the fleet is throttled before its own first 429. The alternative,
  batches of tokens from a shared bucket, is exact to the token but puts Redis's latency and
  availability in front of requests whenever the limit is active; a share of a rate that is
  re-divided four times a second lands within a few percent of it with neither.
- **Redis down**: the round trips fail (bounded by a short socket time-out), nothing waits on
  them, and each limiter simply goes on alone from its last state, learning from its own 429s
  (its cubic stays in fleet units with its last weight, so its share does not jump). The
  sidecar says so: ``store_unreachable`` on ``/diagnosis`` (through
  ``DiagnosisEngine.report_store``), ``stripe_sidecar_ratelimit_shared_up`` 0, one log event;
  ``/ready`` stays ready. Cut reports made while Redis was away are dropped, not replayed late;
  the next sync after Redis returns picks the fleet state up again (or the next cut creates it).

The shared state is keyed by the account, never by the API key: the account id the key check
found (held keys), else a SHA-256 digest of the key the app sends (``identity_of``). Keys are
``stripe-sidecar:ratelimit:{<account>}:state`` (a hash: scope -> JSON of the cubic) and
``...:demand`` (scope and replica -> demand), both in one cluster slot and expiring when the
fleet is quiet. The in-flight bounds (``*-concurrency``) stay per sidecar.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.diagnosis import DiagnosisEngine, redact_url
from proxy.log import Logger
from proxy.ratelimit import RateLimiter, SharedState

__all__ = ["SharedLimit", "fair_weight", "identity_of", "state_key"]

STORE_NAME = "ratelimit.shared"
_EFFECT = "each sidecar limits on its own from its own 429s (its last share of the fleet's rate)"
# A demand report older than this many sync intervals is a replica that left.
_STALE_INTERVALS = 8
# Each replica's demand is padded by this much when shares are divided: headroom to grow
# between two syncs before its share catches up.
_HEADROOM = 1.1
_MIN_WEIGHT = 1e-3
_TIMEOUT = 0.5  # seconds for a connect or an answer; the next interval tries again

_THROTTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local scope, replica, accepted = ARGV[1], ARGV[2], tonumber(ARGV[3])
local mode, event = ARGV[4], ARGV[5]
local beta, c, hold = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local quiet, floor, est = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local raw = redis.call('HGET', KEYS[1], scope)
local s = nil
if raw then s = cjson.decode(raw) end
if s and now - s.last_throttle >= quiet then s = nil end
local function shape(st, w)
  if w < floor then w = floor end
  st.w_max = w
  st.k = (w * (1 - beta) / c) ^ (1 / 3)
end
if s and now < s.hold_until then
  if mode == 'join' and event ~= s.event then
    return cjson.encode({now = now, state = s})
  end
  if mode == 'cut' then s.last_throttle = now end
  if s.contrib[replica] == nil then
    s.contrib[replica] = accepted
    if est > s.est then s.est = est end
    local sum = 0
    for _, v in pairs(s.contrib) do sum = sum + v end
    if s.est > sum then sum = s.est end
    if s.cap > 0 and sum > s.cap then sum = s.cap end
    shape(s, sum)
  end
elseif mode == 'cut' then
  local cap = -1
  if s then
    local d = now - s.start - s.k
    cap = c * d * d * d + s.w_max
    if cap < floor then cap = floor end
  end
  local w = est
  if accepted > w then w = accepted end
  if cap > 0 and w > cap then w = cap end
  s = {event = t[1] .. '.' .. t[2], contrib = {[replica] = accepted}, cap = cap, est = est,
       start = now, hold_until = now + hold, last_throttle = now}
  shape(s, w)
else
  return cjson.encode({now = now, state = s})
end
redis.call('HSET', KEYS[1], scope, cjson.encode(s))
redis.call('PEXPIRE', KEYS[1], math.ceil(quiet * 2000))
return cjson.encode({now = now, state = s})
"""

_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local replica, quiet, stale = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i] .. '\\n' .. replica, ARGV[i + 1] .. ' ' .. now)
end
if #ARGV >= 4 then redis.call('PEXPIRE', KEYS[2], math.ceil(stale * 4000)) end
local scopes = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local s = cjson.decode(flat[i + 1])
  if now - s.last_throttle >= quiet then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    scopes[flat[i]] = s
  end
end
local demands = {}
local d = redis.call('HGETALL', KEYS[2])
for i = 1, #d, 2 do
  local sep = string.find(d[i], '\\n', 1, true)
  local scope, who = string.sub(d[i], 1, sep - 1), string.sub(d[i], sep + 1)
  local sp = string.find(d[i + 1], ' ', 1, true)
  local rate = tonumber(string.sub(d[i + 1], 1, sp - 1))
  local at = tonumber(string.sub(d[i + 1], sp + 1))
  if now - at > stale then
    redis.call('HDEL', KEYS[2], d[i])
  elseif scopes[scope] then
    if not demands[scope] then demands[scope] = {} end
    demands[scope][who] = rate
  end
end
return cjson.encode({now = now, scopes = scopes, demands = demands})
"""


def identity_of(authorization: bytes) -> str | None:
    """The account identity for an ``Authorization`` value: a digest of its API key.

    ``Bearer sk_...`` and ``Basic base64(sk_...:)`` name the same key the same way. The
    digest is one-way (SHA-256 of a long random secret, with a fixed label): the key itself
    never leaves the sidecar.
    """
    scheme, _, value = authorization.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"basic":
        try:
            value = base64.b64decode(value, validate=True).partition(b":")[0]
        except (binascii.Error, ValueError):
            return None
    elif scheme.lower() != b"bearer":
        value = authorization.strip()
    if not value:
        return None
    return "key-" + hashlib.sha256(b"stripe-sidecar ratelimit.shared\0" + value).hexdigest()[:32]


def state_key(identity: str) -> str:
    """The Redis key prefix of one account's shared limiter state (one cluster slot)."""
    return f"stripe-sidecar:ratelimit:{{{identity}}}"


def fair_weight(capacity: float, demands: Mapping[str, float], me: str) -> float:
    """This replica's fraction of ``capacity``, shared max-min fairly by ``demands``.

    Water-filling: replicas asking less than an equal share get what they ask (with headroom);
    the rest share what is left equally. When all ask less than there is, the spare is split
    equally on top, so the shares always add up to ``capacity``.
    """
    if capacity <= 0 or me not in demands:
        return 1.0 / max(1, len(demands) + (me not in demands))
    wants = {r: max(0.0, d) * _HEADROOM for r, d in demands.items()}
    total = sum(wants.values())
    n = len(wants)
    if total <= capacity:
        alloc = wants[me] + (capacity - total) / n
    else:
        left, level = capacity, capacity
        for i, want in enumerate(sorted(wants.values())):
            share = left / (n - i)
            if want > share:
                level = share
                break
            left -= want
        alloc = min(wants[me], level)
    return min(1.0, max(_MIN_WEIGHT, alloc / capacity))


def _cubic(state: Mapping[str, Any], at: float, c: float) -> float:
    d = at - float(state["start"]) - float(state["k"])
    return c * d * d * d + float(state["w_max"])


class SharedLimit:
    """Keeps one sidecar's limiter in step with its fleet's state on Redis (a background task)."""

    def __init__(
        self,
        url: str,
        limiter: RateLimiter,
        *,
        identity: Callable[[], str | None],
        engine: DiagnosisEngine,
        log: Logger,
        registry: CollectorRegistry,
        interval: float = 0.25,
        clock: Callable[[], float],
    ) -> None:
        self.url = url
        self.limiter = limiter
        self.replica = "r-" + os.urandom(6).hex()
        self._identity = identity
        self._engine = engine
        self._log = log
        self._clock = clock
        self.interval = interval
        settings = limiter.settings
        self._hold = max(settings.decrease_interval, 2 * interval)
        # Imported here: a sidecar without a fleet never loads the Redis client (memory, start).
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError

        self._errors = (RedisError, OSError, TimeoutError)
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT,
            # Once more on a fresh connection (Redis restarted); never a wait: the next
            # interval tries again anyway.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )  # fmt: skip
        self._throttle = self._client.register_script(_THROTTLE)
        self._sync = self._client.register_script(_SYNC)
        self._cuts: list[tuple[str, float]] = []
        self._joined: set[tuple[str, str]] = set()  # (scope, event) this replica is counted in
        self._fleet: set[str] = set()  # scopes the fleet shares now, as of the last sync
        self._keys: tuple[str, str] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.up: bool | None = None  # None until the first round trip
        self.error: str | None = None
        self.syncs = 0  # successful syncs (tests poll it)
        self._metrics(registry)
        limiter.on_throttle = self._on_throttle

    def _metrics(self, registry: CollectorRegistry) -> None:
        """The fleet link's own series: up or not, and its round trips by result."""
        self._up_gauge = Gauge(
            "stripe_sidecar_ratelimit_shared_up",
            "1 while the shared rate-limit store (ratelimit.shared) answers, 0 when not.",
            registry=registry,
        )
        self._rounds = Counter(
            "stripe_sidecar_ratelimit_shared_syncs",
            "Round trips to the shared rate-limit store, by result (ok, error).",
            ["result"],
            registry=registry,
        )
        self._ok = self._rounds.labels("ok")
        self._failed = self._rounds.labels("error")

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background task."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop the task and close the connections."""
        self.limiter.on_throttle = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    def status(self) -> dict[str, Any]:
        """For /diagnosis: the store (without a password), whether it answers, the shared scopes."""
        return {
            "url": redact_url(self.url),
            "up": self.up,
            "error": self.error,
            "replica": self.replica,
            "scopes": sorted(self._fleet),
        }

    def _on_throttle(self, scope: str, accepted: float) -> None:
        self._cuts.append((scope, accepted))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end sharing for good
                self._log.event("internal_error", "error", where="ratelimit.shared",
                                error=repr(exc))  # fmt: skip

    # -- one round --------------------------------------------------------------------------------
    async def step(self) -> None:
        """Report cuts, sync demand and the fleet's state, join events; mark the store up/down."""
        identity = self._identity()
        cuts, self._cuts = self._cuts, []
        try:
            if identity is None:
                # No request seen yet: no account to share in. Still say whether Redis answers
                # (a wrong address shows at start, not at the first 429).
                await self._client.ping()
            else:
                prefix = state_key(identity)
                keys = (prefix + ":state", prefix + ":demand")
                if keys != self._keys:
                    self._keys = keys
                    self._joined.clear()
                for scope, accepted in cuts:
                    reply = await self._report(keys, scope, accepted, "cut", "")
                    self._apply_event(scope, reply)
                await self._exchange(keys)
        except self._errors as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A stop that landed inside the client's time-outs: never swallow it.
                raise asyncio.CancelledError() from exc
            self._down(exc)
            return
        self._ok.inc()
        if identity is not None:
            self.syncs += 1
        if self.up is not True:
            self.up = True
            self.error = None
            self._up_gauge.set(1)
            self._engine.report_store(STORE_NAME, self.url, None)
            self._log.event("ratelimit_shared_up", store=redact_url(self.url))

    async def _report(
        self, keys: tuple[str, str], scope: str, accepted: float, mode: str, event: str
    ) -> dict[str, Any]:
        s = self.limiter.settings
        # What the fleet's accepted rate was, seen from here: this replica's part of it over
        # its share (right when the shares are current; the sum of the parts covers the rest).
        estimate = accepted / self.limiter.weight(scope)
        raw = await self._throttle(
            keys=[keys[0]],
            args=[scope, self.replica, f"{accepted:.6f}", mode, event, s.decrease_factor,
                  s.scale_constant, self._hold, s.quiet_period, s.min_rate, f"{estimate:.6f}"],
        )  # fmt: skip
        reply: dict[str, Any] = json.loads(raw)
        return reply

    def _apply_event(self, scope: str, reply: Mapping[str, Any]) -> None:
        state = reply.get("state")
        if isinstance(state, dict):
            self._joined.add((scope, str(state["event"])))

    async def _exchange(self, keys: tuple[str, str]) -> None:
        limiter = self.limiter
        mine = set(limiter.adaptive_scopes()) | self._fleet
        args: list[Any] = [self.replica, limiter.settings.quiet_period,
                           _STALE_INTERVALS * self.interval]  # fmt: skip
        demand = {scope: limiter.demand(scope) for scope in sorted(mine)}
        for scope, rate in demand.items():
            args += [scope, f"{rate:.3f}"]
        raw = await self._sync(keys=list(keys), args=args)
        reply = json.loads(raw)
        now_remote = float(reply["now"])
        offset = self._clock() - now_remote  # this clock minus Redis's, as of the answer
        scopes = reply.get("scopes") or {}
        demands = reply.get("demands") or {}
        c = limiter.settings.scale_constant
        floor = limiter.settings.min_rate
        pending = {scope for scope, _ in self._cuts}  # cut meanwhile: its report goes first
        self._fleet = set(scopes)
        joins = []
        for scope, st in scopes.items():
            if scope in pending:
                continue
            wants = dict(demands.get(scope) or {})
            wants.setdefault(self.replica, demand.get(scope, limiter.demand(scope)))
            weight = fair_weight(max(floor, _cubic(st, now_remote, c)), wants, self.replica)
            limiter.apply_shared(
                scope,
                SharedState(
                    w_max=float(st["w_max"]),
                    k=float(st["k"]),
                    start=float(st["start"]) + offset,
                    hold_until=float(st["hold_until"]) + offset,
                    last_throttle=float(st["last_throttle"]) + offset,
                    weight=weight,
                ),
            )
            event = str(st["event"])
            if (scope, event) not in self._joined and now_remote < float(st["hold_until"]):
                joins.append((scope, event))
        for scope, event in joins:
            self._joined.add((scope, event))
            await self._report(keys, scope, limiter.accepted(scope), "join", event)
        if len(self._joined) > 1024:  # events long gone; bounded memory
            self._joined = {j for j in self._joined if j[0] in self._fleet}

    def _down(self, exc: BaseException) -> None:
        self._failed.inc()
        error = f"{type(exc).__name__}: {exc}"[:200]
        self.error = error
        self._engine.report_store(STORE_NAME, self.url, error, effect=_EFFECT)
        if self.up is not False:
            self.up = False
            self._up_gauge.set(0)
            self._log.event("ratelimit_shared_down", "warning", store=redact_url(self.url),
                            error=error)  # fmt: skip
