"""SQLite Store: the embedded default. WAL mode; every acknowledged write is committed before it returns."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from typing import Any

import aiosqlite
from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.roundtable.session.v1 import session_pb2
from services.session.store import (
    POLL_SECONDS,
    UNFINISHED_STATUSES,
    Discussion,
    DiscussionEvent,
    DiscussionExists,
    DiscussionStatus,
    created_nanos,
    decode_page_token,
    encode_page_token,
    summary_view,
)

EVENTS_PER_STATEMENT = 200
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
CREATE INDEX IF NOT EXISTS discussions_expiry ON discussions (expires_at);
CREATE INDEX IF NOT EXISTS discussions_status ON discussions (status);
CREATE TABLE IF NOT EXISTS events (
    discussion_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (discussion_id, sequence),
    FOREIGN KEY (discussion_id) REFERENCES discussions (discussion_id) ON DELETE CASCADE
) WITHOUT ROWID;
"""


class SqliteStore:
    """One aiosqlite connection (its own thread); statements run in order, each committed."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection

    @classmethod
    async def open(cls, path: pathlib.Path) -> SqliteStore:
        """Open (creating if needed) the database file and its schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so each statement is durable when it returns.
        connection = await aiosqlite.connect(path, isolation_level=None)
        # WAL + synchronous=NORMAL: a committed transaction survives a process crash;
        # only an OS crash or power loss can take the last few.
        await connection.execute("PRAGMA journal_mode=WAL")
        await connection.execute("PRAGMA synchronous=NORMAL")
        await connection.execute("PRAGMA busy_timeout=5000")
        # Deleting a discussion removes its events in the same statement.
        await connection.execute("PRAGMA foreign_keys=ON")
        await connection.executescript(SCHEMA)
        return cls(connection)

    async def create(self, owner: str, discussion: Discussion) -> Discussion:
        """Insert, or return the owner's discussion with the same request_id."""
        try:
            await self._db.execute(
                "INSERT INTO discussions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    discussion.discussion_id,
                    owner,
                    discussion.request_id or None,
                    discussion.status,
                    created_nanos(discussion),
                    _seconds(discussion.expires_at),
                    _seconds(discussion.last_accessed_at),
                    discussion.SerializeToString(),
                ),
            )
        except sqlite3.IntegrityError:
            async with self._db.execute(
                f"SELECT {DOCUMENT} FROM discussions WHERE owner = ? AND request_id = ?",
                (owner, discussion.request_id),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                raise DiscussionExists(discussion.discussion_id) from None
            return _document(row)
        return discussion

    async def get(self, discussion_id: str) -> Discussion | None:
        """The document, or None."""
        async with self._db.execute(
            f"SELECT {DOCUMENT} FROM discussions WHERE discussion_id = ?", (discussion_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _document(row)

    async def owner(self, discussion_id: str) -> str | None:
        """The owning principal."""
        async with self._db.execute(
            "SELECT owner FROM discussions WHERE discussion_id = ?", (discussion_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def save(self, discussion: Discussion) -> None:
        """Replace the document if it still exists; access and expiry times only ever move forward."""
        await self._db.execute(
            "UPDATE discussions SET status = ?, expires_at = MAX(expires_at, ?), "
            "last_accessed_at = MAX(last_accessed_at, ?), document = ? WHERE discussion_id = ?",
            (
                discussion.status,
                _seconds(discussion.expires_at),
                _seconds(discussion.last_accessed_at),
                discussion.SerializeToString(),
                discussion.discussion_id,
            ),
        )

    async def touch(self, discussion_id: str, last_accessed_at: float, expires_at: float) -> None:
        """New last-access and expiry times, in one statement (never rewrites the document)."""
        await self._db.execute(
            "UPDATE discussions SET last_accessed_at = MAX(last_accessed_at, ?), expires_at = MAX(expires_at, ?) "
            "WHERE discussion_id = ?",
            (last_accessed_at, expires_at, discussion_id),
        )

    async def append_events(self, events: list[DiscussionEvent]) -> None:
        """Append events, one statement (one commit) per batch; sequences already present are ignored."""
        for start in range(0, len(events), EVENTS_PER_STATEMENT):
            batch = events[start : start + EVENTS_PER_STATEMENT]
            values = ",".join("(?, ?, ?)" for _ in batch)
            params: list[object] = []
            for event in batch:
                params += [event.discussion_id, event.sequence, event.SerializeToString()]
            # Events of a discussion deleted meanwhile are dropped rather than failing the batch.
            await self._db.execute(
                "INSERT OR IGNORE INTO events (discussion_id, sequence, event) "
                f"SELECT column1, column2, column3 FROM (VALUES {values}) "
                "WHERE column1 IN (SELECT discussion_id FROM discussions)",
                params,
            )

    async def events_after(self, discussion_id: str, after_sequence: int, limit: int) -> list[DiscussionEvent]:
        """Events past after_sequence, in order."""
        async with self._db.execute(
            "SELECT event FROM events WHERE discussion_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (discussion_id, after_sequence, limit),
        ) as cursor:
            rows = await cursor.fetchall()
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
        async with self._db.execute(query, params) as cursor:
            rows = list(await cursor.fetchall())
        page = [_document(row) for row in rows[:page_size]]
        next_token = ""
        if len(rows) > page_size:
            next_token = encode_page_token(created_nanos(page[-1]), page[-1].discussion_id)
        return [summary_view(d) for d in page], next_token

    async def owned(self, owner: str) -> tuple[int, float | None]:
        """Count and earliest expiry of the owner's discussions (one indexed query)."""
        async with self._db.execute(
            "SELECT COUNT(*), MIN(expires_at) FROM discussions WHERE owner = ?", (owner,)
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), None if row[1] is None else float(row[1])

    async def delete(self, discussion_id: str) -> bool:
        """Remove the discussion; its events go with it (ON DELETE CASCADE), atomically."""
        cursor = await self._db.execute("DELETE FROM discussions WHERE discussion_id = ?", (discussion_id,))
        return cursor.rowcount > 0

    async def expired(self, now: float, limit: int) -> list[str]:
        """Ids whose expiry has passed."""
        async with self._db.execute(
            "SELECT discussion_id FROM discussions WHERE expires_at <= ? LIMIT ?", (now, limit)
        ) as cursor:
            rows = await cursor.fetchall()
        return [str(row[0]) for row in rows]

    async def unfinished(self) -> list[Discussion]:
        """QUEUED or RUNNING discussions."""
        marks = ",".join("?" * len(UNFINISHED_STATUSES))
        async with self._db.execute(
            f"SELECT {DOCUMENT} FROM discussions WHERE status IN ({marks})", tuple(UNFINISHED_STATUSES)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_document(row) for row in rows]

    async def close(self) -> None:
        """Checkpoint and close the connection."""
        await self._db.close()


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _document(row: Any) -> Discussion:
    """The stored document with the access and expiry times from their columns."""
    doc = Discussion.FromString(row[0])
    doc.last_accessed_at.FromNanoseconds(int(row[1] * 1e9))
    doc.expires_at.FromNanoseconds(int(row[2] * 1e9))
    return doc
