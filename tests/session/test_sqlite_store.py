"""The SQLite store's shared commits: every acknowledged write is committed, in order; a failure stays contained."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import Iterator

import pytest

from services.gen.roundtable.session.v1 import session_pb2
from services.session.stores.interface import DiscussionExists
from services.session.stores.sqlite import SqliteStore
from tests.session.test_store_contract import ALICE, BOB, discussion_id, event, make_discussion

DISCUSSIONS = 200
APPENDS_PER_DISCUSSION = 14
# A save after every second append but the last: 6 saves, each claiming the events before it.
SAVE_AFTER = frozenset(range(2, APPENDS_PER_DISCUSSION, 2))


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the store's file: it sees only what is committed."""
    connection = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    yield connection
    connection.close()


def committed_sequences(outside: sqlite3.Connection, number: int) -> list[int]:
    rows = outside.execute(
        "SELECT sequence FROM events WHERE discussion_id = ? ORDER BY sequence", (discussion_id(number),)
    ).fetchall()
    return [row[0] for row in rows]


def committed_document(outside: sqlite3.Connection, number: int) -> session_pb2.Discussion | None:
    rows = outside.execute("SELECT document FROM discussions WHERE discussion_id = ?", (discussion_id(number),))
    found = rows.fetchall()
    return session_pb2.Discussion.FromString(found[0][0]) if found else None


async def test_every_write_acknowledged_in_a_burst_of_discussions_is_committed_when_it_returns(
    tmp_path: pathlib.Path, outside: sqlite3.Connection
) -> None:
    store = await SqliteStore.open(tmp_path / "store.db")

    async def discuss(number: int) -> None:
        doc = make_discussion(number)
        await store.create(ALICE, doc)
        for sequence in range(1, APPENDS_PER_DISCUSSION + 1):
            await store.append_events([event(number, sequence, f"chunk {sequence} of {number}")])
            assert committed_sequences(outside, number) == list(range(1, sequence + 1))
            if sequence in SAVE_AFTER:
                doc.last_sequence = sequence
                doc.summary = f"after {sequence}"
                await store.save(doc)
                stored = committed_document(outside, number)
                assert stored is not None and stored.last_sequence == sequence
                # Saved after its events: a committed document never claims an event the log lacks.
                assert committed_sequences(outside, number)[-1] >= stored.last_sequence

    await asyncio.gather(*(discuss(n) for n in range(1, DISCUSSIONS + 1)))
    await store.close()

    reopened = await SqliteStore.open(tmp_path / "store.db")
    try:
        for number in range(1, DISCUSSIONS + 1):
            events = await reopened.events_after(discussion_id(number), 0, 100)
            assert [e.agent_delta.text for e in events] == [
                f"chunk {s} of {number}" for s in range(1, APPENDS_PER_DISCUSSION + 1)
            ]
            doc = await reopened.get(discussion_id(number))
            assert doc is not None
            assert (doc.last_sequence, doc.summary) == (max(SAVE_AFTER), f"after {max(SAVE_AFTER)}")
    finally:
        await reopened.close()


async def test_saves_of_one_discussion_in_one_batch_end_as_if_made_one_after_another(tmp_path: pathlib.Path) -> None:
    store = await SqliteStore.open(tmp_path / "store.db")
    doc = make_discussion(1, expires_seconds=1_000)
    await store.create(ALICE, doc)
    versions = []
    for number, expires in enumerate((5_000, 3_000, 4_000), start=1):
        version = session_pb2.Discussion()
        version.CopyFrom(doc)
        version.summary = f"version {number}"
        version.expires_at.FromSeconds(expires)
        versions.append(version)

    await asyncio.gather(*(store.save(v) for v in versions), store.touch(doc.discussion_id, 1_500.0, 4_500.0))

    stored = await store.get(doc.discussion_id)
    assert stored is not None
    assert stored.summary == "version 3"  # the last save's document
    assert stored.expires_at.ToSeconds() == 5_000  # times only move forward, whichever write carried them
    assert stored.last_accessed_at.ToSeconds() == 1_500
    await store.close()


async def test_a_create_refused_in_a_shared_commit_refuses_only_itself(
    tmp_path: pathlib.Path, outside: sqlite3.Connection
) -> None:
    store = await SqliteStore.open(tmp_path / "store.db")
    first = make_discussion(1, topic="first")
    taken = make_discussion(1, topic="the same id again")
    others = [make_discussion(n) for n in range(2, 6)]

    # Started together, so they share one commit.
    outcomes = await asyncio.gather(
        store.create(ALICE, first),
        store.create(BOB, taken),
        *(store.create(ALICE, d) for d in others),
        return_exceptions=True,
    )

    assert outcomes[0] == first
    assert isinstance(outcomes[1], DiscussionExists)
    assert outcomes[2:] == others
    assert committed_document(outside, 1) == first
    assert all(committed_document(outside, n) == d for n, d in enumerate(others, start=2))
    assert await store.owned(ALICE) == (5, 1_000_000.0)
    assert await store.owned(BOB) == (0, None)
    await store.close()


async def test_a_failed_commit_fails_only_writes_it_held_and_later_writes_commit(
    tmp_path: pathlib.Path, outside: sqlite3.Connection
) -> None:
    store = await SqliteStore.open(tmp_path / "store.db")
    await store.create(ALICE, make_discussion(1))
    await store.create(BOB, make_discussion(2))
    await store.append_events([event(1, 1), event(2, 1)])
    # The database refuses one event from now on, as it would refuse a write on a full disk.
    outside.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.sequence = 13 "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    saved = make_discussion(2)
    saved.summary = "saved beside the refused event"

    # Started together, so they share one commit.
    outcomes = await asyncio.gather(
        store.append_events([event(1, 2), event(1, 13)]),
        store.append_events([event(2, 2)]),
        store.save(saved),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], sqlite3.IntegrityError)
    # Acknowledged means committed, failed means nothing of it is: the commit was rolled back whole.
    assert committed_sequences(outside, 1) == [1]
    assert (committed_sequences(outside, 2) == [1, 2]) is (outcomes[1] is None)
    document = committed_document(outside, 2)
    assert document is not None and (document.summary == saved.summary) is (outcomes[2] is None)

    await store.append_events([event(1, 2)])
    await store.append_events([event(2, 2)])
    await store.save(saved)
    assert committed_sequences(outside, 1) == [1, 2]
    assert committed_sequences(outside, 2) == [1, 2]
    assert committed_document(outside, 2) == saved
    await store.close()


async def test_close_commits_the_writes_still_waiting(tmp_path: pathlib.Path, outside: sqlite3.Connection) -> None:
    store = await SqliteStore.open(tmp_path / "store.db")
    for number in range(1, 21):
        await store.create(ALICE, make_discussion(number))
    finished = make_discussion(1, status=session_pb2.DISCUSSION_STATUS_COMPLETED)
    writes = [asyncio.create_task(store.append_events([event(n, 1)])) for n in range(1, 21)]
    writes.append(asyncio.create_task(store.save(finished)))
    writes.append(asyncio.create_task(store.touch(discussion_id(2), 1_500.0, 9_000_000.0)))
    await asyncio.sleep(0)  # queued, not yet committed

    await store.close()
    await store.close()  # a second close has nothing left to do

    assert all(w.done() and w.exception() is None for w in writes)
    assert all(committed_sequences(outside, n) == [1] for n in range(1, 21))
    assert committed_document(outside, 1) == finished
    assert outside.execute(
        "SELECT expires_at FROM discussions WHERE discussion_id = ?", (discussion_id(2),)
    ).fetchall() == [(9_000_000.0,)]


async def test_owner_counts_are_added_to_a_database_made_before_them(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "store.db"
    first = await SqliteStore.open(path)
    for number in range(1, 4):
        await first.create(ALICE, make_discussion(number, expires_seconds=1_000 * number))
    await first.create(BOB, make_discussion(4))
    await first.close()
    older = sqlite3.connect(path, isolation_level=None)
    older.executescript(
        "DROP TRIGGER owner_counts_insert; DROP TRIGGER owner_counts_delete; DROP TABLE owner_counts;"
        "DROP INDEX discussions_owner_expiry;"
    )
    older.close()

    reopened = await SqliteStore.open(path)

    assert await reopened.owned(ALICE) == (3, 1_000.0)
    assert await reopened.owned(BOB) == (1, 1_000_000.0)
    await reopened.create(ALICE, make_discussion(5))
    await reopened.delete(discussion_id(1))
    await reopened.delete(discussion_id(4))
    assert await reopened.owned(ALICE) == (3, 2_000.0)
    assert await reopened.owned(BOB) == (0, None)
    await reopened.close()


async def test_a_commit_is_on_disk_before_the_write_is_acknowledged(tmp_path: pathlib.Path) -> None:
    # "Nothing acknowledged is lost" holds through power loss only if every commit is synced (FULL);
    # NORMAL in WAL mode syncs at checkpoints, so the last commits before a power cut may vanish.
    store = await SqliteStore.open(tmp_path / "store.db")
    try:
        (synchronous,) = (await store._query("PRAGMA synchronous", ()))[0]
        (journal_mode,) = (await store._query("PRAGMA journal_mode", ()))[0]
    finally:
        await store.close()
    assert (journal_mode, synchronous) == ("wal", 2)  # 2: FULL
