"""The outbox on Redis, for a fleet: any replica can deliver any item, none twice.

Every state change is one atomic Lua script (claim and acknowledge, with fencing), so two
replicas never hold one item and a deliverer whose lease ran out cannot overwrite the result of
the one that claimed the item after it. Redis Streams with consumer groups were the other
candidate (``XADD`` / ``XREADGROUP`` / ``XACK`` / ``XAUTOCLAIM``); the contract needs more than
a stream gives: a due time per item (backoff between rounds), items of one Stripe object handed
out one at a time in order, a lease checked on settle, operator retry and drop, and counts by
state. Those are sorted sets and hashes kept consistent by the scripts:

- ``item:<id>`` a hash (the request, its state, lease, owner, result), ``trail:<id>`` a list
  (the audit trail, kept after a drop), ``keys`` (scope + Idempotency-Key -> id: a second put
  of one key returns the first item);
- ``queued`` (id by ``next_at``) and ``leased`` (id by ``lease_until``): what a claim may take,
  due ones oldest first (``seq``, a counter); ``order:<order_key>`` (active items of one object
  by ``seq``): only its head is handed out;
- ``all``, ``state:<state>``, ``op:<operation>`` (by ``seq``) for listing and counting,
  ``queued_received`` (by ``received_at``) for the oldest item's age, ``final`` (by
  ``updated_at``) and ``dropped`` for pruning.

Every key starts with ``stripe-sidecar:outbox:{o}:`` (one hash tag: one cluster slot).

**Durability**: a put is acknowledged once Redis has applied it, so it survives any sidecar
(SIGKILL included). To survive a crash of Redis itself the operator must run it with
``appendonly yes`` and ``appendfsync always`` (``everysec`` can lose the last second of
acknowledged writes on a Redis crash or power loss; RDB snapshots alone lose far more), and
``maxmemory-policy noeviction`` (an evicting Redis would silently drop queued writes). At open
the store reads ``INFO persistence``: :attr:`RedisStore.durable` is False when the append-only
file is off. Items left ``delivering`` by a replica that died are claimed by another once their
lease runs out; nothing is reset at open, since other replicas may hold live leases.

Times are passed in (wall seconds) and stored as Python's exact ``repr`` of the float; the
scripts never compute a time, so nothing is rounded through Lua's number formatting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from proxy.outbox.store import (
    Item,
    NewItem,
    NotAllowed,
    Result,
    State,
    StoreError,
    Transition,
    redact_url,
)

__all__ = ["PREFIX", "RedisStore"]

PREFIX = "stripe-sidecar:outbox:{o}:"
_CONNECT_TIMEOUT = 2.0
_TIMEOUT = 5.0  # a put waits at most this long before the app gets the failure answer
_CONNECTIONS = 16

# Shared Lua: move an item between the state sets; the trail entry.
_LIB = """
local p = KEYS[1]
local function trail(id, at, old, new, why)
  redis.call('RPUSH', p .. 'trail:' .. id, cjson.encode({at, old or '', new, why}))
end
local function restate(id, seq, old, new)
  redis.call('ZREM', p .. 'state:' .. old, id)
  redis.call('ZADD', p .. 'state:' .. new, seq, id)
end
"""

_PUT = _LIB + """
local id, kf, order_key, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local received = ARGV[5]
local existing = redis.call('HGET', p .. 'keys', kf)
if existing then
  return {0, redis.call('HGETALL', p .. 'item:' .. existing)}
end
local seq = redis.call('INCR', p .. 'seq')
local ik = p .. 'item:' .. id
redis.call('HSET', ik, 'seq', seq, unpack(ARGV, 6))
redis.call('HSET', p .. 'keys', kf, id)
redis.call('ZADD', p .. 'queued', received, id)
redis.call('ZADD', p .. 'queued_received', received, id)
redis.call('ZADD', p .. 'all', seq, id)
redis.call('ZADD', p .. 'state:queued', seq, id)
redis.call('ZADD', p .. 'op:' .. op, seq, id)
if order_key ~= '' then redis.call('ZADD', p .. 'order:' .. order_key, seq, id) end
trail(id, received, nil, 'queued', 'queued')
return {1, redis.call('HGETALL', ik)}
"""

_CLAIM = _LIB + """
local now, lease_until, limit, owner = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local cands = redis.call('ZRANGEBYSCORE', p .. 'queued', '-inf', now)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'leased', '-inf', now)) do
  table.insert(cands, id)
end
local seqs = {}
for _, id in ipairs(cands) do
  seqs[id] = tonumber(redis.call('HGET', p .. 'item:' .. id, 'seq'))
end
table.sort(cands, function(a, b) return seqs[a] < seqs[b] end)
local out = {}
for _, id in ipairs(cands) do
  if #out >= limit then break end
  local ik = p .. 'item:' .. id
  local key = redis.call('HGET', ik, 'order_key')
  local head = true
  if key then head = redis.call('ZRANGE', p .. 'order:' .. key, 0, 0)[1] == id end
  if head then
    local old = redis.call('HGET', ik, 'state')
    redis.call('ZREM', p .. 'queued', id)
    redis.call('ZREM', p .. 'queued_received', id)
    redis.call('ZADD', p .. 'leased', lease_until, id)
    restate(id, seqs[id], old, 'delivering')
    redis.call('HSET', ik, 'state', 'delivering', 'owner', owner, 'lease_until', lease_until,
               'updated_at', now, 'reason', 'claimed')
    local why = 'claimed'
    if old ~= 'queued' then why = 'claimed again: lease ran out' end
    trail(id, now, old, 'delivering', why)
    table.insert(out, redis.call('HGETALL', ik))
  end
end
return out
"""

_SETTLE = _LIB + """
local id, owner, state, at, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local sent, next_at, has_result = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local ik = p .. 'item:' .. id
local cur = redis.call('HMGET', ik, 'state', 'owner', 'seq', 'order_key', 'received_at')
if cur[1] ~= 'delivering' or cur[2] ~= owner then return false end
local seq = cur[3]
redis.call('ZREM', p .. 'leased', id)
restate(id, seq, 'delivering', state)
redis.call('HSET', ik, 'state', state, 'owner', '', 'lease_until', '0', 'next_at', next_at,
           'updated_at', at, 'reason', reason)
redis.call('HINCRBY', ik, 'attempts', sent)
if sent > 0 then redis.call('HINCRBY', ik, 'rounds', 1) end
redis.call('HDEL', ik, 'result_status', 'result_body', 'result_request_id')
if has_result == '1' then
  redis.call('HSET', ik, 'result_status', ARGV[9], 'result_body', ARGV[10])
  if ARGV[11] ~= '' then redis.call('HSET', ik, 'result_request_id', ARGV[12]) end
end
if state == 'queued' then
  redis.call('ZADD', p .. 'queued', next_at, id)
  redis.call('ZADD', p .. 'queued_received', cur[5], id)
else
  redis.call('ZADD', p .. 'final', at, id)
  if cur[4] then redis.call('ZREM', p .. 'order:' .. cur[4], id) end
end
trail(id, at, 'delivering', state, reason)
return redis.call('HGETALL', ik)
"""

_RETRY = _LIB + """
local id, at, reason = ARGV[1], ARGV[2], ARGV[3]
local ik = p .. 'item:' .. id
local cur = redis.call('HMGET', ik, 'state', 'seq', 'order_key', 'received_at')
if not cur[1] then return false end
if cur[1] ~= 'queued' and cur[1] ~= 'failed' then return {'not_allowed', cur[1]} end
if cur[1] == 'failed' then
  redis.call('ZREM', p .. 'final', id)
  if cur[3] then redis.call('ZADD', p .. 'order:' .. cur[3], cur[2], id) end
  restate(id, cur[2], 'failed', 'queued')
end
redis.call('ZADD', p .. 'queued', at, id)
redis.call('ZADD', p .. 'queued_received', cur[4], id)
redis.call('HSET', ik, 'state', 'queued', 'next_at', at, 'updated_at', at, 'reason', reason)
trail(id, at, cur[1], 'queued', reason)
return {'ok', redis.call('HGETALL', ik)}
"""

_FORGET = """
local function forget(id)
  local ik = p .. 'item:' .. id
  local cur = redis.call('HMGET', ik, 'state', 'scope', 'idempotency_key', 'operation',
                         'order_key')
  if not cur[1] then return end
  redis.call('HDEL', p .. 'keys', cur[2] .. '\\n' .. cur[3])
  for _, z in ipairs({'queued', 'queued_received', 'leased', 'all', 'final'}) do
    redis.call('ZREM', p .. z, id)
  end
  redis.call('ZREM', p .. 'state:' .. cur[1], id)
  redis.call('ZREM', p .. 'op:' .. cur[4], id)
  if cur[5] then redis.call('ZREM', p .. 'order:' .. cur[5], id) end
  redis.call('DEL', ik)
end
"""

_DROP = _LIB + _FORGET + """
local id, at, reason = ARGV[1], ARGV[2], ARGV[3]
local ik = p .. 'item:' .. id
local item = redis.call('HGETALL', ik)
if #item == 0 then return false end
local state = redis.call('HGET', ik, 'state')
if state == 'delivering' then return {'not_allowed', state} end
forget(id)
trail(id, at, state, 'dropped', reason)
redis.call('ZADD', p .. 'dropped', at, id)
return {'ok', item}
"""

_PRUNE = _LIB + _FORGET + """
local before = '(' .. ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'final', '-inf', before)
for _, id in ipairs(ids) do
  forget(id)
  redis.call('DEL', p .. 'trail:' .. id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'dropped', '-inf', before)) do
  redis.call('DEL', p .. 'trail:' .. id)
  redis.call('ZREM', p .. 'dropped', id)
end
return #ids
"""

_ITEMS = """
local p = KEYS[1]
local state, op, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local source = p .. 'all'
if state ~= '' then
  source = p .. 'state:' .. state
elseif op ~= '' then
  source = p .. 'op:' .. op
end
local out = {}
local start = 0
while #out < limit do
  local ids = redis.call('ZRANGE', source, start, start + 99)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #out >= limit then break end
    if op == '' or redis.call('HGET', p .. 'item:' .. id, 'operation') == op then
      table.insert(out, redis.call('HGETALL', p .. 'item:' .. id))
    end
  end
  start = start + 100
end
return out
"""

_COUNT_OP = """
local p = KEYS[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGE', p .. 'op:' .. ARGV[1], 0, -1)) do
  local state = redis.call('HGET', p .. 'item:' .. id, 'state')
  out[#out + 1] = state
end
return out
"""

_STATES = tuple(State)


def _reraise_cancel(exc: BaseException) -> None:
    """Raise CancelledError if the task was cancelled while the client was at work.

    A cancellation that lands inside the client's own time-outs can come out as a
    TimeoutError or ConnectionError; turned into a StoreError it would be swallowed by a
    caller that retries, and a task being stopped would never end.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


def _fields(new: NewItem) -> list[bytes | str]:
    """The hash fields of a new item, as flat name/value pairs (no seq: the script adds it)."""
    pairs: list[bytes | str] = [
        "id", new.id, "operation", new.operation, "idempotency_key", new.idempotency_key,
        "scope", new.scope, "fingerprint", new.fingerprint, "method", new.method,
        "target", new.target, "headers", new.headers, "body", new.body,
        "received_at", repr(new.received_at), "expires_at", repr(new.expires_at),
        "attempts", str(new.attempts), "state", "queued", "rounds", "0",
        "next_at", repr(new.received_at), "lease_until", "0", "owner", "",
        "updated_at", repr(new.received_at), "reason", "queued",
    ]  # fmt: skip
    if new.order_key is not None:
        pairs += ["order_key", new.order_key]
    return pairs


def _item(flat: Sequence[bytes]) -> Item:
    """An item from a flat HGETALL answer."""
    h = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    def text(name: str) -> str:
        return h[name].decode()

    result = None
    if "result_status" in h:
        rid = h.get("result_request_id")
        result = Result(int(h["result_status"]), bytes(h.get("result_body", b"")),
                        rid.decode() if rid is not None else None)  # fmt: skip
    order_key = h.get("order_key")
    return Item(
        id=text("id"), operation=text("operation"), idempotency_key=text("idempotency_key"),
        scope=text("scope"), fingerprint=text("fingerprint"),
        order_key=order_key.decode() if order_key is not None else None,
        method=text("method"), target=text("target"), headers=bytes(h["headers"]),
        body=bytes(h["body"]), received_at=float(h["received_at"]),
        expires_at=float(h["expires_at"]), attempts=int(h["attempts"]), state=State(text("state")),
        rounds=int(h["rounds"]), next_at=float(h["next_at"]),
        lease_until=float(h["lease_until"]), owner=text("owner"),
        updated_at=float(h["updated_at"]), reason=text("reason"), result=result,
    )  # fmt: skip


_WHY_NOT_RETRY = {
    "delivering": "it is being delivered now",
    "delivered": "Stripe performed it already",
    "expired": "its Idempotency-Key is past Stripe's idempotency window: a resend could "
    "perform it twice",
}


class RedisStore:
    """An :class:`~proxy.outbox.store.OutboxStore` on Redis, shared by every replica."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.durable: bool | None = None  # the append-only file is on (None: not told)
        # A burst of puts waits its turn for one of a few connections (up to the time-out)
        # instead of opening one each.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_CONNECTIONS,
            timeout=_TIMEOUT,
            socket_timeout=_TIMEOUT,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            # Once more on a fresh connection when a pooled one is dead (Redis restarted): every
            # script is safe to run twice (a put finds its key; a second settle is refused by
            # the owner check). Time-outs are not retried: the caller's answer must not wait.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._keys = [PREFIX]
        c = self._client
        self._put = c.register_script(_PUT)
        self._claim = c.register_script(_CLAIM)
        self._settle = c.register_script(_SETTLE)
        self._retry = c.register_script(_RETRY)
        self._drop = c.register_script(_DROP)
        self._prune = c.register_script(_PRUNE)
        self._items = c.register_script(_ITEMS)
        self._count_op = c.register_script(_COUNT_OP)

    @classmethod
    async def open(cls, url: str, *, now: float) -> RedisStore:
        """Connect and check the server answers; StoreError (no password shown) if not."""
        store = cls(url)
        try:
            await store.ping()
            info = await store._call(store._client.info("persistence"))
            store.durable = bool(int(info.get("aof_enabled", 0)))
        except BaseException:
            await store._client.aclose()
            raise
        return store

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError, TimeoutError) as exc:
            _reraise_cancel(exc)
            raise StoreError(f"redis {redact_url(self.url)}: {type(exc).__name__}: {exc}") from None

    async def put(self, item: NewItem) -> tuple[Item, bool]:
        """Store a new item (due at once); the stored one when its key is known already."""
        created, flat = await self._call(self._put(
            keys=self._keys,
            args=[item.id, f"{item.scope}\n{item.idempotency_key}", item.order_key or "",
                  item.operation, repr(item.received_at), *_fields(item)],
        ))  # fmt: skip
        return _item(flat), bool(created)

    async def claim(self, now: float, lease: float, limit: int, owner: str) -> list[Item]:
        """Due items, oldest first, as delivering under ``owner`` until ``now + lease``."""
        rows = await self._call(self._claim(
            keys=self._keys, args=[repr(now), repr(now + lease), limit, owner]
        ))  # fmt: skip
        return [_item(flat) for flat in rows]

    async def _settle_item(
        self, item_id: str, owner: str, state: State, at: float, reason: str, sent: int,
        next_at: float, result: Result | None,
    ) -> Item | None:  # fmt: skip
        args: list[Any] = [item_id, owner, state.value, repr(at), reason, sent, repr(next_at)]
        if result is None:
            args += ["0"]
        else:
            rid = result.request_id
            args += ["1", result.status, result.body, "1" if rid is not None else "", rid or ""]
        flat = await self._call(self._settle(keys=self._keys, args=args))
        return _item(flat) if flat else None

    async def release(
        self, item_id: str, owner: str, *, at: float, next_at: float, reason: str, sent: int
    ) -> Item | None:
        """Back to queued until ``next_at`` (only by the claim's owner)."""
        return await self._settle_item(item_id, owner, State.QUEUED, at, reason, sent, next_at,
                                       None)  # fmt: skip

    async def complete(
        self,
        item_id: str,
        owner: str,
        state: State,
        *,
        at: float,
        reason: str,
        sent: int,
        result: Result | None,
    ) -> Item | None:
        """To a final state with Stripe's answer (only by the claim's owner)."""
        if state not in (State.DELIVERED, State.FAILED, State.EXPIRED):
            raise ValueError(f"{state} is not a final state")
        return await self._settle_item(item_id, owner, state, at, reason, sent, at, result)

    async def get(self, item_id: str) -> Item | None:
        """One item, or None."""
        flat = await self._call(self._client.hgetall(PREFIX + "item:" + item_id))
        if not flat:
            return None
        return _item([x for kv in flat.items() for x in kv])

    async def history(self, item_id: str) -> list[Transition]:
        """The audit trail, oldest first."""
        rows = await self._call(self._client.lrange(PREFIX + "trail:" + item_id, 0, -1))
        out = []
        for raw in rows:
            at, old, new, why = json.loads(raw)
            out.append(Transition(float(at), old or None, new, why))
        return out

    async def items(
        self, *, state: State | None = None, operation: str | None = None, limit: int = 100
    ) -> list[Item]:
        """Items oldest first, filtered."""
        rows = await self._call(self._items(
            keys=self._keys,
            args=[state.value if state is not None else "", operation or "", limit],
        ))  # fmt: skip
        return [_item(flat) for flat in rows]

    async def counts(self, *, operation: str | None = None) -> Mapping[State, int]:
        """Items per state (every state, 0 included)."""
        if operation is None:
            async with self._client.pipeline(transaction=False) as pipe:
                for s in _STATES:
                    pipe.zcard(PREFIX + "state:" + s.value)
                sizes = await self._call(pipe.execute())
            return {s: int(n) for s, n in zip(_STATES, sizes, strict=True)}
        out = dict.fromkeys(State, 0)
        for raw in await self._call(self._count_op(keys=self._keys, args=[operation])):
            out[State(raw.decode())] += 1
        return out

    async def oldest_queued(self) -> float | None:
        """When the oldest queued item was received."""
        first = await self._call(
            self._client.zrange(PREFIX + "queued_received", 0, 0, withscores=True)
        )
        return float(first[0][1]) if first else None

    async def retry(self, item_id: str, *, at: float, reason: str) -> Item | None:
        """Queue a queued or failed item again, due at ``at``."""
        answer = await self._call(self._retry(keys=self._keys, args=[item_id, repr(at), reason]))
        if not answer:
            return None
        if answer[0] == b"not_allowed":
            raise NotAllowed(_WHY_NOT_RETRY.get(answer[1].decode(), "not now"))
        return _item(answer[1])

    async def drop(self, item_id: str, *, at: float, reason: str) -> Item | None:
        """Delete an item; the audit trail records the drop."""
        answer = await self._call(self._drop(keys=self._keys, args=[item_id, repr(at), reason]))
        if not answer:
            return None
        if answer[0] == b"not_allowed":
            raise NotAllowed("it is being delivered now; drop it once the round is over")
        return _item(answer[1])

    async def prune(self, before: float) -> int:
        """Delete final items last changed before ``before``, with their trails; how many."""
        return int(await self._call(self._prune(keys=self._keys, args=[repr(before)])))

    async def ping(self) -> None:
        """Raise StoreError unless Redis answers."""
        try:
            await self._call(self._client.ping())
        except ResponseError as exc:  # e.g. NOAUTH: reachable, but refuses us
            raise StoreError(f"redis {redact_url(self.url)}: {exc}") from None

    async def close(self) -> None:
        """Close the connections."""
        await self._client.aclose()
