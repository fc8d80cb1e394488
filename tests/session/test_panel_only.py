"""skip_summary: the panel only, without the moderator's summary (some clients want only the panel)."""

from __future__ import annotations

from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite, run_to_end


async def test_a_discussion_without_summary_ends_after_its_rounds_with_no_moderator(suite: Suite) -> None:
    stub = suite.session()
    final, events = await run_to_end(
        stub,
        session_pb2.CreateDiscussionRequest(
            topic="Panel only, please", personas=["scientist", "economist"], rounds=2, skip_summary=True
        ),
    )
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    assert final.personas == ["科学家", "经济学家"]
    assert {(r.agent, r.round) for r in final.results} == {(a, n) for a in ("科学家", "经济学家") for n in (1, 2)}
    assert final.summary == ""
    assert not [e for e in events if e.WhichOneof("event") == "summary_completed"]

    # The default still sums up: the moderator answers last, as round rounds + 1.
    with_summary, _ = await run_to_end(
        stub, session_pb2.CreateDiscussionRequest(topic="And with a summary", personas=["scientist"], rounds=1)
    )
    assert with_summary.summary
    assert ("主持人", 2) in {(r.agent, r.round) for r in with_summary.results}
