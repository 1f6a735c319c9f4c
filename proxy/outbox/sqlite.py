"""The embedded outbox store: one SQLite file, WAL, a full fsync on every commit.

Zero set-up: the file and its directory are created on first use (mode 0600: it holds the
app's request headers, ``Authorization`` included). SQLite calls are blocking, so they run on
one dedicated thread, never on the event loop; puts that arrive while a commit is under way
are committed together in the next transaction (group commit), so a burst of queued writes
costs one fsync per batch, not one per write.

One file belongs to one sidecar: an exclusive ``flock`` on ``<file>.lock`` is taken at open
(a second sidecar on the same file fails to start, with the reason) and released by the
kernel however the process ends, SIGKILL included. That is why, at open, items left
``delivering`` by the previous process are queued again at once: nobody else can hold them.
A fleet shares a Redis store instead.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from proxy.outbox.store import (
    FINAL_STATES,
    Item,
    NewItem,
    NotAllowed,
    Result,
    State,
    StoreError,
    Transition,
)

__all__ = ["SQLiteStore", "sqlite_path"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    operation TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    scope TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    order_key TEXT,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    state TEXT NOT NULL,
    rounds INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    reason TEXT NOT NULL,
    result_status INTEGER,
    result_body BLOB,
    result_request_id TEXT,
    UNIQUE (scope, idempotency_key)
);
CREATE INDEX IF NOT EXISTS items_due ON items (state, next_at);
CREATE INDEX IF NOT EXISTS items_order ON items (order_key, seq);
CREATE INDEX IF NOT EXISTS items_operation ON items (operation, state);
CREATE TABLE IF NOT EXISTS transitions (
    item_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_item ON transitions (item_id);
"""

_COLUMNS = (
    "id, operation, idempotency_key, scope, fingerprint, order_key, method, target, headers, "
    "body, received_at, expires_at, attempts, state, rounds, next_at, lease_until, owner, "
    "updated_at, reason, result_status, result_body, result_request_id"
)

_CLAIMABLE = f"""
SELECT {_COLUMNS} FROM items AS i
WHERE ((i.state = 'queued' AND i.next_at <= :now)
       OR (i.state = 'delivering' AND i.lease_until <= :now))
  AND (i.order_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM items AS j
        WHERE j.order_key = i.order_key AND j.seq < i.seq
          AND j.state IN ('queued', 'delivering')))
ORDER BY i.seq LIMIT :limit
"""


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///path`` URL (``sqlite:///rel`` relative, ``////abs`` absolute).

    ValueError if the URL is not one.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
        raise ValueError(f"{url!r} is not sqlite:///PATH")
    path = unquote(parts.path[1:])
    if not path:
        raise ValueError(f"{url!r} names no file")
    return os.path.expandvars(path)


def _row_item(row: tuple[Any, ...]) -> Item:
    result = None
    if row[20] is not None:
        result = Result(row[20], bytes(row[21] or b""), row[22])
    return Item(
        id=row[0], operation=row[1], idempotency_key=row[2], scope=row[3], fingerprint=row[4],
        order_key=row[5], method=row[6], target=row[7], headers=bytes(row[8]),
        body=bytes(row[9]), received_at=row[10], expires_at=row[11], attempts=row[12],
        state=State(row[13]), rounds=row[14], next_at=row[15], lease_until=row[16],
        owner=row[17], updated_at=row[18], reason=row[19], result=result,
    )  # fmt: skip


class SQLiteStore:
    """An :class:`~proxy.outbox.store.OutboxStore` in one SQLite file."""

    def __init__(self, path: str, url: str) -> None:
        self.path = path
        self.url = url
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._pending: list[tuple[NewItem, asyncio.Future[tuple[Item, bool]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, now: float) -> SQLiteStore:
        """Open (creating it if needed) the store of ``url``; StoreError if it cannot be."""
        try:
            path = sqlite_path(url)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        store = cls(path, url)
        try:
            await store._run(store._open, now)
        except BaseException:
            await store._run(store._close)
            store._executor.shutdown(wait=False)
            raise
        return store

    # -- the thread's side --------------------------------------------------------------------
    def _open(self, now: float) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreError(
                f"{self.path} is in use by another process: one SQLite outbox belongs to one "
                "sidecar (a fleet shares a redis:// store)"
            ) from None
        self._lock_fd = lock_fd
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # 0600 before SQLite opens it
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (WAL fsynced) before put() returns; NORMAL would not be.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db
        with self._transaction() as cur:
            rows = cur.execute("SELECT id FROM items WHERE state = 'delivering'").fetchall()
            for (item_id,) in rows:
                cur.execute(
                    "UPDATE items SET state = 'queued', owner = '', lease_until = 0, next_at = ?,"
                    " updated_at = ?, reason = ? WHERE id = ?",
                    (now, now, "recovered: its deliverer stopped", item_id),
                )
                self._audit(cur, item_id, now, "delivering", "queued", "recovered at start")

    def _transaction(self) -> _Tx:
        assert self._db is not None, "store closed"
        return _Tx(self._db)

    @staticmethod
    def _audit(cur: sqlite3.Cursor, item_id: str, at: float, old: str | None, new: str,
               reason: str) -> None:  # fmt: skip
        cur.execute(
            "INSERT INTO transitions (item_id, at, from_state, to_state, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            (item_id, at, old, new, reason),
        )

    def _fetch(self, cur: sqlite3.Cursor, item_id: str) -> Item | None:
        row = cur.execute(f"SELECT {_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        return _row_item(row) if row is not None else None

    def _put_batch(self, batch: list[NewItem]) -> list[tuple[Item, bool]]:
        out: list[tuple[Item, bool]] = []
        with self._transaction() as cur:
            for new in batch:
                row = cur.execute(
                    f"SELECT {_COLUMNS} FROM items WHERE scope = ? AND idempotency_key = ?",
                    (new.scope, new.idempotency_key),
                ).fetchone()
                if row is not None:
                    out.append((_row_item(row), False))
                    continue
                cur.execute(
                    "INSERT INTO items (id, operation, idempotency_key, scope, fingerprint, "
                    "order_key, method, target, headers, body, received_at, expires_at, "
                    "attempts, state, next_at, updated_at, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, 'queued')",
                    (new.id, new.operation, new.idempotency_key, new.scope, new.fingerprint,
                     new.order_key, new.method, new.target, new.headers, new.body,
                     new.received_at, new.expires_at, new.attempts, new.received_at,
                     new.received_at),
                )  # fmt: skip
                self._audit(cur, new.id, new.received_at, None, "queued", "queued")
                item = self._fetch(cur, new.id)
                assert item is not None
                out.append((item, True))
        return out

    def _claim(self, now: float, lease: float, limit: int, owner: str) -> list[Item]:
        with self._transaction() as cur:
            rows = cur.execute(_CLAIMABLE, {"now": now, "limit": limit}).fetchall()
            out = []
            for row in rows:
                item = _row_item(row)
                cur.execute(
                    "UPDATE items SET state = 'delivering', owner = ?, lease_until = ?, "
                    "updated_at = ?, reason = ? WHERE id = ?",
                    (owner, now + lease, now, "claimed", item.id),
                )
                why = "claimed" if item.state is State.QUEUED else "claimed again: lease ran out"
                self._audit(cur, item.id, now, item.state.value, "delivering", why)
                out.append(self._fetch(cur, item.id))
        return [i for i in out if i is not None]

    def _settle(self, item_id: str, owner: str, state: State, at: float, reason: str,
                sent: int, next_at: float, result: Result | None) -> Item | None:  # fmt: skip
        with self._transaction() as cur:
            item = self._fetch(cur, item_id)
            if item is None or item.state is not State.DELIVERING or item.owner != owner:
                return None
            cur.execute(
                "UPDATE items SET state = ?, owner = '', lease_until = 0, next_at = ?, "
                "updated_at = ?, reason = ?, attempts = attempts + ?, rounds = rounds + ?, "
                "result_status = ?, result_body = ?, result_request_id = ? WHERE id = ?",
                (state.value, next_at, at, reason, sent, 1 if sent else 0,
                 result.status if result else None, result.body if result else None,
                 result.request_id if result else None, item_id),
            )  # fmt: skip
            self._audit(cur, item_id, at, "delivering", state.value, reason)
            return self._fetch(cur, item_id)

    def _retry(self, item_id: str, at: float, reason: str) -> Item | None:
        with self._transaction() as cur:
            item = self._fetch(cur, item_id)
            if item is None:
                return None
            if item.state not in (State.QUEUED, State.FAILED):
                raise NotAllowed(_WHY_NOT_RETRY[item.state])
            cur.execute(
                "UPDATE items SET state = 'queued', next_at = ?, updated_at = ?, reason = ? "
                "WHERE id = ?",
                (at, at, reason, item_id),
            )
            self._audit(cur, item_id, at, item.state.value, "queued", reason)
            return self._fetch(cur, item_id)

    def _drop(self, item_id: str, at: float, reason: str) -> Item | None:
        with self._transaction() as cur:
            item = self._fetch(cur, item_id)
            if item is None:
                return None
            if item.state is State.DELIVERING:
                raise NotAllowed("it is being delivered now; drop it once the round is over")
            cur.execute("DELETE FROM items WHERE id = ?", (item_id,))
            self._audit(cur, item_id, at, item.state.value, "dropped", reason)
            return item

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self._db is not None, "store closed"
        return self._db.execute(sql, params).fetchall()

    def _prune(self, before: float) -> int:
        finals = tuple(s.value for s in FINAL_STATES)
        with self._transaction() as cur:
            ids = [
                r[0]
                for r in cur.execute(
                    "SELECT id FROM items WHERE state IN (?, ?, ?) AND updated_at < ?",
                    (*finals, before),
                ).fetchall()
            ]
            for item_id in ids:
                cur.execute("DELETE FROM items WHERE id = ?", (item_id,))
                cur.execute("DELETE FROM transitions WHERE item_id = ?", (item_id,))
            # The audit trail of dropped items goes after the same retention.
            cur.execute(
                "DELETE FROM transitions WHERE to_state = 'dropped' AND at < ?", (before,)
            )
        return len(ids)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- the loop's side ----------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from None
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc.strerror or exc}") from None

    async def put(self, item: NewItem) -> tuple[Item, bool]:
        """Store durably (group commit with any puts arriving meanwhile)."""
        fut: asyncio.Future[tuple[Item, bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._run(self._put_batch, [new for new, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(
                                exc if isinstance(exc, StoreError) else StoreError(repr(exc))
                            )
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._flusher = None

    async def claim(self, now: float, lease: float, limit: int, owner: str) -> list[Item]:
        """Due items, oldest first, as delivering under ``owner``."""
        return await self._run(self._claim, now, lease, limit, owner)

    async def release(
        self, item_id: str, owner: str, *, at: float, next_at: float, reason: str, sent: int
    ) -> Item | None:
        """Back to queued until ``next_at``."""
        return await self._run(
            self._settle, item_id, owner, State.QUEUED, at, reason, sent, next_at, None
        )

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
        """To a final state with Stripe's answer."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")
        return await self._run(self._settle, item_id, owner, state, at, reason, sent, at, result)

    async def get(self, item_id: str) -> Item | None:
        """One item, or None."""
        rows = await self._run(
            self._read, f"SELECT {_COLUMNS} FROM items WHERE id = ?", (item_id,)
        )
        return _row_item(rows[0]) if rows else None

    async def history(self, item_id: str) -> list[Transition]:
        """The item's audit trail, oldest first."""
        rows = await self._run(
            self._read,
            "SELECT at, from_state, to_state, reason FROM transitions WHERE item_id = ? "
            "ORDER BY rowid",
            (item_id,),
        )
        return [Transition(*row) for row in rows]

    async def items(
        self, *, state: State | None = None, operation: str | None = None, limit: int = 100
    ) -> list[Item]:
        """Items oldest first, filtered."""
        where, params = _filters(state, operation)
        rows = await self._run(
            self._read,
            f"SELECT {_COLUMNS} FROM items{where} ORDER BY seq LIMIT ?",
            (*params, limit),
        )
        return [_row_item(r) for r in rows]

    async def counts(self, *, operation: str | None = None) -> Mapping[State, int]:
        """Items per state."""
        where, params = _filters(None, operation)
        rows = await self._run(
            self._read, f"SELECT state, COUNT(*) FROM items{where} GROUP BY state", params
        )
        out = dict.fromkeys(State, 0)
        for state, n in rows:
            out[State(state)] = n
        return out

    async def oldest_queued(self) -> float | None:
        """When the oldest queued item was received."""
        rows = await self._run(
            self._read, "SELECT MIN(received_at) FROM items WHERE state = 'queued'", ()
        )
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    async def retry(self, item_id: str, *, at: float, reason: str) -> Item | None:
        """Queue a queued or failed item again, due at ``at``."""
        return await self._run(self._retry, item_id, at, reason)

    async def drop(self, item_id: str, *, at: float, reason: str) -> Item | None:
        """Delete an item; the audit trail records the drop."""
        return await self._run(self._drop, item_id, at, reason)

    async def prune(self, before: float) -> int:
        """Delete final items last changed before ``before``, with their trails; how many."""
        return await self._run(self._prune, before)

    async def ping(self) -> None:
        """Raise StoreError unless the file answers."""
        await self._run(self._read, "SELECT 1", ())

    async def close(self) -> None:
        """Close the file and the thread."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._run(self._close)
        self._executor.shutdown(wait=False)


_WHY_NOT_RETRY = {
    State.DELIVERING: "it is being delivered now",
    State.DELIVERED: "Stripe performed it already",
    State.EXPIRED: "its Idempotency-Key is past Stripe's idempotency window: a resend could "
    "perform it twice",
}


def _filters(state: State | None, operation: str | None) -> tuple[str, tuple[Any, ...]]:
    clauses, params = [], []
    if state is not None:
        clauses.append("state = ?")
        params.append(state.value)
    if operation is not None:
        clauses.append("operation = ?")
        params.append(operation)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on an exception), yielding a cursor."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._cur = db.cursor()

    def __enter__(self) -> sqlite3.Cursor:
        self._cur.execute("BEGIN IMMEDIATE")
        return self._cur

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self._cur.execute("COMMIT")
        else:
            self._cur.execute("ROLLBACK")
