"""The Store interface: discussions, their event logs, the owner index and idempotency keys.

Implementations (memory, SQLite; Redis in the scale-out work) pass one contract
test suite, tests/session/test_store_contract.py.
"""

from __future__ import annotations

import base64
from typing import Protocol

from services.gen.roundtable.session.v1 import session_pb2
from services.session.document import DiscussionStatus

Discussion = session_pb2.Discussion
DiscussionEvent = session_pb2.DiscussionEvent

# How often a reader polls a store that cannot block until an event arrives.
POLL_SECONDS = 0.5


class Store(Protocol):
    """Durable home of discussions and their events."""

    async def create(self, owner: str, discussion: Discussion) -> Discussion:
        """Insert a discussion; if the owner already used its request_id, return that one instead.

        Raises DiscussionExists if the id is taken otherwise: a stored discussion is never replaced.
        """
        ...

    async def id_secret(self) -> bytes:
        """The key that scopes discussion ids by owner (services/session/ids.py): made once, the same for every
        replica and restart that shares this store."""
        ...

    async def get(self, discussion_id: str) -> Discussion | None:
        """The stored document, or None."""
        ...

    async def owner(self, discussion_id: str) -> str | None:
        """The principal that owns the discussion, or None if it does not exist."""
        ...

    async def get_with_owner(self, discussion_id: str) -> tuple[Discussion, str] | None:
        """The stored document and its owner, read together (one round trip), or None."""
        ...

    async def save(self, discussion: Discussion) -> None:
        """Replace the stored document (it must exist)."""
        ...

    async def touch(self, discussion_id: str, last_accessed_at: float, expires_at: float) -> None:
        """Record a read: new last-access and expiry times (seconds since the epoch)."""
        ...

    async def append_events(self, events: list[DiscussionEvent]) -> None:
        """Append events; each (discussion_id, sequence) is written once."""
        ...

    async def events_after(self, discussion_id: str, after_sequence: int, limit: int) -> list[DiscussionEvent]:
        """Up to `limit` events with sequence > after_sequence, in order."""
        ...

    async def wait_for_events(self, discussion_id: str, after_sequence: int, timeout_seconds: float) -> bool:
        """Block until an event past after_sequence exists (recorded by any replica); False after the timeout."""
        ...

    async def list_page(
        self, owner: str, status: DiscussionStatus, page_size: int, page_token: str
    ) -> tuple[list[Discussion], str]:
        """The owner's discussions newest first (all statuses if UNSPECIFIED), and the next page token."""
        ...

    async def owned(self, owner: str) -> tuple[int, float | None]:
        """How many discussions the owner has stored, and the earliest time one of them expires."""
        ...

    async def delete(self, discussion_id: str) -> bool:
        """Remove a discussion and its events; False if it did not exist."""
        ...

    async def expired(self, now: float, limit: int) -> list[str]:
        """Ids of discussions whose expiry time has passed."""
        ...

    async def unfinished(self) -> list[Discussion]:
        """Discussions left QUEUED or RUNNING (after a restart)."""
        ...

    async def close(self) -> None:
        """Flush and release resources."""
        ...


class DiscussionExists(ValueError):
    """create() was given an id that is taken (a client-proposed id used twice)."""


class InvalidPageToken(ValueError):
    """A page token that this store did not hand out."""


def encode_page_token(created_at_nanos: int, discussion_id: str) -> str:
    """Keyset cursor: the last item's creation time and id."""
    return base64.urlsafe_b64encode(f"{created_at_nanos}:{discussion_id}".encode()).decode()


def decode_page_token(token: str) -> tuple[int, str]:
    """Inverse of encode_page_token; raises InvalidPageToken."""
    try:
        created, discussion_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        created_nanos = int(created)
    except (ValueError, UnicodeError) as error:
        raise InvalidPageToken("page_token is not one this server issued") from error
    if not 0 <= created_nanos < 2**63 or len(discussion_id) > 64:
        raise InvalidPageToken("page_token is not one this server issued")
    return created_nanos, discussion_id


def created_nanos(discussion: Discussion) -> int:
    """Creation time in nanoseconds, the primary sort key of listings."""
    return discussion.created_at.ToNanoseconds()


def summary_view(discussion: Discussion) -> Discussion:
    """A listing's copy: the document without results."""
    copy = Discussion()
    copy.CopyFrom(discussion)
    del copy.results[:]
    return copy
