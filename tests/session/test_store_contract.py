"""The Store contract: every backend (memory, SQLite, Redis) passes the same suite."""

from __future__ import annotations

import asyncio
import base64
import math
import pathlib
from collections.abc import AsyncIterator

import pytest

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.document import DiscussionStatus
from services.session.redis.connection import connect
from services.session.stores.interface import DiscussionExists, InvalidPageToken, Store
from services.session.stores.memory import MemoryStore
from services.session.stores.redis import RedisStore
from services.session.stores.sqlite import SqliteStore
from tests.redis_cluster import layout_url, redis_cluster, redis_cluster_url, redis_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server  # noqa: F401  (fixture the redis cases use)

RUNNING = session_pb2.DISCUSSION_STATUS_RUNNING
QUEUED = session_pb2.DISCUSSION_STATUS_QUEUED
COMPLETED = session_pb2.DISCUSSION_STATUS_COMPLETED
FAILED = session_pb2.DISCUSSION_STATUS_FAILED
CANCELLED = session_pb2.DISCUSSION_STATUS_CANCELLED
TIMED_OUT = session_pb2.DISCUSSION_STATUS_TIMED_OUT
INTERRUPTED = session_pb2.DISCUSSION_STATUS_INTERRUPTED
ALL = session_pb2.DISCUSSION_STATUS_UNSPECIFIED

ALICE = "alice"
BOB = "bob"


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each kind (Redis: a real redis-server or a 3-master cluster, emptied for the test)."""
    opened: Store
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "x.db")
    else:
        layout = "cluster" if request.param == "redis-cluster" else "single"
        opened = await RedisStore.open(connect(layout_url(request, layout)))
    yield opened
    await opened.close()


def discussion_id(number: int) -> str:
    return f"{number:032x}"


def make_discussion(
    number: int,
    *,
    created_seconds: int = 1_000,
    request_id: str = "",
    status: DiscussionStatus = RUNNING,
    expires_seconds: int = 1_000_000,
    topic: str = "",
) -> session_pb2.Discussion:
    doc = session_pb2.Discussion(
        discussion_id=discussion_id(number),
        topic=topic or f"topic {number}",
        status=status,
        personas=["科学家", "主持人"],
        rounds=2,
        request_id=request_id,
    )
    doc.created_at.FromSeconds(created_seconds)
    doc.updated_at.FromSeconds(created_seconds)
    doc.last_accessed_at.FromSeconds(created_seconds)
    doc.expires_at.FromSeconds(expires_seconds)
    doc.ttl.FromSeconds(600)
    return doc


def event(number: int, sequence: int, text: str = "") -> session_pb2.DiscussionEvent:
    return session_pb2.DiscussionEvent(
        discussion_id=discussion_id(number),
        sequence=sequence,
        agent_delta=discussion_pb2.AgentDelta(agent="科学家", round=1, text=text or f"chunk {sequence}"),
    )


async def list_all(store: Store, owner: str, status: DiscussionStatus, page_size: int) -> list[list[str]]:
    """Every page of a listing, as lists of ids, following page tokens to the end."""
    pages: list[list[str]] = []
    token = ""
    while True:
        page, token = await store.list_page(owner, status, page_size, token)
        pages.append([d.discussion_id for d in page])
        if not token:
            return pages
        assert len(pages) < 100, "page tokens never ran out"


# --- create / get / owner / save / touch -------------------------------------------------------------


async def test_create_then_get_returns_the_same_document(store: Store) -> None:
    doc = make_discussion(1, request_id="r-1")
    doc.results.add(agent="科学家", round=1, text="evidence", status=discussion_pb2.AGENT_STATUS_COMPLETED)
    doc.summary = "a summary"

    created = await store.create(ALICE, doc)

    assert created == doc
    assert await store.get(doc.discussion_id) == doc
    assert await store.get(discussion_id(999)) is None


async def test_get_returns_a_copy_the_caller_cannot_corrupt(store: Store) -> None:
    doc = make_discussion(1)
    await store.create(ALICE, doc)

    fetched = await store.get(doc.discussion_id)
    assert fetched is not None
    fetched.status = FAILED
    doc.status = FAILED

    stored = await store.get(doc.discussion_id)
    assert stored is not None and stored.status == RUNNING


async def test_same_owner_and_request_id_returns_the_first_discussion(store: Store) -> None:
    first = make_discussion(1, request_id="retry-me", topic="the first")
    second = make_discussion(2, request_id="retry-me", topic="the second")

    await store.create(ALICE, first)
    again = await store.create(ALICE, second)

    assert again == first
    assert await store.get(second.discussion_id) is None
    page, _ = await store.list_page(ALICE, ALL, 50, "")
    assert [d.discussion_id for d in page] == [first.discussion_id]


async def test_another_owner_with_the_same_request_id_gets_a_new_discussion(store: Store) -> None:
    mine = make_discussion(1, request_id="shared-key")
    theirs = make_discussion(2, request_id="shared-key")

    await store.create(ALICE, mine)
    created = await store.create(BOB, theirs)

    assert created == theirs
    assert await store.owner(mine.discussion_id) == ALICE
    assert await store.owner(theirs.discussion_id) == BOB


async def test_an_empty_request_id_never_deduplicates(store: Store) -> None:
    first = make_discussion(1, request_id="")
    second = make_discussion(2, request_id="")

    assert await store.create(ALICE, first) == first
    assert await store.create(ALICE, second) == second

    assert await store.get(first.discussion_id) == first
    assert await store.get(second.discussion_id) == second


@pytest.mark.parametrize(
    ("owner", "request_id"),
    [(ALICE, "another-key"), (ALICE, ""), (BOB, "alices-key"), (BOB, "")],
    ids=["same-owner-other-key", "same-owner-no-key", "other-owner-same-key", "other-owner-no-key"],
)
async def test_a_taken_id_is_refused_and_changes_nothing(store: Store, owner: str, request_id: str) -> None:
    held = make_discussion(1, request_id="alices-key", topic="alice's", expires_seconds=5_000)
    await store.create(ALICE, held)
    await store.append_events([event(1, 1, "alice's text")])

    with pytest.raises(DiscussionExists):
        await store.create(owner, make_discussion(1, request_id=request_id, topic="intruder", created_seconds=2_000))

    assert await store.get_with_owner(held.discussion_id) == (held, ALICE)
    assert [e.agent_delta.text for e in await store.events_after(held.discussion_id, 0, 10)] == ["alice's text"]
    assert await store.owned(ALICE) == (1, 5_000.0)
    assert await store.owned(BOB) == (0, None)
    assert await list_all(store, ALICE, ALL, 10) == [[held.discussion_id]]
    assert await list_all(store, BOB, ALL, 10) == [[]]
    # The holder's own retry still finds its discussion.
    assert await store.create(ALICE, make_discussion(2, request_id="alices-key")) == held


async def test_the_id_secret_is_made_once(store: Store) -> None:
    secret = await store.id_secret()

    assert len(secret) >= 16
    assert await store.id_secret() == secret


async def test_owner_names_the_creator_and_none_for_unknown_ids(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))
    await store.create(BOB, make_discussion(2))

    assert await store.owner(discussion_id(1)) == ALICE
    assert await store.owner(discussion_id(2)) == BOB
    assert await store.owner(discussion_id(3)) is None


async def test_get_with_owner_reads_the_document_and_its_owner_together(store: Store) -> None:
    mine = make_discussion(1)
    theirs = make_discussion(2, status=COMPLETED)
    await store.create(ALICE, mine)
    await store.create(BOB, theirs)
    mine.summary = "saved since"
    await store.save(mine)
    await store.touch(mine.discussion_id, 2_000.0, 5_000_000.0)

    found = await store.get_with_owner(mine.discussion_id)

    assert found is not None
    doc, owner = found
    assert owner == ALICE
    assert doc == await store.get(mine.discussion_id)
    assert doc.summary == "saved since"
    assert doc.expires_at.ToSeconds() == 5_000_000
    assert await store.get_with_owner(theirs.discussion_id) == (theirs, BOB)
    assert await store.get_with_owner(discussion_id(3)) is None
    await store.delete(mine.discussion_id)
    assert await store.get_with_owner(mine.discussion_id) is None


async def test_owned_counts_the_owners_discussions_and_finds_the_earliest_expiry(store: Store) -> None:
    assert await store.owned(ALICE) == (0, None)
    for number, expires in ((1, 3_000), (2, 1_000), (3, 2_000)):
        await store.create(ALICE, make_discussion(number, request_id=f"r{number}", expires_seconds=expires))
    await store.create(BOB, make_discussion(4, expires_seconds=500))
    await store.create(ALICE, make_discussion(5, request_id="r1"))  # a replay, not another discussion

    assert await store.owned(ALICE) == (3, 1_000.0)
    assert await store.owned(BOB) == (1, 500.0)

    await store.touch(discussion_id(2), 10.0, 4_000.0)
    assert await store.owned(ALICE) == (3, 2_000.0)
    await store.delete(discussion_id(3))
    assert await store.owned(ALICE) == (2, 3_000.0)
    await store.delete(discussion_id(1))
    await store.delete(discussion_id(2))
    assert await store.owned(ALICE) == (0, None)
    assert await store.owned(BOB) == (1, 500.0)


async def test_save_replaces_the_document_and_its_status(store: Store) -> None:
    doc = make_discussion(1)
    await store.create(ALICE, doc)

    doc.status = COMPLETED
    doc.summary = "they agreed"
    doc.completed_agents.append("科学家")
    doc.last_sequence = 7
    await store.save(doc)

    assert await store.get(doc.discussion_id) == doc
    completed, _ = await store.list_page(ALICE, COMPLETED, 50, "")
    running, _ = await store.list_page(ALICE, RUNNING, 50, "")
    assert [d.discussion_id for d in completed] == [doc.discussion_id]
    assert running == []
    assert await store.unfinished() == []


async def test_save_of_an_unknown_discussion_does_not_create_it(store: Store) -> None:
    await store.save(make_discussion(1))

    assert await store.get(discussion_id(1)) is None
    assert await store.owner(discussion_id(1)) is None


async def test_touch_moves_last_access_and_expiry(store: Store) -> None:
    doc = make_discussion(1, created_seconds=100, expires_seconds=1_000)
    await store.create(ALICE, doc)
    assert await store.expired(2_000.0, 10) == [doc.discussion_id]

    await store.touch(doc.discussion_id, 1_500.0, 5_000.0)

    touched = await store.get(doc.discussion_id)
    assert touched is not None
    assert touched.last_accessed_at.ToSeconds() == 1_500
    assert touched.expires_at.ToSeconds() == 5_000
    assert touched.status == RUNNING
    assert touched.topic == doc.topic
    assert await store.expired(2_000.0, 10) == []
    assert await store.expired(5_000.0, 10) == [doc.discussion_id]


async def test_touch_of_an_unknown_discussion_is_a_no_op(store: Store) -> None:
    await store.touch(discussion_id(1), 1.0, 2.0)

    assert await store.get(discussion_id(1)) is None


async def test_a_touch_racing_a_save_does_not_undo_the_save(store: Store) -> None:
    doc = make_discussion(1)
    await store.create(ALICE, doc)
    finished = session_pb2.Discussion()
    finished.CopyFrom(doc)
    finished.status = COMPLETED
    finished.summary = "the conclusion"

    await asyncio.gather(store.touch(doc.discussion_id, 2_000.0, 9_000.0), store.save(finished))

    stored = await store.get(doc.discussion_id)
    assert stored is not None
    assert stored.status == COMPLETED
    assert stored.summary == "the conclusion"


# --- events ------------------------------------------------------------------------------------------


async def test_events_come_back_in_order_after_a_sequence_and_up_to_a_limit(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))
    await store.append_events([event(1, s) for s in range(1, 6)])
    await store.append_events([event(1, s) for s in range(6, 11)])

    everything = await store.events_after(discussion_id(1), 0, 100)
    assert everything == [event(1, s) for s in range(1, 11)]
    assert [e.sequence for e in await store.events_after(discussion_id(1), 4, 100)] == [5, 6, 7, 8, 9, 10]
    assert [e.sequence for e in await store.events_after(discussion_id(1), 4, 3)] == [5, 6, 7]
    assert await store.events_after(discussion_id(1), 10, 100) == []
    assert await store.events_after(discussion_id(2), 0, 100) == []


async def test_a_sequence_already_written_keeps_its_first_event(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))
    await store.append_events([event(1, 1, "first"), event(1, 2, "second")])

    await store.append_events([event(1, 2, "rewritten"), event(1, 3, "third")])
    await store.append_events([event(1, 1, "rewritten again")])

    texts = [e.agent_delta.text for e in await store.events_after(discussion_id(1), 0, 100)]
    assert texts == ["first", "second", "third"]


async def test_events_written_out_of_order_are_all_kept(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))

    await store.append_events([event(1, 3)])
    await store.append_events([event(1, 1), event(1, 2)])

    assert [e.sequence for e in await store.events_after(discussion_id(1), 0, 100)] == [1, 2, 3]


async def test_events_of_an_unknown_discussion_are_dropped_silently(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))

    await store.append_events([event(1, 1), event(2, 1), event(1, 2), event(2, 2)])

    assert [e.sequence for e in await store.events_after(discussion_id(1), 0, 100)] == [1, 2]
    assert await store.events_after(discussion_id(2), 0, 100) == []
    assert await store.get(discussion_id(2)) is None


async def test_a_large_batch_of_events_lands_whole(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))

    await store.append_events([event(1, s) for s in range(1, 1_001)])

    events = await store.events_after(discussion_id(1), 0, 5_000)
    assert [e.sequence for e in events] == list(range(1, 1_001))


# --- list --------------------------------------------------------------------------------------------


async def test_list_shows_only_the_owners_discussions_newest_first(store: Store) -> None:
    await store.create(ALICE, make_discussion(1, created_seconds=10))
    await store.create(BOB, make_discussion(2, created_seconds=20))
    await store.create(ALICE, make_discussion(3, created_seconds=30))
    # Same creation time: the larger id comes first.
    await store.create(ALICE, make_discussion(4, created_seconds=20))
    await store.create(ALICE, make_discussion(5, created_seconds=20))

    page, token = await store.list_page(ALICE, ALL, 50, "")

    assert [d.discussion_id for d in page] == [discussion_id(n) for n in (3, 5, 4, 1)]
    assert token == ""
    bobs, _ = await store.list_page(BOB, ALL, 50, "")
    assert [d.discussion_id for d in bobs] == [discussion_id(2)]
    assert await store.list_page("nobody", ALL, 50, "") == ([], "")


async def test_list_filters_by_status(store: Store) -> None:
    statuses = [RUNNING, COMPLETED, FAILED, COMPLETED, QUEUED, CANCELLED]
    for number, status in enumerate(statuses, start=1):
        await store.create(ALICE, make_discussion(number, created_seconds=number, status=status))

    completed, _ = await store.list_page(ALICE, COMPLETED, 50, "")
    failed, _ = await store.list_page(ALICE, FAILED, 50, "")
    timed_out, _ = await store.list_page(ALICE, TIMED_OUT, 50, "")
    everything, _ = await store.list_page(ALICE, ALL, 50, "")

    assert [d.discussion_id for d in completed] == [discussion_id(4), discussion_id(2)]
    assert [d.discussion_id for d in failed] == [discussion_id(3)]
    assert timed_out == []
    assert len(everything) == len(statuses)


@pytest.mark.parametrize(("count", "page_size"), [(23, 5), (20, 5), (5, 5), (1, 5), (7, 1)])
async def test_page_tokens_walk_every_discussion_exactly_once(store: Store, count: int, page_size: int) -> None:
    expected_order = []
    for number in range(1, count + 1):
        # Groups of three share a creation time, so the id tie-break is exercised across page edges.
        created = 1_000 + number // 3
        await store.create(ALICE, make_discussion(number, created_seconds=created))
        await store.create(BOB, make_discussion(10_000 + number, created_seconds=created))
        expected_order.append((created, discussion_id(number)))
    expected = [i for _, i in sorted(expected_order, reverse=True)]

    pages = await list_all(store, ALICE, ALL, page_size)

    assert [i for page in pages for i in page] == expected
    assert len(pages) == math.ceil(count / page_size)
    assert all(len(page) == page_size for page in pages[:-1])


async def test_paging_with_a_status_filter_sees_only_that_status(store: Store) -> None:
    for number in range(1, 24):
        status = COMPLETED if number % 2 else FAILED
        await store.create(ALICE, make_discussion(number, created_seconds=number, status=status))

    pages = await list_all(store, ALICE, COMPLETED, 5)

    assert [i for page in pages for i in page] == [discussion_id(n) for n in range(23, 0, -2)]


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "%%%",
        base64.urlsafe_b64encode(b"no-separator").decode(),
        base64.urlsafe_b64encode(b"soon:" + discussion_id(1).encode()).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe:x").decode(),
    ],
)
async def test_a_token_the_store_did_not_issue_is_rejected(store: Store, token: str) -> None:
    await store.create(ALICE, make_discussion(1))

    with pytest.raises(InvalidPageToken):
        await store.list_page(ALICE, ALL, 5, token)


async def test_listings_leave_out_results_but_get_keeps_them(store: Store) -> None:
    doc = make_discussion(1, status=COMPLETED)
    doc.results.add(agent="科学家", round=1, text="long answer " * 50)
    doc.results.add(agent="哲学家", round=1, text="another long answer")
    doc.summary = "the summary"
    await store.create(ALICE, doc)

    (listed,), _ = await store.list_page(ALICE, ALL, 5, "")

    assert len(listed.results) == 0
    assert listed.summary == "the summary"
    assert listed.topic == doc.topic
    assert listed.status == COMPLETED
    fetched = await store.get(doc.discussion_id)
    assert fetched is not None and len(fetched.results) == 2


# --- delete / expired / unfinished -------------------------------------------------------------------


async def test_delete_removes_the_discussion_and_its_events(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))
    await store.create(ALICE, make_discussion(2))
    await store.append_events([event(1, 1), event(1, 2), event(2, 1)])

    assert await store.delete(discussion_id(1)) is True

    assert await store.get(discussion_id(1)) is None
    assert await store.owner(discussion_id(1)) is None
    assert await store.events_after(discussion_id(1), 0, 100) == []
    page, _ = await store.list_page(ALICE, ALL, 50, "")
    assert [d.discussion_id for d in page] == [discussion_id(2)]
    assert await store.expired(math.inf, 100) == [discussion_id(2)]
    assert [e.sequence for e in await store.events_after(discussion_id(2), 0, 100)] == [1]
    assert await store.delete(discussion_id(1)) is False
    assert await store.delete(discussion_id(3)) is False


async def test_events_for_a_deleted_discussion_are_dropped(store: Store) -> None:
    await store.create(ALICE, make_discussion(1))
    await store.delete(discussion_id(1))

    await store.append_events([event(1, 1)])

    assert await store.events_after(discussion_id(1), 0, 100) == []


async def test_delete_frees_the_request_id(store: Store) -> None:
    await store.create(ALICE, make_discussion(1, request_id="again"))
    await store.append_events([event(1, 1)])
    await store.delete(discussion_id(1))

    fresh = make_discussion(2, request_id="again")
    created = await store.create(ALICE, fresh)

    assert created == fresh
    assert await store.get(discussion_id(2)) == fresh
    assert await store.events_after(discussion_id(2), 0, 100) == []
    assert await store.create(ALICE, make_discussion(3, request_id="again")) == fresh


async def test_expired_returns_exactly_the_discussions_past_their_expiry(store: Store) -> None:
    expiries = {1: 100, 2: 200, 3: 300, 4: 400, 5: 500}
    for number, expires in expiries.items():
        await store.create(ALICE if number % 2 else BOB, make_discussion(number, expires_seconds=expires))

    assert await store.expired(99.0, 100) == []
    assert sorted(await store.expired(300.0, 100)) == [discussion_id(n) for n in (1, 2, 3)]
    assert sorted(await store.expired(10_000.0, 100)) == [discussion_id(n) for n in range(1, 6)]


async def test_expired_returns_at_most_limit_ids(store: Store) -> None:
    for number in range(1, 11):
        await store.create(ALICE, make_discussion(number, expires_seconds=100))
    await store.create(ALICE, make_discussion(11, expires_seconds=10_000))

    batch = await store.expired(1_000.0, 4)

    assert len(batch) == 4
    assert len(set(batch)) == 4
    assert set(batch) <= {discussion_id(n) for n in range(1, 11)}


async def test_save_can_move_the_expiry(store: Store) -> None:
    doc = make_discussion(1, expires_seconds=100)
    await store.create(ALICE, doc)

    doc.expires_at.FromSeconds(10_000)
    await store.save(doc)

    assert await store.expired(1_000.0, 10) == []


async def test_unfinished_returns_queued_and_running_only(store: Store) -> None:
    statuses = [QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT, INTERRUPTED, RUNNING]
    for number, status in enumerate(statuses, start=1):
        await store.create(ALICE if number % 2 else BOB, make_discussion(number, status=status))
    finished = await store.get(discussion_id(8))
    assert finished is not None
    finished.status = COMPLETED
    await store.save(finished)

    unfinished = await store.unfinished()

    assert sorted(d.discussion_id for d in unfinished) == [discussion_id(1), discussion_id(2)]
    assert {d.status for d in unfinished} == {QUEUED, RUNNING}


# --- concurrency -------------------------------------------------------------------------------------


async def test_concurrent_creates_with_one_request_id_make_one_discussion(store: Store) -> None:
    attempts = [make_discussion(n, request_id="double-click") for n in range(1, 101)]

    results = await asyncio.gather(*(store.create(ALICE, doc) for doc in attempts))

    winners = {d.discussion_id for d in results}
    assert len(winners) == 1
    (winner,) = winners
    assert winner in {d.discussion_id for d in attempts}
    page, _ = await store.list_page(ALICE, ALL, 500, "")
    assert [d.discussion_id for d in page] == [winner]


async def test_concurrent_appends_to_many_discussions_all_land(store: Store) -> None:
    for number in range(1, 51):
        await store.create(ALICE, make_discussion(number))

    await asyncio.gather(*(store.append_events([event(n, s) for s in (1, 2, 3)]) for n in range(1, 51)))

    for number in range(1, 51):
        events = await store.events_after(discussion_id(number), 0, 100)
        assert [(e.discussion_id, e.sequence) for e in events] == [(discussion_id(number), s) for s in (1, 2, 3)]


# --- SQLite only -------------------------------------------------------------------------------------


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "durable.db"
    first = await SqliteStore.open(path)
    kept = make_discussion(1, created_seconds=10, request_id="keep", expires_seconds=500)
    done = make_discussion(2, created_seconds=20, status=COMPLETED)
    gone = make_discussion(3, created_seconds=30)
    await first.create(ALICE, kept)
    await first.create(BOB, done)
    await first.create(ALICE, gone)
    await first.append_events([event(1, 1, "one"), event(1, 2, "two"), event(3, 1)])
    await first.touch(kept.discussion_id, 50.0, 5_000.0)
    done.summary = "saved before the restart"
    await first.save(done)
    await first.delete(gone.discussion_id)
    secret = await first.id_secret()
    await first.close()

    reopened = await SqliteStore.open(path)
    try:
        fetched = await reopened.get(kept.discussion_id)
        assert fetched is not None
        assert fetched.topic == kept.topic
        assert fetched.expires_at.ToSeconds() == 5_000
        assert await reopened.get(done.discussion_id) == done
        assert await reopened.get(gone.discussion_id) is None
        assert await reopened.owner(kept.discussion_id) == ALICE
        assert await reopened.owner(done.discussion_id) == BOB
        texts = [e.agent_delta.text for e in await reopened.events_after(kept.discussion_id, 0, 100)]
        assert texts == ["one", "two"]
        assert await reopened.events_after(gone.discussion_id, 0, 100) == []
        page, _ = await reopened.list_page(ALICE, ALL, 50, "")
        assert [d.discussion_id for d in page] == [kept.discussion_id]
        assert await reopened.expired(1_000.0, 10) == []
        assert [d.discussion_id for d in await reopened.unfinished()] == [kept.discussion_id]
        replay = await reopened.create(ALICE, make_discussion(4, request_id="keep"))
        assert replay.discussion_id == kept.discussion_id
        assert await reopened.id_secret() == secret
    finally:
        await reopened.close()


# --- Redis only --------------------------------------------------------------------------------------


async def test_every_redis_store_on_one_redis_reads_the_same_id_secret(redis_url: str) -> None:  # noqa: F811
    stores = [await RedisStore.open(connect(redis_url)) for _ in range(3)]
    try:
        secrets = await asyncio.gather(*(s.id_secret() for s in stores))
    finally:
        for opened in stores:
            await opened.close()

    assert len(set(secrets)) == 1
