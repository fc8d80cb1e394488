"""Reading a discussion another replica runs: the stored document plus the events recorded since it was saved."""

from __future__ import annotations

import time

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.auth import ANONYMOUS
from services.session.ids import IdScope
from tests.session.test_store_contract import make_discussion
from tests.suite import Suite

SCIENTIST = "科学家"


def recorded(doc: session_pb2.Discussion, sequence: int, **payload: object) -> session_pb2.DiscussionEvent:
    return session_pb2.DiscussionEvent(discussion_id=doc.discussion_id, sequence=sequence, **payload)  # type: ignore[arg-type]


async def test_get_shows_the_progress_another_replica_recorded_after_its_last_save(suite: Suite) -> None:
    store = suite.session_service.store
    # Stored as another replica leaves it: saved at the agent's start, its answer only in the event log since.
    doc = make_discussion(0xC0FFEE, expires_seconds=int(time.time()) + 3_600)
    # The store knows it by its store id; the caller by the id it proposed.
    public_id = doc.discussion_id
    doc.discussion_id = IdScope(await store.id_secret()).store_id(ANONYMOUS, public_id)
    doc.results.add(agent=SCIENTIST, round=1, status=discussion_pb2.AGENT_STATUS_RUNNING)
    doc.last_sequence = 1
    await store.create(ANONYMOUS, doc)
    started = recorded(doc, 1, agent_started=discussion_pb2.AgentStarted(agent=SCIENTIST, round=1))
    # More than one read's worth of events.
    deltas = [
        recorded(doc, sequence, agent_delta=discussion_pb2.AgentDelta(agent=SCIENTIST, round=1, text=f"{sequence} "))
        for sequence in range(2, 302)
    ]
    await store.append_events([started, *deltas])

    current = await suite.session().GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=public_id), timeout=10)

    assert current.discussion_id == public_id
    assert current.status == session_pb2.DISCUSSION_STATUS_RUNNING
    assert current.last_sequence == 301
    (answer,) = current.results
    assert answer.text == "".join(f"{sequence} " for sequence in range(2, 302))
    assert answer.status == discussion_pb2.AGENT_STATUS_RUNNING
    stored = await store.get(doc.discussion_id)
    assert stored is not None and stored.last_sequence == 1  # a read folds events in; it never saves
    await store.delete(doc.discussion_id)
