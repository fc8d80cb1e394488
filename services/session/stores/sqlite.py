"""SQLite Store: the embedded default. WAL mode; every acknowledged write is committed and synced before it returns.

One thread owns the connection and runs every statement, in the order asked. Writes of all
discussions share commits: create, append_events, save and touch add their rows to the pending
batch and wait; one flusher runs everything pending as ONE transaction in ONE trip to the thread,
then answers every waiter. So a write is still acknowledged only once committed, but a burst costs
one commit per batch instead of one per statement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.roundtable.session.v1 import session_pb2
from services.session.document import UNFINISHED_STATUSES
from services.session.ids import SECRET_BYTES
from services.session.stores.interface import (
    POLL_SECONDS,
    Discussion,
    DiscussionEvent,
    DiscussionExists,
    DiscussionStatus,
    created_nanos,
    decode_page_token,
    encode_page_token,
    summary_view,
)

Result = TypeVar("Result")

# The columns _document() reads.
DOCUMENT = "document, last_accessed_at, expires_at"

SCHEMA = """
CREATE TABLE IF NOT EXISTS discussions (
    discussion_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    request_id TEXT,
    status INTEGER NOT NULL,
    created_at_ns INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    -- Kept in columns as well as in the document so a touch is one atomic UPDATE
    -- that can't race a save; reads overlay them onto the document.
    last_accessed_at REAL NOT NULL,
    document BLOB NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS discussions_request ON discussions (owner, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS discussions_owner_created ON discussions (owner, created_at_ns DESC, discussion_id DESC);
CREATE INDEX IF NOT EXISTS discussions_owner_expiry ON discussions (owner, expires_at);
CREATE INDEX IF NOT EXISTS discussions_expiry ON discussions (expires_at);
CREATE INDEX IF NOT EXISTS discussions_status ON discussions (status);
CREATE TABLE IF NOT EXISTS events (
    discussion_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (discussion_id, sequence),
    FOREIGN KEY (discussion_id) REFERENCES discussions (discussion_id) ON DELETE CASCADE
) WITHOUT ROWID;
-- Values made once per database (the id secret).
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
"""

# How many discussions each owner keeps, counted by triggers in the transaction that inserts or
# deletes, so owned() is one lookup (not a count of every row) and is right whichever process writes.
# Added to a database made before it existed, with the counts taken under the same write lock.
OWNER_COUNTS = (
    "CREATE TABLE owner_counts (owner TEXT PRIMARY KEY, discussions INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TRIGGER owner_counts_insert AFTER INSERT ON discussions BEGIN "
    "INSERT INTO owner_counts VALUES (NEW.owner, 1) ON CONFLICT (owner) DO UPDATE SET discussions = discussions + 1; "
    "END",
    "CREATE TRIGGER owner_counts_delete AFTER DELETE ON discussions BEGIN "
    "UPDATE owner_counts SET discussions = discussions - 1 WHERE owner = OLD.owner; "
    "END",
    "INSERT INTO owner_counts SELECT owner, COUNT(*) FROM discussions GROUP BY owner",
)

# Events of a discussion deleted meanwhile are dropped rather than failing the batch.
INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (discussion_id, sequence, event) "
    "SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM discussions WHERE discussion_id = ?1)"
)
SAVE = (
    "UPDATE discussions SET status = ?, expires_at = MAX(expires_at, ?), "
    "last_accessed_at = MAX(last_accessed_at, ?), document = ? WHERE discussion_id = ?"
)
TOUCH = (
    "UPDATE discussions SET last_accessed_at = MAX(last_accessed_at, ?), expires_at = MAX(expires_at, ?) "
    "WHERE discussion_id = ?"
)


@dataclass
class _Batch:
    """Writes waiting for the next commit, and the callers waiting for them."""

    # Discussions to insert, and their creators: each learns whether its row went in.
    creates: list[tuple[object, ...]] = field(default_factory=list)
    creators: list[asyncio.Future[list[Any] | None]] = field(default_factory=list)
    # (discussion_id, sequence, event), in the order written: the first write of a sequence wins.
    events: list[tuple[str, int, bytes]] = field(default_factory=list)
    # discussion_id -> (status, expires_at, last_accessed_at, document): the last save of each wins,
    # with the latest times of all of them, as if each had been applied in turn.
    documents: dict[str, tuple[int, float, float, bytes]] = field(default_factory=dict)
    # discussion_id -> (last_accessed_at, expires_at), the latest of each.
    touches: dict[str, tuple[float, float]] = field(default_factory=dict)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether nobody waits on this batch."""
        return not (self.waiters or self.creators)

    def succeed(self, inserted: list[list[Any] | None]) -> None:
        """Committed: every waiter returns, each creator with the outcome of its insert."""
        for waiter in self.waiters:
            if not waiter.done():  # done: its caller gave up waiting
                waiter.set_result(None)
        for creator, outcome in zip(self.creators, inserted, strict=True):
            if not creator.done():
                creator.set_result(outcome)

    def fail(self, error: BaseException) -> None:
        """Rolled back: every waiter raises the error."""
        for waiter in self._everyone():
            if not waiter.done():
                waiter.set_exception(error)

    def cancel(self) -> None:
        """Nobody will learn the outcome (the event loop is closing)."""
        for waiter in self._everyone():
            waiter.cancel()

    def _everyone(self) -> list[asyncio.Future[Any]]:
        return [*self.waiters, *self.creators]


class SqliteStore:
    """One SQLite connection on its own thread; writes of all discussions committed together, in order."""

    def __init__(self, connection: sqlite3.Connection, thread: concurrent.futures.ThreadPoolExecutor) -> None:
        self._db = connection
        # One worker: it alone touches the connection, and runs calls in the order they were made.
        self._thread = thread
        self._pending = _Batch()
        self._flusher: asyncio.Task[None] | None = None
        self._open = True

    @classmethod
    async def open(cls, path: pathlib.Path) -> SqliteStore:
        """Open (creating if needed) the database file and its schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            # Connected on the worker, so sqlite3's same-thread check guards against any other use.
            connection = await asyncio.get_running_loop().run_in_executor(thread, _connect, path)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(connection, thread)

    async def _run(self, function: Callable[..., Result], *args: Any) -> Result:
        """Run function(*args) on the connection's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def _query(self, sql: str, params: Sequence[object]) -> list[Any]:
        """Every row of one statement (a single trip to the thread)."""
        return await self._run(_fetch_all, self._db, sql, params)

    # --- grouped writes -------------------------------------------------------------------------------

    async def _committed(self, waiters: list[asyncio.Future[Result]]) -> Result:
        """Join `waiters` of the pending batch (which holds the caller's write) until it is committed."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        waiters.append(done)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="sqlite-store-flusher")
        return await done

    async def _flush(self) -> None:
        """Commit batch after batch until nothing is pending, then end (the next write starts another).

        One flusher at a time, batches in the order written: a write never commits before one
        acknowledged earlier, and a failed batch fails only its own writers.
        """
        try:
            while not self._pending.empty:
                batch, self._pending = self._pending, _Batch()
                try:
                    inserted = await self._run(self._commit, batch)
                except Exception as error:
                    batch.fail(error)
                except BaseException:  # cancelled: the event loop is closing
                    batch.cancel()
                    self._pending.cancel()
                    raise
                else:
                    batch.succeed(inserted)
        finally:
            self._flusher = None

    def _commit(self, batch: _Batch) -> list[list[Any] | None]:
        """On the connection's thread: the whole batch in one transaction, rolled back whole if any of it fails.

        Returns the outcome of each create, as _insert_discussion gives it.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # A create refused by a constraint undoes only its own statement; the transaction goes on.
            inserted = [_insert_discussion(self._db, row) for row in batch.creates]
            if batch.events:
                self._db.executemany(INSERT_EVENT, batch.events)
            if batch.documents:
                self._db.executemany(
                    SAVE,
                    [
                        (status, expires_at, last_accessed_at, document, discussion_id)
                        for discussion_id, (status, expires_at, last_accessed_at, document) in batch.documents.items()
                    ],
                )
            if batch.touches:
                self._db.executemany(
                    TOUCH,
                    [
                        (last_accessed_at, expires_at, discussion_id)
                        for discussion_id, (last_accessed_at, expires_at) in batch.touches.items()
                    ],
                )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return inserted

    async def save(self, discussion: Discussion) -> None:
        """Replace the document if it still exists; access and expiry times only ever move forward."""
        # Serialised now: the caller may change the document while the batch waits.
        expires_at = _seconds(discussion.expires_at)
        last_accessed_at = _seconds(discussion.last_accessed_at)
        earlier = self._pending.documents.get(discussion.discussion_id)
        if earlier is not None:
            expires_at = max(expires_at, earlier[1])
            last_accessed_at = max(last_accessed_at, earlier[2])
        self._pending.documents[discussion.discussion_id] = (
            discussion.status,
            expires_at,
            last_accessed_at,
            discussion.SerializeToString(),
        )
        await self._committed(self._pending.waiters)

    async def touch(self, discussion_id: str, last_accessed_at: float, expires_at: float) -> None:
        """New last-access and expiry times (never rewrites the document, so it cannot undo a save)."""
        earlier = self._pending.touches.get(discussion_id)
        if earlier is not None:
            last_accessed_at = max(last_accessed_at, earlier[0])
            expires_at = max(expires_at, earlier[1])
        self._pending.touches[discussion_id] = (last_accessed_at, expires_at)
        await self._committed(self._pending.waiters)

    async def append_events(self, events: list[DiscussionEvent]) -> None:
        """Append events; sequences already present are ignored, events of a deleted discussion dropped."""
        if not events:
            return
        self._pending.events.extend((e.discussion_id, e.sequence, e.SerializeToString()) for e in events)
        await self._committed(self._pending.waiters)

    async def create(self, owner: str, discussion: Discussion) -> Discussion:
        """Insert, or return the owner's discussion with the same request_id."""
        row = (
            discussion.discussion_id,
            owner,
            discussion.request_id or None,
            discussion.status,
            created_nanos(discussion),
            _seconds(discussion.expires_at),
            _seconds(discussion.last_accessed_at),
            discussion.SerializeToString(),
        )
        self._pending.creates.append(row)
        existing = await self._committed(self._pending.creators)
        if existing is None:
            return discussion
        if not existing:
            raise DiscussionExists(discussion.discussion_id)
        return _document(existing[0])

    # --- reads and deletes: one trip to the thread each -----------------------------------------------

    async def id_secret(self) -> bytes:
        """The secret made when the database was created (kept in its meta table)."""
        rows = await self._query("SELECT value FROM meta WHERE name = 'id_secret'", ())
        return bytes(rows[0][0])

    async def get(self, discussion_id: str) -> Discussion | None:
        """The document, or None."""
        rows = await self._query(f"SELECT {DOCUMENT} FROM discussions WHERE discussion_id = ?", (discussion_id,))
        return _document(rows[0]) if rows else None

    async def owner(self, discussion_id: str) -> str | None:
        """The owning principal."""
        rows = await self._query("SELECT owner FROM discussions WHERE discussion_id = ?", (discussion_id,))
        return str(rows[0][0]) if rows else None

    async def get_with_owner(self, discussion_id: str) -> tuple[Discussion, str] | None:
        """The document and its owner, in one query."""
        rows = await self._query(f"SELECT {DOCUMENT}, owner FROM discussions WHERE discussion_id = ?", (discussion_id,))
        return (_document(rows[0]), str(rows[0][3])) if rows else None

    async def events_after(self, discussion_id: str, after_sequence: int, limit: int) -> list[DiscussionEvent]:
        """Events past after_sequence, in order."""
        rows = await self._query(
            "SELECT event FROM events WHERE discussion_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (discussion_id, after_sequence, limit),
        )
        return [DiscussionEvent.FromString(row[0]) for row in rows]

    async def wait_for_events(self, discussion_id: str, after_sequence: int, timeout_seconds: float) -> bool:
        """Poll: only this process writes here, and its live readers are woken by the notifier instead."""
        await asyncio.sleep(min(timeout_seconds, POLL_SECONDS))
        return bool(await self.events_after(discussion_id, after_sequence, 1))

    async def list_page(
        self, owner: str, status: DiscussionStatus, page_size: int, page_token: str
    ) -> tuple[list[Discussion], str]:
        """Newest first, keyset-paginated."""
        query = f"SELECT {DOCUMENT} FROM discussions WHERE owner = ?"
        params: list[object] = [owner]
        if status != session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
            query += " AND status = ?"
            params.append(status)
        if page_token:
            created, discussion_id = decode_page_token(page_token)
            query += " AND (created_at_ns, discussion_id) < (?, ?)"
            params += [created, discussion_id]
        query += " ORDER BY created_at_ns DESC, discussion_id DESC LIMIT ?"
        params.append(page_size + 1)
        rows = await self._query(query, params)
        page = [_document(row) for row in rows[:page_size]]
        next_token = ""
        if len(rows) > page_size:
            next_token = encode_page_token(created_nanos(page[-1]), page[-1].discussion_id)
        return [summary_view(d) for d in page], next_token

    async def owned(self, owner: str) -> tuple[int, float | None]:
        """Count and earliest expiry of the owner's discussions: two index lookups, however many there are."""
        rows = await self._query(
            "SELECT (SELECT discussions FROM owner_counts WHERE owner = ?1), "
            "(SELECT MIN(expires_at) FROM discussions WHERE owner = ?1)",
            (owner,),
        )
        count, earliest = rows[0]
        return int(count or 0), None if earliest is None else float(earliest)

    async def delete(self, discussion_id: str) -> bool:
        """Remove the discussion; its events go with it (ON DELETE CASCADE), atomically."""
        return await self._run(_delete_discussion, self._db, discussion_id)

    async def expired(self, now: float, limit: int) -> list[str]:
        """Ids whose expiry has passed."""
        rows = await self._query("SELECT discussion_id FROM discussions WHERE expires_at <= ? LIMIT ?", (now, limit))
        return [str(row[0]) for row in rows]

    async def unfinished(self) -> list[Discussion]:
        """QUEUED or RUNNING discussions."""
        marks = ",".join("?" * len(UNFINISHED_STATUSES))
        rows = await self._query(
            f"SELECT {DOCUMENT} FROM discussions WHERE status IN ({marks})", tuple(UNFINISHED_STATUSES)
        )
        return [_document(row) for row in rows]

    async def close(self) -> None:
        """Commit what is pending, then close the connection (checkpointing the WAL) and end its thread."""
        while self._flusher is not None:
            # wait() rather than await: a cancelled close() must not cancel the commits under way.
            await asyncio.wait([self._flusher])
        if self._open:
            self._open = False
            await self._run(self._db.close)
            self._thread.shutdown(wait=False)


# --- on the connection's thread ---------------------------------------------------------------------


def _connect(path: pathlib.Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; a statement outside BEGIN commits by itself.
    connection = sqlite3.connect(path, isolation_level=None)
    # WAL + synchronous=FULL: every commit is synced to disk before it returns, so an acknowledged
    # write survives power loss too (NORMAL could lose the last commits). Group commit keeps the cost
    # to one fsync per batch: python -m bench.sqlite_sync measures it.
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=5000")
    # Deleting a discussion removes its events in the same statement.
    connection.execute("PRAGMA foreign_keys=ON")
    connection.executescript(SCHEMA)
    connection.execute("BEGIN IMMEDIATE")
    try:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'owner_counts'").fetchall():
            for statement in OWNER_COUNTS:
                connection.execute(statement)
        connection.execute("INSERT OR IGNORE INTO meta VALUES ('id_secret', ?)", (secrets.token_bytes(SECRET_BYTES),))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        connection.close()
        raise
    return connection


def _fetch_all(db: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _insert_discussion(db: sqlite3.Connection, row: tuple[object, ...]) -> list[Any] | None:
    """Insert; None if inserted, else the owner's discussion with that request_id ([] if the id is just taken)."""
    try:
        db.execute("INSERT INTO discussions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
    except sqlite3.IntegrityError:
        owner, request_id = row[1], row[2]
        return db.execute(
            f"SELECT {DOCUMENT} FROM discussions WHERE owner = ? AND request_id = ?", (owner, request_id)
        ).fetchall()
    return None


def _delete_discussion(db: sqlite3.Connection, discussion_id: str) -> bool:
    return db.execute("DELETE FROM discussions WHERE discussion_id = ?", (discussion_id,)).rowcount > 0


# --- conversions ------------------------------------------------------------------------------------


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _document(row: Any) -> Discussion:
    """The stored document with the access and expiry times from their columns."""
    doc = Discussion.FromString(row[0])
    doc.last_accessed_at.FromNanoseconds(int(row[1] * 1e9))
    doc.expires_at.FromNanoseconds(int(row[2] * 1e9))
    return doc
