"""The SDK's calls against a real suite: discuss streams every event once to the end; create is idempotent and
proposes the id a load balancer routes on; list follows pages; delete removes; the sync client does the same."""

from __future__ import annotations

import asyncio
import datetime
import re
from typing import Any

import grpc
import pytest
from roundtable_client import (
    AgentCompleted,
    Client,
    DiscussionStatus,
    NotFound,
    RoundCompleted,
    StatusChanged,
    SummaryCompleted,
    SyncClient,
    Tls,
)

from tests.client.conftest import PERSONAS, assert_whole_stream, final_status
from tests.suite import Suite


async def test_discuss_streams_every_event_once_in_order_to_the_terminal_status(client: Client) -> None:
    events = [event async for event in client.discuss("Is tea better than coffee?", personas=PERSONAS, rounds=2)]
    assert_whole_stream(events)
    assert final_status(events) == DiscussionStatus.COMPLETED
    answers = {(event.agent, event.round) for event in events if isinstance(event, AgentCompleted)}
    assert answers == {(persona, round_number) for persona in ("科学家", "经济学家") for round_number in (1, 2)}
    assert [event.round for event in events if isinstance(event, RoundCompleted)] == [1, 2]
    assert sum(isinstance(event, SummaryCompleted) for event in events) == 1
    assert events[0].time.tzinfo is not None
    doc = await client.get(events[0].discussion_id)
    assert DiscussionStatus.of(doc.status) == DiscussionStatus.COMPLETED
    assert doc.last_sequence == events[-1].sequence


async def test_discuss_without_summary_streams_the_panel_only(client: Client) -> None:
    events = [event async for event in client.discuss("Panel only", personas=PERSONAS, summary=False)]
    assert_whole_stream(events)
    assert final_status(events) == DiscussionStatus.COMPLETED
    assert not [event for event in events if isinstance(event, SummaryCompleted)]
    assert {event.agent for event in events if isinstance(event, AgentCompleted)} == {"科学家", "经济学家"}


async def test_events_after_a_sequence_replays_only_the_rest(client: Client) -> None:
    created = await client.create("Replay the tail", personas=PERSONAS)
    whole = [event async for event in client.events(created.discussion_id)]
    tail = [event async for event in client.events(created.discussion_id, after_sequence=3)]
    assert tail == whole[3:]
    assert_whole_stream(tail, first_sequence=4)
    # Resuming after the terminal event (a program that saved it, then stopped): nothing more, at once.
    assert [event async for event in client.events(created.discussion_id, after_sequence=whole[-1].sequence)] == []


class _RecordCreates(grpc.aio.UnaryUnaryClientInterceptor):
    """Keeps the metadata and request of every CreateDiscussion sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, str], Any]] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method.endswith(b"/CreateDiscussion"):
            self.sent.append((dict(details.metadata or ()), request))
        return await continuation(details, request)


async def test_create_proposes_its_id_in_x_session_id_with_a_request_id(suite: Suite) -> None:
    recorder = _RecordCreates()
    async with Client(suite.session_host.address, interceptors=[recorder]) as client:
        created = await client.create("Where do ids come from?", personas=PERSONAS, ttl=datetime.timedelta(hours=1))
    (metadata, request), *_ = recorder.sent
    assert re.fullmatch(r"[0-9a-f]{32}", metadata["x-session-id"])
    assert created.discussion_id == metadata["x-session-id"]
    assert request.request_id and created.request_id == request.request_id
    assert created.ttl.ToTimedelta() == datetime.timedelta(hours=1)


async def test_a_repeated_create_with_the_same_ids_returns_the_first_discussion(client: Client) -> None:
    first = await client.create("Once only", personas=PERSONAS, request_id="once-only", discussion_id="a" * 32)
    again = await client.create("Once only", personas=PERSONAS, request_id="once-only", discussion_id="a" * 32)
    assert again.discussion_id == first.discussion_id == "a" * 32
    assert again.created_at == first.created_at


async def test_list_follows_every_page_and_filters_by_status(suite: Suite) -> None:
    # A principal of its own (an API key would do; here the anonymous one on a fresh suite is simplest).
    async with Client(suite.session_host.address) as client:
        created = await asyncio.gather(*(client.create(f"listed {index}", personas=PERSONAS) for index in range(5)))
        for doc in created:
            _ = [event async for event in client.events(doc.discussion_id)]
        listed = [doc.discussion_id async for doc in client.list(page_size=2)]
        completed = [doc.discussion_id async for doc in client.list(status=DiscussionStatus.COMPLETED, page_size=2)]
        running = [doc.discussion_id async for doc in client.list(status=DiscussionStatus.RUNNING, page_size=2)]
    ids = {doc.discussion_id for doc in created}
    assert ids <= set(listed) and ids <= set(completed)
    assert len(listed) == len(set(listed)), "a page repeated a discussion"
    assert not ids & set(running)


async def test_cancel_then_delete_then_the_discussion_is_gone(make_suite: Any) -> None:
    slow = await make_suite(simulator={"first_token_latency_ms": 2000})
    async with Client(slow.session_host.address) as client:
        created = await client.create("Stopped early", personas=PERSONAS, rounds=3)
        cancelled = await client.cancel(created.discussion_id)
        assert DiscussionStatus.of(cancelled.status) == DiscussionStatus.CANCELLED
        events = [event async for event in client.events(created.discussion_id)]
        assert final_status(events) == DiscussionStatus.CANCELLED
        await client.delete(created.discussion_id)
        with pytest.raises(NotFound):
            await client.get(created.discussion_id)


async def test_the_sync_client_discusses_lists_and_reads(suite: Suite) -> None:
    def blocking_caller() -> None:
        with SyncClient(suite.session_host.address) as client:
            events = list(client.discuss("Blocking is fine sometimes", personas=PERSONAS))
            assert_whole_stream(events)
            discussion_id = events[0].discussion_id
            assert DiscussionStatus.of(client.get(discussion_id).status) == DiscussionStatus.COMPLETED
            assert discussion_id in {doc.discussion_id for doc in client.list()}
            # Leaving a stream early stops it and leaves the client usable.
            for event in client.events(discussion_id):
                assert isinstance(event, StatusChanged)
                break
            with pytest.raises(NotFound):
                client.get("b" * 32)

    # In a thread: the suite's servers run on this test's event loop, which must stay free.
    await asyncio.to_thread(blocking_caller)


def test_defaults_come_from_roundtable_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("ROUNDTABLE_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("ROUNDTABLE_API_KEY", "k-123")
    monkeypatch.setenv("ROUNDTABLE_TLS_CA_FILE", str(tmp_path / "ca.pem"))
    client = Client()
    assert client.address == "10.0.0.1:1234"
    assert client._metadata("c" * 32) == (("authorization", "Bearer k-123"), ("x-session-id", "c" * 32))
    assert client._tls == Tls(ca_file=tmp_path / "ca.pem")
    explicit = Client("127.0.0.1:1", api_key="", tls=False)
    assert explicit.address == "127.0.0.1:1" and explicit._metadata() == () and explicit._tls is None
