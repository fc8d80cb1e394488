"""Discussion ids are scoped to their owner: two principals may hold the same id, and neither can tell.

Through real servers on every store: what one principal proposes in x-session-id never touches, reveals or
replays another principal's discussion with that id (DESIGN §3 and §5).
"""

from __future__ import annotations

import pathlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from services.gen.roundtable.session.v1 import session_pb2
from services.session.auth import ANONYMOUS
from services.session.keys import add_key
from services.shared.logs import flush
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures the redis case uses)
from tests.shared.logging_setup import service_logging
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
Create = session_pb2.CreateDiscussionRequest
Metadata = tuple[tuple[str, str], ...]


def caller(key: str, session_id: str | None = None) -> Metadata:
    """Metadata of a call by the key's principal, proposing (or addressing) session_id."""
    entries = [("authorization", f"Bearer {key}")]
    if session_id is not None:
        entries.append(("x-session-id", session_id))
    return tuple(entries)


async def drain(stub: Any, discussion_id: str, metadata: Metadata) -> list[session_pb2.DiscussionEvent]:
    """Every event of the discussion until it ends."""
    request = session_pb2.StreamDiscussionRequest(discussion_id=discussion_id)
    return [event async for event in stub.StreamDiscussion(request, metadata=metadata, timeout=60)]


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The status a call ends with."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Session settings selecting each store in turn."""
    if request.param == "redis":
        return {"store": "redis", "redis_url": request.getfixturevalue("redis_url")}
    return {"store": request.param}


@pytest.fixture
def keys(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    path = tmp_path / "api_keys.toml"
    return path, add_key(path, "alice"), add_key(path, "bob")


async def test_two_principals_proposing_one_id_each_get_their_own_discussion(
    make_suite: MakeSuite, keys: tuple[pathlib.Path, str, str], store_settings: dict[str, Any]
) -> None:
    path, alice, bob = keys
    suite = await make_suite(
        session={"api_keys_file": path, "allow_anonymous": False, **store_settings},
        simulator={"first_token_latency_ms": 300},
    )
    stub = suite.session()
    shared_id, request_id = secrets.token_hex(16), "create-1"
    alices = await stub.CreateDiscussion(
        Create(topic="alice's secret", personas=["engineer"], request_id=request_id),
        metadata=caller(alice, shared_id),
    )
    assert alices.discussion_id == shared_id

    # Bob proposes the same id and request_id: the answer is what he gets for an id nobody holds.
    bobs = await stub.CreateDiscussion(
        Create(topic="bob's own", personas=["scientist", "economist"], request_id=request_id),
        metadata=caller(bob, shared_id),
    )
    fresh_id = secrets.token_hex(16)
    bobs_fresh = await stub.CreateDiscussion(
        Create(topic="bob's other", personas=["scientist"], request_id="create-2"), metadata=caller(bob, fresh_id)
    )
    assert (bobs.discussion_id, bobs_fresh.discussion_id) == (shared_id, fresh_id)
    assert bobs.topic == "bob's own" and bobs.status == bobs_fresh.status == session_pb2.DISCUSSION_STATUS_RUNNING

    # Alice's retry replays her discussion; nothing of Bob's shows through, nor anything new runs.
    retried = await stub.CreateDiscussion(
        Create(topic="alice's secret", personas=["engineer"], request_id=request_id),
        metadata=caller(alice, shared_id),
    )
    assert (retried.topic, retried.created_at) == (alices.topic, alices.created_at)
    # Three discussions run, and each holds exactly one slot (a replay takes none and frees none).
    assert suite.session_service.admission.active() == 3

    get = session_pb2.GetDiscussionRequest(discussion_id=shared_id)
    assert (await stub.GetDiscussion(get, metadata=caller(alice, shared_id))).topic == "alice's secret"
    assert (await stub.GetDiscussion(get, metadata=caller(bob, shared_id))).topic == "bob's own"

    listing = session_pb2.ListDiscussionsRequest()
    alice_list = await stub.ListDiscussions(listing, metadata=caller(alice))
    bob_list = await stub.ListDiscussions(listing, metadata=caller(bob))
    assert [(d.discussion_id, d.topic) for d in alice_list.discussions] == [(shared_id, "alice's secret")]
    assert sorted((d.discussion_id, d.topic) for d in bob_list.discussions) == sorted(
        [(shared_id, "bob's own"), (fresh_id, "bob's other")]
    )

    # Each runs to its end with its own agents, and its events name the id its owner knows.
    alice_events = await drain(stub, shared_id, caller(alice, shared_id))
    bob_events = await drain(stub, shared_id, caller(bob, shared_id))
    assert {e.discussion_id for e in alice_events} == {e.discussion_id for e in bob_events} == {shared_id}
    alice_final = await stub.GetDiscussion(get, metadata=caller(alice, shared_id))
    bob_final = await stub.GetDiscussion(get, metadata=caller(bob, shared_id))
    assert alice_final.status == bob_final.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    # Separate agent sets: one first-round answer for Alice's one persona, two for Bob's two.
    assert len({r.agent for r in alice_final.results if r.round == 1}) == 1
    assert len({r.agent for r in bob_final.results if r.round == 1}) == 2

    # Bob deleting his leaves Alice's.
    await stub.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=shared_id), metadata=caller(bob))
    assert await code_of(stub.GetDiscussion(get, metadata=caller(bob))) == grpc.StatusCode.NOT_FOUND
    assert (await stub.GetDiscussion(get, metadata=caller(alice))).topic == "alice's secret"
    await drain(stub, fresh_id, caller(bob, fresh_id))


async def test_a_refused_proposal_answers_the_same_whether_or_not_another_holds_the_id(
    make_suite: MakeSuite, keys: tuple[pathlib.Path, str, str], store_settings: dict[str, Any]
) -> None:
    path, alice, bob = keys
    suite = await make_suite(session={"api_keys_file": path, "allow_anonymous": False, **store_settings})
    stub = suite.session()
    held, unheld = secrets.token_hex(16), secrets.token_hex(16)
    await stub.CreateDiscussion(Create(topic="alice's", personas=["engineer"]), metadata=caller(alice, held))

    async def bob_proposes_twice(proposed_id: str) -> tuple[grpc.StatusCode, str]:
        """Bob takes the id, then proposes it again with another request_id (his own id: refused)."""
        await stub.CreateDiscussion(
            Create(topic="bob's", personas=["engineer"], request_id=f"first-{proposed_id}"),
            metadata=caller(bob, proposed_id),
        )
        try:
            await stub.CreateDiscussion(
                Create(topic="bob's", personas=["engineer"], request_id=f"second-{proposed_id}"),
                metadata=caller(bob, proposed_id),
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), (error.details() or "").replace(proposed_id, "<id>")  # the rest must match
        return grpc.StatusCode.OK, ""

    assert await bob_proposes_twice(held) == await bob_proposes_twice(unheld)
    assert (await bob_proposes_twice(secrets.token_hex(16)))[0] == grpc.StatusCode.ALREADY_EXISTS
    listing = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(), metadata=caller(alice))
    assert [(d.discussion_id, d.topic) for d in listing.discussions] == [(held, "alice's")]
    for discussion_id in (held,):
        await drain(stub, discussion_id, caller(alice))


async def test_the_log_file_named_by_the_store_id_names_the_callers_id(
    make_suite: MakeSuite, tmp_path: pathlib.Path
) -> None:
    with service_logging(tmp_path / "logs") as (files, _):
        suite = await make_suite()
        stub = suite.session()
        proposed = secrets.token_hex(16)
        await stub.CreateDiscussion(
            Create(topic="find my log", personas=["engineer"]), metadata=(("x-session-id", proposed),)
        )
        await drain(stub, proposed, ())
        assert flush()
        store_id = suite.session_service.store_id(ANONYMOUS, proposed)
        log_text = files.path(store_id).read_text(encoding="utf-8")
    assert store_id != proposed
    assert f"created for principal {ANONYMOUS}, who knows it as {proposed}" in log_text
