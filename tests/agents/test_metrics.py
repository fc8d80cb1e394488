"""The agent service's domain metrics through real servers: counts that match the documents, no session labels.

Every in-process service shares prometheus_client's default registry, so each test reads deltas
against a baseline taken before it acts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.agents import metrics
from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
COMPLETED = discussion_pb2.AGENT_STATUS_COMPLETED
SESSION_ID = re.compile(r"[0-9a-f]{32}")
AGENT_METRICS = (
    "roundtable_llm_request_seconds",
    "roundtable_llm_tokens_total",
    "roundtable_llm_retries_total",
    "roundtable_llm_rate_limited_total",
    "roundtable_llm_malformed_lines_total",
    "roundtable_llm_calls_in_flight",
    "roundtable_llm_calls_waiting",
    "roundtable_agent_runs_total",
    "roundtable_agent_sets_created_total",
    "roundtable_agent_sets_released_total",
)


def value(name: str, **labels: str) -> float:
    """A sample of the default registry now; 0 when it has none."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Deltas:
    """How far samples of the default registry moved since this object was made."""

    def __init__(self) -> None:
        self._before = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in REGISTRY.collect()
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self._before.get((name, frozenset(labels.items())), 0.0)

    def runs(self, outcome: str) -> float:
        return self("roundtable_agent_runs_total", outcome=outcome)

    def calls(self, outcome: str) -> float:
        return self("roundtable_llm_request_seconds_count", outcome=outcome)


async def eventually(condition: Callable[[], bool], timeout_seconds: float = 10) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


async def test_runs_tokens_and_agent_sets_match_the_discussion_documents(make_suite: MakeSuite) -> None:
    suite = await make_suite(agents={"release_grace_seconds": 0})
    deltas = Deltas()
    topics = [f"metered {number}" for number in range(3)]
    finished = await asyncio.gather(
        *(
            run_to_end(
                suite.session(),
                session_pb2.CreateDiscussionRequest(
                    topic=topic, personas=["scientist", "economist", "moderator"], rounds=2
                ),
            )
            for topic in topics
        )
    )

    docs = [doc for doc, _ in finished]
    for doc in docs:
        assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error
        assert [r.status for r in doc.results] == [COMPLETED] * 5  # 2 debaters × 2 rounds, then the summary
    answers = sum(len(doc.results) for doc in docs)
    assert deltas.runs("completed") == answers == 15
    assert deltas.runs("failed") == deltas.runs("cancelled") == 0
    # One observation per LLM call, and every call was one answer.
    assert deltas.calls("ok") == answers
    assert deltas.calls("error") == deltas.calls("timeout") == deltas.calls("cancelled") == 0
    assert deltas("roundtable_llm_request_seconds_sum", outcome="ok") > 0
    prompt = sum(doc.usage.prompt_tokens for doc in docs)
    completion = sum(doc.usage.completion_tokens for doc in docs)
    assert prompt == sum(r.usage.prompt_tokens for doc in docs for r in doc.results) > 0
    assert completion == sum(r.usage.completion_tokens for doc in docs for r in doc.results) > 0
    assert deltas("roundtable_llm_tokens_total", direction="prompt") == prompt
    assert deltas("roundtable_llm_tokens_total", direction="completion") == completion
    assert deltas("roundtable_llm_retries_total") == 0
    assert deltas("roundtable_agent_sets_created_total") == len(docs)
    # No grace: each set goes when its discussion ends. (Another suite of this process may release its own
    # sets meanwhile, on their grace timers, so the shared counter grew by at least ours.)
    registry = suite.agents_service.registry
    await eventually(lambda: registry.released_total == len(docs))
    assert deltas("roundtable_agent_sets_released_total") >= len(docs)
    assert deltas("roundtable_llm_calls_in_flight") == deltas("roundtable_llm_calls_waiting") == 0


async def test_retries_and_rate_limits_are_counted(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        simulator={"fail_429_rate": 1.0, "retry_after_seconds": 0.05}, agents={"llm_max_retries": 10}
    )
    sim = suite.simulator.simulator
    deltas = Deltas()
    discussion = asyncio.create_task(
        run_to_end(
            suite.session(),
            session_pb2.CreateDiscussionRequest(topic="rate limited", personas=["scientist", "economist"], rounds=1),
        )
    )
    # Every call is refused a few times, then the provider recovers.
    await eventually(lambda: sum(r.outcome == "429" for r in sim.requests) >= 4)
    sim.configure(fail_429_rate=0.0)
    doc, _ = await discussion

    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error
    assert all(r.status == COMPLETED for r in doc.results)
    records = [r for r in sim.requests if r.topic == "rate limited"]
    refused = sum(r.outcome == "429" for r in records)
    retried = sum(r.retry_count > 0 for r in records)
    assert refused >= 4
    # Each refusal was sent again, and each attempt sent again was counted once, as the simulator saw it.
    assert retried == refused
    assert deltas("roundtable_llm_retries_total") == retried
    assert deltas("roundtable_llm_rate_limited_total") == refused
    # The retries belong to their call: one observation each, all of them answered in the end.
    assert deltas.calls("ok") == len(doc.results) == deltas.runs("completed")
    assert deltas.calls("error") == deltas.runs("failed") == 0


async def test_failed_timed_out_and_cancelled_calls_are_told_apart(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"fail_personas": ["经济学家"]}, agents={"llm_max_retries": 0})
    sim = suite.simulator.simulator
    deltas = Deltas()

    # The economist's call fails (HTTP 500): one failed answer, one call ended in error.
    doc, _ = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(topic="one fails", personas=["economist", "engineer"], rounds=1),
    )
    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error
    assert (deltas.runs("failed"), deltas.calls("error")) == (1, 1)

    # A silent backend: the call ends before the caller's deadline.
    sim.configure(hang_rate=1.0)
    events = [
        event
        async for event in suite.agents().RunDiscussion(
            agents_pb2.RunDiscussionRequest(
                session_id="metrics-timeout", topic="silence", personas=["科学家"], rounds=1
            ),
            timeout=1.5,
        )
    ]
    assert [e.WhichOneof("event") for e in events][-2:] == ["agent_failed", "round_completed"]
    assert (deltas.runs("failed"), deltas.calls("timeout")) == (2, 1)

    # A cancel mid-answer (slow answers, 2 s each): both answers in flight end cancelled.
    sim.configure(hang_rate=0.0, tokens_per_second=12)
    stub = suite.session()
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic="stop now", personas=["scientist", "engineer"], rounds=1)
    )
    await eventually(lambda: sum(r.topic == "stop now" and r.pieces_sent >= 1 for r in sim.requests) == 2)
    await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=created.discussion_id))
    await eventually(lambda: deltas.runs("cancelled") == 2 and deltas.calls("cancelled") == 2)
    await eventually(lambda: deltas("roundtable_llm_calls_in_flight") == 0)
    assert deltas.runs("completed") == deltas.calls("ok") == 2  # the engineer and the moderator of the first


async def test_calls_waiting_for_the_outbound_cap_and_in_flight_are_gauged(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"first_token_latency_ms": 300}, agents={"max_concurrent_llm_calls": 1})
    deltas = Deltas()
    discussions = asyncio.gather(
        *(
            run_to_end(
                suite.session(),
                session_pb2.CreateDiscussionRequest(topic=f"queued {n}", personas=["scientist", "economist"], rounds=1),
            )
            for n in range(2)
        )
    )
    most_in_flight = most_waiting = 0.0
    while not discussions.done():
        most_in_flight = max(most_in_flight, deltas("roundtable_llm_calls_in_flight"))
        most_waiting = max(most_waiting, deltas("roundtable_llm_calls_waiting"))
        await asyncio.sleep(0.01)
    for doc, _ in discussions.result():
        assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error

    assert most_in_flight == 1  # the cap
    assert most_waiting >= 2  # four debaters asked at once, one at a time answered
    assert deltas("roundtable_llm_calls_in_flight") == deltas("roundtable_llm_calls_waiting") == 0


async def test_no_metric_carries_a_session_id_or_a_topic(make_suite: MakeSuite) -> None:
    suite = await make_suite()
    doc, _ = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(topic="labels stay small", personas=["scientist", "moderator"], rounds=1),
    )
    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error

    scrape = generate_latest(REGISTRY).decode()
    assert doc.discussion_id not in scrape
    assert "labels stay small" not in scrape
    families = {family.name: family for family in text_string_to_metric_families(scrape)}
    for family in families.values():
        for sample in family.samples:
            hexes = [v for v in sample.labels.values() if SESSION_ID.search(v)]
            assert not hexes, f"{sample.name} has a label value like a session id: {sample.labels}"
    # The agent service's own metrics are all exported, with labels from small fixed sets only.
    allowed = {
        "outcome": {"ok", "error", "timeout", "cancelled", "completed", "failed"},
        "direction": {"prompt", "completion"},
    }
    for name in AGENT_METRICS:
        family = families[name.removesuffix("_total")]
        assert family.samples, name
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                if label == "le":
                    continue
                assert label in allowed, f"{sample.name} has a {label} label"
                assert label_value in allowed[label], f"{sample.name}: {label}={label_value}"


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        *(("roundtable_llm_request_seconds_count", {"outcome": o}) for o in ("ok", "error", "timeout", "cancelled")),
        *(("roundtable_llm_tokens_total", {"direction": d}) for d in ("prompt", "completion")),
        *(("roundtable_agent_runs_total", {"outcome": o}) for o in ("completed", "failed", "cancelled")),
    ],
)
def test_every_labelled_series_is_exported_before_its_first_event(name: str, labels: dict[str, str]) -> None:
    # Resolved once when services.agents.metrics is imported: a rate() sees 0, not a missing series.
    assert metrics.LLM_REQUEST_SECONDS is not None
    assert REGISTRY.get_sample_value(name, labels) is not None
