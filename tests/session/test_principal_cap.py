"""The development profile keeps the seed's promise: 100 discussions at once, anonymous callers included."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable

from services.gen.roundtable.session.v1 import session_pb2
from services.session.keys import add_key
from services.session.settings import SessionSettings
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]


async def test_one_hundred_anonymous_creates_at_once_all_run_under_the_development_defaults(
    make_suite: MakeSuite,
) -> None:
    development = SessionSettings()
    # The suite's test-sized overrides put back to the development profile's values.
    suite = await make_suite(
        session={
            "max_concurrent_sessions": development.max_concurrent_sessions,
            "max_concurrent_sessions_per_principal": development.max_concurrent_sessions_per_principal,
        },
        simulator={"first_token_latency_ms": 3000},
    )
    stub = suite.session()
    request = session_pb2.CreateDiscussionRequest(topic="the seed's hundred", personas=["engineer"])

    created = await asyncio.gather(*(stub.CreateDiscussion(request, timeout=30) for _ in range(100)))

    assert [d.status for d in created] == [session_pb2.DISCUSSION_STATUS_RUNNING] * 100
    for discussion in created:
        await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=discussion.discussion_id))


def test_production_still_caps_each_principal(tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys.toml"
    add_key(keys, "alice")
    # Production also wants the services' shared credential where that setting exists.
    credential = {"internal_token": "s" * 16} if "internal_token" in SessionSettings.model_fields else {}
    production = SessionSettings.model_validate({"profile": "production", "api_keys_file": keys, **credential})
    assert production.principal_cap == 20
    assert SessionSettings().principal_cap >= SessionSettings().max_concurrent_sessions
