"""Request limits: whatever the session service can be configured to accept, the agent service runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import annotated_types

from services.gen.roundtable.session.v1 import session_pb2
from services.session.settings import SessionSettings
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]


def ceiling(field_name: str) -> int:
    """The largest value a session setting may be given (its `le` bound)."""
    for constraint in SessionSettings.model_fields[field_name].metadata:
        if isinstance(constraint, annotated_types.Le):
            return int(constraint.le)  # type: ignore[call-overload]
    raise AssertionError(f"SessionSettings.{field_name} has no upper bound")


async def test_the_longest_topic_and_most_rounds_the_session_accepts_pass_the_agents(make_suite: MakeSuite) -> None:
    max_topic_chars, max_rounds = ceiling("max_topic_chars"), ceiling("max_rounds")
    suite = await make_suite(session={"max_topic_chars": max_topic_chars, "max_rounds": max_rounds})
    topic = ("Should cities ban cars? " * max_topic_chars)[: max_topic_chars - 1] + "?"
    assert len(topic) == max_topic_chars

    final, _ = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(topic=topic, personas=["scientist"], rounds=max_rounds),
    )

    assert final.error == ""
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert final.completed_rounds == max_rounds
