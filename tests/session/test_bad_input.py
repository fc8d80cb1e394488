"""Bad input gets the documented status and a message a person can act on; the server keeps serving."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite

Create = session_pb2.CreateDiscussionRequest
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (Create(topic=""), "topic", "empty"),
        (Create(topic=" \n\t "), "topic", "empty"),
        (Create(topic="x" * 4001), "topic", "limit is 4000"),
        (Create(topic="bad\x00byte"), "topic", "control"),
        (Create(topic="ok", personas=["astrologer"]), "personas", "unknown persona 'astrologer'"),
        (Create(topic="ok", personas=["moderator"]), "personas", "besides the moderator"),
        (Create(topic="ok", rounds=-1), "rounds", "between 1 and 5"),
        (Create(topic="ok", rounds=6), "rounds", "between 1 and 5"),
        (Create(topic="ok", request_id="r" * 129), "request_id", "at most 128"),
        (Create(topic="ok", ttl=duration_pb2.Duration(seconds=-5)), "ttl", "ttl must be"),
        (Create(topic="ok", ttl=duration_pb2.Duration(seconds=10**8)), "ttl", "ttl must be"),
    ],
)
async def test_create_rejects_bad_input(suite: Suite, request_: Create, field: str, words: str) -> None:
    stub = suite.session()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDiscussion(request_, timeout=5)
    assert caught.value.code() == INVALID
    assert words in (caught.value.details() or "")
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field


@pytest.mark.parametrize("discussion_id", ["", "nope", "../../etc/passwd", "A" * 32, "0" * 33, "ü" * 32])
async def test_malformed_ids_are_invalid_argument_everywhere(suite: Suite, discussion_id: str) -> None:
    stub = suite.session()
    calls: list[Awaitable[object]] = [
        stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=discussion_id), timeout=5),
        stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=discussion_id), timeout=5),
        stub.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=discussion_id), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == INVALID
        assert "malformed" in (caught.value.details() or "")
    stream = stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=discussion_id), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code() == INVALID


async def test_unknown_ids_are_not_found(suite: Suite) -> None:
    stub = suite.session()
    unknown = "0123456789abcdef" * 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=unknown), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown in (caught.value.details() or "")
    stream = stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=unknown), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_rejects_bad_paging_and_the_server_keeps_serving(suite: Suite) -> None:
    stub = suite.session()
    for request in (
        session_pb2.ListDiscussionsRequest(page_size=-1),
        session_pb2.ListDiscussionsRequest(page_token="not-a-token"),
        session_pb2.ListDiscussionsRequest(status=99),  # type: ignore[arg-type]
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListDiscussions(request, timeout=5)
        assert caught.value.code() == INVALID
    created = await stub.CreateDiscussion(Create(topic="still serving?", personas=["engineer"]), timeout=5)
    assert created.status == session_pb2.DISCUSSION_STATUS_RUNNING


async def test_cancel_of_a_finished_discussion_is_failed_precondition(suite: Suite) -> None:
    stub = suite.session()
    created = await stub.CreateDiscussion(Create(topic="finish first", personas=["engineer"]), timeout=5)
    async for _ in stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id)):
        pass
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=created.discussion_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "COMPLETED" in (caught.value.details() or "")
