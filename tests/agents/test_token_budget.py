"""The token budget is a ceiling: agents answering in parallel against the real simulator never spend past it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.simulator.app import RequestRecord
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
COMPLETED = discussion_pb2.AGENT_STATUS_COMPLETED
FAILED = discussion_pb2.AGENT_STATUS_FAILED
DEBATERS = ["scientist", "philosopher", "economist", "engineer"]
# Long enough that the simulator (answers of 100+ tokens uncapped) always writes the whole max_tokens.
MAX_TOKENS = 64


def records_of(suite: Suite, topic: str) -> list[RequestRecord]:
    return [r for r in suite.simulator.simulator.requests if r.topic == topic]


def billed(record: RequestRecord) -> int:
    """What the simulator charges for a request: its prompt estimate plus the pieces it sent."""
    return record.prompt_tokens + record.pieces_sent


async def test_a_budget_that_runs_out_mid_round_is_never_exceeded_by_the_parallel_calls(
    make_suite: MakeSuite,
) -> None:
    # Each round-1 call reserves its prompt (~80) + 64: two fit whole, the third only with a clamped
    # max_tokens, the fourth not at all. A slow first token keeps all of them in flight together.
    suite = await make_suite(agents={"llm_max_tokens": MAX_TOKENS}, simulator={"first_token_latency_ms": 300})
    budget_tokens = 400
    doc, _ = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(
            topic="a ceiling for tokens", personas=[*DEBATERS, "moderator"], rounds=2, token_budget=budget_tokens
        ),
    )

    calls = records_of(suite, "a ceiling for tokens")
    assert doc.usage.total_tokens <= budget_tokens
    assert sum(billed(call) for call in calls) <= budget_tokens
    # The calls were made at once, and the budget ran out among them.
    assert len(calls) == 3
    assert max(call.started_at for call in calls) < min(call.finished_at or 0 for call in calls)
    assert sorted(call.max_tokens or 0 for call in calls)[0] < MAX_TOKENS, "one call's answer was clamped"
    round_one = [r for r in doc.results if r.round == 1]
    assert sorted(r.status for r in round_one) == [COMPLETED] * 3 + [FAILED]
    (refused,) = [r for r in round_one if r.status == FAILED]
    assert refused.error.startswith(f"token budget of {budget_tokens} spent: ")
    assert "too few for the prompt" in refused.error
    # Nothing was left for round 2 or the summary, and none of them reached the simulator.
    assert all(r.status == FAILED for r in doc.results if r.round > 1)
    assert not doc.summary
    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    # What the discussion reports is what the simulator billed for the answers it completed.
    assert doc.usage.total_tokens == sum(billed(call) for call in calls)


async def test_a_budget_too_small_for_any_call_makes_none(make_suite: MakeSuite) -> None:
    suite = await make_suite()
    doc, _ = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(
            topic="no room at all", personas=["scientist", "economist", "moderator"], rounds=2, token_budget=50
        ),
    )

    assert records_of(suite, "no room at all") == []
    assert doc.status == session_pb2.DISCUSSION_STATUS_FAILED
    assert doc.usage.total_tokens == 0
    assert all(r.error.startswith("token budget of 50 spent: 50 tokens left (0 used)") for r in doc.results)
