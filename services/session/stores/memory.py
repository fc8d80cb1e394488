"""In-memory Store, for tests and throwaway runs."""

from __future__ import annotations

import asyncio
import bisect
import secrets

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


class MemoryStore:
    """Keeps everything in dicts; every method completes without yielding, so each is atomic."""

    def __init__(self) -> None:
        self._discussions: dict[str, Discussion] = {}
        self._owners: dict[str, str] = {}
        self._owned: dict[str, set[str]] = {}  # owner -> ids, so owned() looks at one owner's only
        self._expires_at: dict[str, float] = {}
        self._events: dict[str, list[DiscussionEvent]] = {}
        self._requests: dict[tuple[str, str], str] = {}
        self._id_secret = secrets.token_bytes(SECRET_BYTES)

    async def create(self, owner: str, discussion: Discussion) -> Discussion:
        """Insert, or return the owner's discussion with the same request_id; a taken id is never overwritten."""
        if discussion.request_id:
            existing = self._requests.get((owner, discussion.request_id))
            if existing is not None and existing in self._discussions:
                return _copy(self._discussions[existing])
        if discussion.discussion_id in self._discussions:
            raise DiscussionExists(discussion.discussion_id)
        if discussion.request_id:
            self._requests[(owner, discussion.request_id)] = discussion.discussion_id
        self._discussions[discussion.discussion_id] = _copy(discussion)
        self._owners[discussion.discussion_id] = owner
        self._owned.setdefault(owner, set()).add(discussion.discussion_id)
        self._expires_at[discussion.discussion_id] = discussion.expires_at.ToNanoseconds() / 1e9
        self._events[discussion.discussion_id] = []
        return _copy(discussion)

    async def id_secret(self) -> bytes:
        """This process's secret: the store lives no longer than the process."""
        return self._id_secret

    async def get(self, discussion_id: str) -> Discussion | None:
        """A copy of the document, or None."""
        found = self._discussions.get(discussion_id)
        return None if found is None else _copy(found)

    async def owner(self, discussion_id: str) -> str | None:
        """The owning principal."""
        return self._owners.get(discussion_id)

    async def get_with_owner(self, discussion_id: str) -> tuple[Discussion, str] | None:
        """A copy of the document and its owner, or None."""
        found = self._discussions.get(discussion_id)
        return None if found is None else (_copy(found), self._owners[discussion_id])

    async def save(self, discussion: Discussion) -> None:
        """Replace the document if it still exists."""
        current = self._discussions.get(discussion.discussion_id)
        if current is None:
            return
        replacement = _copy(discussion)
        # Access and expiry times only move forward, as in the SQLite store.
        for name in ("last_accessed_at", "expires_at"):
            if getattr(current, name).ToNanoseconds() > getattr(replacement, name).ToNanoseconds():
                getattr(replacement, name).CopyFrom(getattr(current, name))
        self._discussions[discussion.discussion_id] = replacement
        self._expires_at[discussion.discussion_id] = replacement.expires_at.ToNanoseconds() / 1e9

    async def touch(self, discussion_id: str, last_accessed_at: float, expires_at: float) -> None:
        """New last-access and expiry times."""
        found = self._discussions.get(discussion_id)
        if found is not None:
            found.last_accessed_at.FromNanoseconds(
                max(found.last_accessed_at.ToNanoseconds(), int(last_accessed_at * 1e9))
            )
            found.expires_at.FromNanoseconds(max(found.expires_at.ToNanoseconds(), int(expires_at * 1e9)))
            self._expires_at[discussion_id] = found.expires_at.ToNanoseconds() / 1e9

    async def append_events(self, events: list[DiscussionEvent]) -> None:
        """Append events to their discussions' logs, ignoring sequences already present."""
        for event in events:
            log = self._events.get(event.discussion_id)
            if log is None:
                continue
            position = bisect.bisect_left(log, event.sequence, key=lambda e: e.sequence)
            if position < len(log) and log[position].sequence == event.sequence:
                continue  # the first write of a sequence number wins
            log.insert(position, _copy_event(event))

    async def events_after(self, discussion_id: str, after_sequence: int, limit: int) -> list[DiscussionEvent]:
        """Events past after_sequence, in order."""
        log = self._events.get(discussion_id, [])
        start = bisect.bisect_right(log, after_sequence, key=lambda e: e.sequence)
        return [_copy_event(e) for e in log[start : start + limit]]

    async def wait_for_events(self, discussion_id: str, after_sequence: int, timeout_seconds: float) -> bool:
        """Poll: only this process writes here, and its live readers are woken by the notifier instead."""
        await asyncio.sleep(min(timeout_seconds, POLL_SECONDS))
        return bool(await self.events_after(discussion_id, after_sequence, 1))

    async def list_page(
        self, owner: str, status: DiscussionStatus, page_size: int, page_token: str
    ) -> tuple[list[Discussion], str]:
        """Newest first, keyset-paginated."""
        cursor = decode_page_token(page_token) if page_token else None
        rows = sorted(
            (
                d
                for d in self._discussions.values()
                if self._owners[d.discussion_id] == owner
                and (status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED or d.status == status)
            ),
            key=lambda d: (created_nanos(d), d.discussion_id),
            reverse=True,
        )
        if cursor is not None:
            rows = [d for d in rows if (created_nanos(d), d.discussion_id) < cursor]
        page = rows[:page_size]
        next_token = ""
        if len(rows) > page_size:
            last = page[-1]
            next_token = encode_page_token(created_nanos(last), last.discussion_id)
        return [summary_view(d) for d in page], next_token

    async def owned(self, owner: str) -> tuple[int, float | None]:
        """Count and earliest expiry of the owner's discussions."""
        expiries = [self._expires_at[i] for i in self._owned.get(owner, ())]
        return len(expiries), min(expiries, default=None)

    async def delete(self, discussion_id: str) -> bool:
        """Remove the discussion, its events and its idempotency key."""
        found = self._discussions.pop(discussion_id, None)
        if found is None:
            return False
        owner = self._owners.pop(discussion_id)
        self._owned[owner].discard(discussion_id)
        self._expires_at.pop(discussion_id, None)
        self._events.pop(discussion_id, None)
        if found.request_id:
            self._requests.pop((owner, found.request_id), None)
        return True

    async def expired(self, now: float, limit: int) -> list[str]:
        """Ids whose expiry has passed."""
        return [i for i, at in self._expires_at.items() if at <= now][:limit]

    async def unfinished(self) -> list[Discussion]:
        """QUEUED or RUNNING discussions."""
        return [_copy(d) for d in self._discussions.values() if d.status in UNFINISHED_STATUSES]

    async def close(self) -> None:
        """Nothing to release."""


def _copy(discussion: Discussion) -> Discussion:
    copy = Discussion()
    copy.CopyFrom(discussion)
    return copy


def _copy_event(event: DiscussionEvent) -> DiscussionEvent:
    copy = DiscussionEvent()
    copy.CopyFrom(event)
    return copy
