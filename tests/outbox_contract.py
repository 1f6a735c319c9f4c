"""The contract every outbox store (``proxy.outbox.store.OutboxStore``) must keep.

A backend's test module imports these tests and provides one fixture, ``outbox_url``: the URL
of a fresh, empty store for each test (``sqlite:///<tmp>/outbox.db``, ``redis://.../<db>``)::

    from outbox_contract import *  # noqa: F403

    @pytest.fixture
    def outbox_url(tmp_path): return f"sqlite:///{tmp_path}/outbox.db"

Times are plain numbers passed in (the store reads no clock), so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.outbox import (
    NewItem,
    NotAllowed,
    OutboxStore,
    Result,
    State,
    open_store,
)

__all__ = [
    "new_item",
    "store",
    "test_claim_hands_out_due_items_oldest_first",
    "test_claim_skips_items_not_yet_due",
    "test_claim_waits_for_earlier_items_of_the_same_order_key",
    "test_complete_and_release_need_the_claims_owner",
    "test_complete_keeps_stripes_answer",
    "test_counts_and_filters_by_state_and_operation",
    "test_drop_deletes_and_audits",
    "test_drop_refuses_an_item_being_delivered",
    "test_expired_lease_is_claimed_again",
    "test_history_is_the_audit_trail",
    "test_many_concurrent_puts_are_all_stored",
    "test_oldest_queued",
    "test_prune_deletes_old_final_items_only",
    "test_put_is_durable_across_reopen",
    "test_put_returns_the_item_queued",
    "test_put_same_key_returns_the_stored_item",
    "test_release_requeues_with_attempts_counted",
    "test_retry_rules",
    "test_same_key_in_two_scopes_is_two_items",
]

T0 = 1_800_000_000.0  # a wall-clock time; stores never read a clock themselves
DAY = 86400.0


def new_item(**over: Any) -> NewItem:
    """A queued-write description with sensible defaults; ``over`` replaces fields."""
    fields: dict[str, Any] = {
        "id": "qr_" + uuid.uuid4().hex,
        "operation": "POST /v1/customers",
        "idempotency_key": "key-" + uuid.uuid4().hex,
        "scope": "acct-a",
        "fingerprint": "fp-1",
        "order_key": None,
        "method": "POST",
        "target": "/v1/customers",
        "headers": b"Authorization: Bearer sk_test_x\r\nIdempotency-Key: k\r\n",
        "body": b"email=a%40example.com&metadata[ref]=r1",
        "received_at": T0,
        "expires_at": T0 + DAY - 3600,
        "attempts": 2,
    }
    fields.update(over)
    return NewItem(**fields)


@pytest.fixture
async def store(outbox_url: str) -> AsyncIterator[OutboxStore]:
    """A fresh store of the backend under test."""
    s = await open_store(outbox_url, now=T0)
    yield s
    await s.close()


async def test_put_returns_the_item_queued(store: OutboxStore) -> None:
    """A put comes back queued, due at once, with every field as given."""
    new = new_item()
    item, created = await store.put(new)
    assert created
    assert (item.id, item.state, item.next_at, item.rounds) == (new.id, State.QUEUED, T0, 0)
    assert (item.headers, item.body, item.attempts) == (new.headers, new.body, 2)
    assert (item.idempotency_key, item.operation, item.target) == (
        new.idempotency_key, "POST /v1/customers", "/v1/customers")
    assert item.result is None and item.owner == ""
    assert await store.get(new.id) == item


async def test_put_same_key_returns_the_stored_item(store: OutboxStore) -> None:
    """A second put under the same scope and key stores nothing and returns the first."""
    first, _ = await store.put(new_item(idempotency_key="k1"))
    again, created = await store.put(new_item(idempotency_key="k1", fingerprint="other"))
    assert not created
    assert again.id == first.id and again.fingerprint == "fp-1"
    assert sum((await store.counts()).values()) == 1


async def test_same_key_in_two_scopes_is_two_items(store: OutboxStore) -> None:
    """Stripe's keys are per account: the same key from two scopes is two items."""
    await store.put(new_item(idempotency_key="k1", scope="a"))
    _, created = await store.put(new_item(idempotency_key="k1", scope="b"))
    assert created
    assert (await store.counts())[State.QUEUED] == 2


async def test_put_is_durable_across_reopen(outbox_url: str) -> None:
    """What put returned is there after the store is closed and opened again."""
    s = await open_store(outbox_url, now=T0)
    item, _ = await s.put(new_item())
    await s.close()
    s = await open_store(outbox_url, now=T0 + 1)
    try:
        assert await s.get(item.id) == item
    finally:
        await s.close()


async def test_many_concurrent_puts_are_all_stored(store: OutboxStore) -> None:
    """200 puts at once all come back created and are all stored."""
    results = await asyncio.gather(*(store.put(new_item()) for _ in range(200)))
    assert all(created for _, created in results)
    assert (await store.counts())[State.QUEUED] == 200


async def test_claim_hands_out_due_items_oldest_first(store: OutboxStore) -> None:
    """Claimed items are the oldest, as delivering with the owner and lease; never twice."""
    ids = [(await store.put(new_item(received_at=T0 + i)))[0].id for i in range(5)]
    got = await store.claim(T0 + 10, 30.0, 3, "w1")
    assert [i.id for i in got] == ids[:3]
    assert all(i.state is State.DELIVERING and i.owner == "w1" for i in got)
    assert all(i.lease_until == T0 + 40 for i in got)
    rest = await store.claim(T0 + 10, 30.0, 10, "w2")
    assert [i.id for i in rest] == ids[3:]
    assert await store.claim(T0 + 10, 30.0, 10, "w3") == []


async def test_claim_skips_items_not_yet_due(store: OutboxStore) -> None:
    """A released item is not claimed before its next_at."""
    item, _ = await store.put(new_item())
    assert len(await store.claim(T0, 30.0, 10, "w1")) == 1
    await store.release(item.id, "w1", at=T0 + 1, next_at=T0 + 5, reason="retry later", sent=1)
    assert await store.claim(T0 + 4.9, 30.0, 10, "w1") == []
    assert [i.id for i in await store.claim(T0 + 5, 30.0, 10, "w1")] == [item.id]


async def test_claim_waits_for_earlier_items_of_the_same_order_key(store: OutboxStore) -> None:
    """Two writes to one object: the second is not handed out until the first is final."""
    a, _ = await store.put(new_item(order_key="cus_1", received_at=T0))
    b, _ = await store.put(new_item(order_key="cus_1", received_at=T0 + 1))
    c, _ = await store.put(new_item(order_key="cus_2", received_at=T0 + 2))
    first = await store.claim(T0 + 5, 30.0, 10, "w1")
    assert [i.id for i in first] == [a.id, c.id]
    await store.release(a.id, "w1", at=T0 + 6, next_at=T0 + 6, reason="again", sent=1)
    assert [i.id for i in await store.claim(T0 + 7, 30.0, 10, "w1")] == [a.id]
    await store.complete(a.id, "w1", State.DELIVERED, at=T0 + 8, reason="ok", sent=1,
                         result=Result(200, b"{}", "req_1"))
    assert [i.id for i in await store.claim(T0 + 9, 30.0, 10, "w1")] == [b.id]


async def test_expired_lease_is_claimed_again(store: OutboxStore) -> None:
    """An item whose deliverer died is claimed by another once its lease ran out."""
    item, _ = await store.put(new_item())
    await store.claim(T0, 30.0, 10, "dead")
    assert await store.claim(T0 + 29.9, 30.0, 10, "w2") == []
    (again,) = await store.claim(T0 + 30, 30.0, 10, "w2")
    assert again.id == item.id and again.owner == "w2"
    # The dead deliverer's late result is refused (fencing), the new owner's accepted.
    assert await store.complete(item.id, "dead", State.DELIVERED, at=T0 + 31, reason="late",
                                sent=1, result=None) is None
    done = await store.complete(item.id, "w2", State.DELIVERED, at=T0 + 31, reason="ok",
                                sent=1, result=Result(200, b"{}", None))
    assert done is not None and done.state is State.DELIVERED


async def test_release_requeues_with_attempts_counted(store: OutboxStore) -> None:
    """A release counts the round's attempts and one round; a round that sent nothing, none."""
    item, _ = await store.put(new_item(attempts=2))
    await store.claim(T0, 30.0, 10, "w1")
    back = await store.release(item.id, "w1", at=T0 + 1, next_at=T0 + 3, reason="503", sent=3)
    assert back is not None
    assert (back.state, back.attempts, back.rounds, back.next_at, back.owner, back.reason) == (
        State.QUEUED, 5, 1, T0 + 3, "", "503")
    await store.claim(T0 + 3, 30.0, 10, "w1")
    back = await store.release(item.id, "w1", at=T0 + 4, next_at=T0 + 9, reason="open", sent=0)
    assert back is not None and (back.attempts, back.rounds) == (5, 1)


async def test_complete_keeps_stripes_answer(store: OutboxStore) -> None:
    """A final state keeps Stripe's status, body and Request-Id; it is never claimed again."""
    item, _ = await store.put(new_item())
    await store.claim(T0, 30.0, 10, "w1")
    answer = Result(402, b'{"error":{"code":"card_declined"}}', "req_9")
    done = await store.complete(item.id, "w1", State.FAILED, at=T0 + 2, reason="card_declined",
                                sent=1, result=answer)
    assert done is not None
    assert (done.state, done.result, done.reason, done.updated_at) == (
        State.FAILED, answer, "card_declined", T0 + 2)
    assert await store.claim(T0 + DAY, 30.0, 10, "w1") == []
    assert await store.get(item.id) == done


async def test_complete_and_release_need_the_claims_owner(store: OutboxStore) -> None:
    """Only the owner of a delivering item may settle it; a queued item is not settled."""
    item, _ = await store.put(new_item())
    assert await store.release(item.id, "w1", at=T0, next_at=T0, reason="x", sent=0) is None
    await store.claim(T0, 30.0, 10, "w1")
    assert await store.complete(item.id, "w2", State.DELIVERED, at=T0, reason="x", sent=1,
                                result=None) is None
    assert await store.release(item.id, "w2", at=T0, next_at=T0, reason="x", sent=0) is None
    got = await store.get(item.id)
    assert got is not None and got.state is State.DELIVERING


async def test_history_is_the_audit_trail(store: OutboxStore) -> None:
    """Every transition is kept in order with its time and reason."""
    item, _ = await store.put(new_item())
    await store.claim(T0 + 1, 30.0, 10, "w1")
    await store.release(item.id, "w1", at=T0 + 2, next_at=T0 + 3, reason="gateway_error", sent=1)
    await store.claim(T0 + 3, 30.0, 10, "w1")
    await store.complete(item.id, "w1", State.DELIVERED, at=T0 + 4, reason="delivered", sent=1,
                         result=Result(200, b"{}", "req_1"))
    trail = await store.history(item.id)
    assert [(t.from_state, t.to, t.at) for t in trail] == [
        (None, "queued", T0),
        ("queued", "delivering", T0 + 1),
        ("delivering", "queued", T0 + 2),
        ("queued", "delivering", T0 + 3),
        ("delivering", "delivered", T0 + 4),
    ]
    assert trail[2].reason == "gateway_error"


async def test_counts_and_filters_by_state_and_operation(store: OutboxStore) -> None:
    """Counts have every state; items filter by state and by operation."""
    a, _ = await store.put(new_item(operation="POST /v1/customers"))
    b, _ = await store.put(new_item(operation="POST /v1/refunds", target="/v1/refunds"))
    await store.put(new_item(operation="POST /v1/refunds", target="/v1/refunds"))
    await store.claim(T0, 30.0, 1, "w1")
    counts = await store.counts()
    assert counts == {State.QUEUED: 2, State.DELIVERING: 1, State.DELIVERED: 0,
                      State.FAILED: 0, State.EXPIRED: 0}
    assert (await store.counts(operation="POST /v1/refunds"))[State.QUEUED] == 2
    assert [i.id for i in await store.items(state=State.DELIVERING)] == [a.id]
    refunds = await store.items(operation="POST /v1/refunds")
    assert len(refunds) == 2 and refunds[0].id == b.id
    assert len(await store.items(state=State.QUEUED, operation="POST /v1/refunds", limit=1)) == 1


async def test_oldest_queued(store: OutboxStore) -> None:
    """The oldest queued item's received time; None with nothing queued."""
    assert await store.oldest_queued() is None
    await store.put(new_item(received_at=T0 + 5))
    await store.put(new_item(received_at=T0 + 7))
    assert await store.oldest_queued() == T0 + 5
    await store.claim(T0 + 10, 30.0, 1, "w1")
    assert await store.oldest_queued() == T0 + 7


async def test_retry_rules(store: OutboxStore) -> None:
    """Retry re-queues failed (and queued) items, never delivering, delivered or expired."""
    assert await store.retry("qr_missing", at=T0, reason="operator") is None
    failed, _ = await store.put(new_item())
    await store.claim(T0, 30.0, 10, "w1")
    await store.complete(failed.id, "w1", State.FAILED, at=T0 + 1, reason="401", sent=1,
                         result=Result(401, b"{}", None))
    again = await store.retry(failed.id, at=T0 + 5, reason="operator retry")
    assert again is not None and (again.state, again.next_at) == (State.QUEUED, T0 + 5)
    await store.claim(T0 + 5, 30.0, 10, "w1")
    with pytest.raises(NotAllowed):
        await store.retry(failed.id, at=T0 + 6, reason="operator retry")
    await store.complete(failed.id, "w1", State.EXPIRED, at=T0 + 7, reason="window", sent=0,
                         result=None)
    with pytest.raises(NotAllowed, match="idempotency window"):
        await store.retry(failed.id, at=T0 + 8, reason="operator retry")


async def test_drop_deletes_and_audits(store: OutboxStore) -> None:
    """A dropped item is gone; its trail ends with the drop and its reason."""
    item, _ = await store.put(new_item())
    dropped = await store.drop(item.id, at=T0 + 3, reason="operator: duplicate order")
    assert dropped is not None and dropped.id == item.id
    assert await store.get(item.id) is None
    assert await store.drop(item.id, at=T0 + 4, reason="again") is None
    trail = await store.history(item.id)
    assert (trail[-1].from_state, trail[-1].to, trail[-1].reason) == (
        "queued", "dropped", "operator: duplicate order")
    assert sum((await store.counts()).values()) == 0


async def test_drop_refuses_an_item_being_delivered(store: OutboxStore) -> None:
    """An item in delivery cannot be dropped (its answer may be on its way)."""
    item, _ = await store.put(new_item())
    await store.claim(T0, 30.0, 10, "w1")
    with pytest.raises(NotAllowed):
        await store.drop(item.id, at=T0, reason="x")
    assert await store.get(item.id) is not None


async def test_prune_deletes_old_final_items_only(store: OutboxStore) -> None:
    """Prune removes final items settled before the cut-off, never queued ones."""
    old, _ = await store.put(new_item())
    await store.claim(T0, 30.0, 10, "w1")
    await store.complete(old.id, "w1", State.DELIVERED, at=T0 + 1, reason="ok", sent=1,
                         result=Result(200, b"{}", None))
    queued, _ = await store.put(new_item(received_at=T0 - DAY))
    assert await store.prune(T0 + 2) == 1
    assert await store.get(old.id) is None
    assert await store.history(old.id) == []
    assert await store.get(queued.id) is not None
