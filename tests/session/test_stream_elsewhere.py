"""Following a discussion another replica runs, when its finished document is stored before its terminal event."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session import discussions
from services.session.auth import ANONYMOUS
from services.session.ids import IdScope
from tests.session.test_cross_replica_reads import SCIENTIST, recorded
from tests.session.test_store_contract import make_discussion
from tests.suite import Suite

COMPLETED = session_pb2.DISCUSSION_STATUS_COMPLETED


async def finished_without_its_last_event(suite: Suite, seed: int) -> tuple[str, session_pb2.Discussion]:
    """Stored as another replica leaves it between its two last writes: the document finished, the log one short."""
    store = suite.session_service.store
    doc = make_discussion(seed, expires_seconds=int(time.time()) + 3_600)
    public_id = doc.discussion_id
    doc.discussion_id = IdScope(await store.id_secret()).store_id(ANONYMOUS, public_id)
    await store.create(ANONYMOUS, doc)
    await store.append_events([recorded(doc, 1, agent_started=discussion_pb2.AgentStarted(agent=SCIENTIST, round=1))])
    doc.status = COMPLETED
    doc.last_sequence = 2
    doc.updated_at.GetCurrentTime()
    await store.save(doc)
    return public_id, doc


async def stream(suite: Suite, public_id: str) -> list[session_pb2.DiscussionEvent]:
    call = suite.session().StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=public_id), timeout=20)
    return [event async for event in call]


async def test_the_stream_waits_for_the_terminal_event_the_owner_appends_after_its_save(suite: Suite) -> None:
    public_id, doc = await finished_without_its_last_event(suite, 0xE1)
    terminal = recorded(doc, 2, status_changed=session_pb2.StatusChanged(status=COMPLETED))
    terminal.time.FromSeconds(1_234)  # unlike anything the document holds: proves this very event was sent

    async def append_late() -> None:
        await asyncio.sleep(1.0)
        await suite.session_service.store.append_events([terminal])

    appending = asyncio.create_task(append_late())
    events = await stream(suite, public_id)
    await appending
    assert [event.sequence for event in events] == [1, 2]
    assert events[-1].status_changed.status == COMPLETED
    assert events[-1].time.seconds == 1_234


async def test_without_the_terminal_event_the_stream_ends_on_one_rebuilt_from_the_document(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discussions, "TERMINAL_EVENT_GRACE_SECONDS", 0.5)
    public_id, doc = await finished_without_its_last_event(suite, 0xE2)
    events = await stream(suite, public_id)
    assert [event.sequence for event in events] == [1, 2]
    assert events[-1].discussion_id == public_id
    assert events[-1].status_changed.status == COMPLETED
    assert events[-1].time == doc.updated_at
