"""The SQLite outbox store: the shared store contract, plus what only a file can show."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from outbox_contract import *  # noqa: F403
from outbox_contract import T0, new_item

from proxy.outbox import State, StoreError, open_store
from proxy.outbox.sqlite import sqlite_path


@pytest.fixture
def outbox_url(tmp_path: Path) -> str:
    """A fresh SQLite file in a directory that does not exist yet."""
    return f"sqlite:///{tmp_path}/state/outbox.db"


def test_sqlite_path_forms() -> None:
    """Three slashes: a relative path; four: an absolute one; other URLs are refused."""
    assert sqlite_path("sqlite:///outbox.db") == "outbox.db"
    assert sqlite_path("sqlite:////var/lib/x/outbox.db") == "/var/lib/x/outbox.db"
    for bad in ("sqlite://host/x.db", "redis://x", "sqlite:///"):
        with pytest.raises(ValueError):
            sqlite_path(bad)


async def test_file_is_private_and_in_wal_mode(outbox_url: str) -> None:
    """The file holds request headers: mode 0600, WAL journal."""
    store = await open_store(outbox_url, now=T0)
    try:
        await store.put(new_item())
        path = sqlite_path(outbox_url)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, "rb") as fh:
            header = fh.read(20)
        assert header[18:20] == b"\x02\x02"  # file format version bytes: 2 = WAL
    finally:
        await store.close()


async def test_second_open_of_one_file_is_refused(outbox_url: str) -> None:
    """One file belongs to one sidecar: a second open fails and says why."""
    store = await open_store(outbox_url, now=T0)
    try:
        with pytest.raises(StoreError, match="in use by another process"):
            await open_store(outbox_url, now=T0)
    finally:
        await store.close()
    again = await open_store(outbox_url, now=T0)  # the lock went with the close
    await again.close()


async def test_items_left_delivering_are_queued_again_at_open(outbox_url: str) -> None:
    """Delivering items of a stopped process are due again at once after a reopen, audited."""
    store = await open_store(outbox_url, now=T0)
    item, _ = await store.put(new_item())
    await store.claim(T0, 300.0, 10, "old-process")
    await store.close()
    store = await open_store(outbox_url, now=T0 + 5)
    try:
        got = await store.get(item.id)
        assert got is not None and (got.state, got.owner) == (State.QUEUED, "")
        (claimed,) = await store.claim(T0 + 5, 30.0, 10, "new-process")
        assert claimed.id == item.id
        assert (await store.history(item.id))[2].reason == "recovered at start"
    finally:
        await store.close()


async def test_unwritable_place_is_a_store_error(tmp_path: Path) -> None:
    """A path under a file (not a directory) is reported, not raised raw."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        await open_store(f"sqlite:///{tmp_path}/file/outbox.db", now=T0)


async def test_unknown_scheme_is_refused() -> None:
    """Only sqlite:/// and redis:// name a store; the message hides a password."""
    with pytest.raises(StoreError) as info:
        await open_store("postgres://u:secret@h/db", now=T0)
    assert "secret" not in str(info.value)
