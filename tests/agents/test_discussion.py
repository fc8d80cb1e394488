"""DiscussionRun against a scripted LLM: parallel rounds, what each prompt carries, the event stream, failures."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.agents import prompts
from services.agents.agent_set import AgentSet, AgentSetRegistry
from services.agents.discussion import MIN_ANSWER_TOKENS, DiscussionRun, StreamingLimits
from services.agents.llm import DEFAULT_OPTIONS, CallOptions, ChatChunk, ChatMessage, LLMCallFailed, estimated_usage
from services.agents.personas import PersonaRegistry
from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.common.v1 import discussion_pb2

TOPIC = "Should cities ban cars from their centres?"
MODERATOR = "主持人"
DEBATERS = ["科学家", "哲学家", "经济学家", "工程师"]
USAGE = discussion_pb2.TokenUsage(prompt_tokens=11, completion_tokens=7, total_tokens=18)
EVERY_CHUNK = StreamingLimits(flush_chars=1, flush_interval_seconds=3600, llm_timeout_seconds=30, max_tokens=64)
COALESCED = StreamingLimits(flush_chars=10_000, flush_interval_seconds=3600, llm_timeout_seconds=30, max_tokens=64)


def answer(persona: str, call_number: int) -> str:
    """What the fake LLM answers on a persona's n-th call."""
    return f"{persona} says point {call_number}"


@dataclass
class Call:
    """One stream_chat call the fake received."""

    persona: str
    messages: list[ChatMessage]
    options: CallOptions = DEFAULT_OPTIONS


@dataclass
class FakeLLM:
    """A deterministic LLMClient that records every prompt, concurrency and cancellation."""

    failing: set[str] = field(default_factory=set)
    hang: bool = False
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: list[str] = field(default_factory=list)
    all_hanging: asyncio.Event = field(default_factory=asyncio.Event)
    expected_hanging: int = len(DEBATERS)
    # Bill as the simulator does (prompt estimate + pieces, the answer cut to max_tokens), not USAGE.
    bills_prompt: bool = False

    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        timeout_seconds: float,
        deadline: float | None = None,
        options: CallOptions = DEFAULT_OPTIONS,
        principal: str = "",
    ) -> AsyncIterator[ChatChunk]:
        # The system prompt starts with "You are <name>," (see prompts.py).
        persona = messages[0].content.removeprefix("You are ").split(",", 1)[0]
        self.calls.append(Call(persona, list(messages), options))
        call_number = sum(1 for c in self.calls if c.persona == persona)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # Give the other agents' calls the chance to start before this one answers.
            for _ in range(5):
                await asyncio.sleep(0)
            if persona in self.failing:
                raise LLMCallFailed("LLM backend simulator answered HTTP 500: boom", retryable=True)
            if self.hang:
                if self.in_flight == self.expected_hanging:
                    self.all_hanging.set()
                await asyncio.Event().wait()
            words = answer(persona, call_number).split(" ")
            if self.bills_prompt and options.max_tokens is not None:
                words = words[: options.max_tokens]
            for index, word in enumerate(words):
                yield ChatChunk(text=word if index == 0 else f" {word}")
                await asyncio.sleep(0)
            yield ChatChunk(usage=estimated_usage(messages, len(words)) if self.bills_prompt else USAGE)
        except asyncio.CancelledError:
            self.cancelled.append(persona)
            raise
        finally:
            self.in_flight -= 1

    def calls_of(self, persona: str) -> list[Call]:
        return [c for c in self.calls if c.persona == persona]


def make_agent_set(session_id: str = "session-1", names: Iterable[str] = (*DEBATERS, MODERATOR)) -> AgentSet:
    personas = PersonaRegistry.load()
    return AgentSetRegistry(max_agent_sets=10).acquire(session_id, [personas.personas[n] for n in names])


def make_run(
    llm: FakeLLM,
    *,
    rounds: int,
    agent_set: AgentSet | None = None,
    limits: StreamingLimits = EVERY_CHUNK,
) -> DiscussionRun:
    agent_set = agent_set or make_agent_set()
    return DiscussionRun(
        agent_set=agent_set,
        topic=TOPIC,
        persona_names=list(agent_set.agents),
        rounds=rounds,
        llm=llm,
        limits=limits,
        deadline=None,
    )


async def run_to_end(run: DiscussionRun) -> list[agents_pb2.AgentEvent]:
    return [event async for event in run.events()]


def kind(event: agents_pb2.AgentEvent) -> str:
    return event.WhichOneof("event") or ""


def of_kind(events: list[agents_pb2.AgentEvent], wanted: str) -> list[Any]:
    return [getattr(e, wanted) for e in events if kind(e) == wanted]


def agent_steps(events: list[agents_pb2.AgentEvent], agent: str, round_number: int) -> list[str]:
    """The kinds of one agent's events for one round, in stream order."""
    steps = []
    for event in events:
        payload = getattr(event, kind(event))
        if kind(event) != "round_completed" and payload.agent == agent:
            if kind(event) == "summary_completed" or payload.round == round_number:
                steps.append(kind(event))
    return steps


async def test_round_one_asks_every_debater_at_once() -> None:
    llm = FakeLLM()

    await run_to_end(make_run(llm, rounds=1))

    assert llm.max_in_flight == len(DEBATERS)
    round_one = llm.calls[: len(DEBATERS)]
    assert sorted(c.persona for c in round_one) == sorted(DEBATERS)
    for call in round_one:
        assert [m.role for m in call.messages] == ["system", "user"]
        assert call.messages[0].content.startswith(f"You are {call.persona},")
        assert call.messages[-1].content.endswith(f"Topic: {TOPIC}")


async def test_round_two_shows_each_agent_the_others_answers_and_its_own_memory() -> None:
    llm = FakeLLM()

    await run_to_end(make_run(llm, rounds=2))

    for persona in DEBATERS:
        first, second = llm.calls_of(persona)
        own_answer = answer(persona, 1)
        assert second.messages[: len(first.messages)] == first.messages
        assert ChatMessage("assistant", own_answer) in second.messages
        assert second.messages[-2] == ChatMessage("assistant", own_answer)
        prompt = second.messages[-1]
        assert prompt.role == "user"
        assert "Round 2" in prompt.content
        assert prompt.content.endswith(f"Topic: {TOPIC}")
        for other in DEBATERS:
            if other != persona:
                assert f"[{other}]\n{answer(other, 1)}" in prompt.content
        assert own_answer not in prompt.content


async def test_the_summary_prompt_holds_every_final_answer() -> None:
    llm = FakeLLM()

    events = await run_to_end(make_run(llm, rounds=2))

    (summary_call,) = llm.calls_of(MODERATOR)
    assert summary_call is llm.calls[-1]
    prompt = summary_call.messages[-1].content
    for persona in DEBATERS:
        assert f"[{persona}]\n{answer(persona, 2)}" in prompt
        assert answer(persona, 1) not in prompt
    (summary,) = of_kind(events, "summary_completed")
    assert summary.agent == MODERATOR
    assert summary.text == answer(MODERATOR, 1)
    assert summary.usage == USAGE
    moderator_started = [s for s in of_kind(events, "agent_started") if s.agent == MODERATOR]
    assert [s.round for s in moderator_started] == [3]


async def test_each_agent_starts_streams_and_completes_before_its_round_closes() -> None:
    agent_set = make_agent_set()
    events = await run_to_end(make_run(FakeLLM(), rounds=2, agent_set=agent_set))

    for round_number in (1, 2):
        for persona in DEBATERS:
            steps = agent_steps(events, persona, round_number)
            assert steps[0] == "agent_started"
            assert steps[-1] == "agent_completed"
            assert set(steps[1:-1]) == {"agent_delta"}
    assert agent_steps(events, MODERATOR, 3)[0] == "agent_started"
    assert agent_steps(events, MODERATOR, 3)[-1] == "summary_completed"

    closes = [i for i, e in enumerate(events) if kind(e) == "round_completed"]
    assert [events[i].round_completed for i in closes] == [
        discussion_pb2.RoundCompleted(round=1, completed_agents=4, failed_agents=0),
        discussion_pb2.RoundCompleted(round=2, completed_agents=4, failed_agents=0),
    ]
    for index, event in enumerate(events):
        payload = getattr(event, kind(event))
        if kind(event) in ("agent_started", "agent_delta", "agent_completed"):
            if payload.round == 1:
                assert index < closes[0]
            elif payload.round == 2:
                assert closes[0] < index < closes[1]
            else:
                assert index > closes[1]
    assert kind(events[-1]) == "summary_completed"

    for started in of_kind(events, "agent_started"):
        assert started.agent_instance_id == agent_set.agents[started.agent].instance_id
    for completed in of_kind(events, "agent_completed"):
        assert completed.agent_instance_id == agent_set.agents[completed.agent].instance_id
        assert completed.usage == USAGE


@pytest.mark.parametrize("limits", [EVERY_CHUNK, COALESCED], ids=["every-chunk", "coalesced"])
async def test_deltas_add_up_to_the_completed_text(limits: StreamingLimits) -> None:
    events = await run_to_end(make_run(FakeLLM(), rounds=2, limits=limits))

    completed = of_kind(events, "agent_completed")
    assert len(completed) == 2 * len(DEBATERS)
    for done in completed:
        deltas = [d.text for d in of_kind(events, "agent_delta") if (d.agent, d.round) == (done.agent, done.round)]
        assert "".join(deltas) == done.text == answer(done.agent, done.round)
        if limits is EVERY_CHUNK:
            assert len(deltas) == len(done.text.split(" "))
        else:
            assert len(deltas) == 1


async def test_memory_holds_the_whole_conversation_after_the_run() -> None:
    agent_set = make_agent_set()

    await run_to_end(make_run(FakeLLM(), rounds=2, agent_set=agent_set))

    memory = agent_set.agents["科学家"].memory
    assert [m.role for m in memory] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.content for m in memory if m.role == "assistant"] == [answer("科学家", 1), answer("科学家", 2)]


async def test_one_failing_persona_fails_alone_and_the_summary_is_still_written() -> None:
    llm = FakeLLM(failing={"经济学家"})

    events = await run_to_end(make_run(llm, rounds=2))

    failed = of_kind(events, "agent_failed")
    assert [(f.agent, f.round) for f in failed] == [("经济学家", 1), ("经济学家", 2)]
    assert all("500" in f.reason and "boom" in f.reason for f in failed)
    completed = of_kind(events, "agent_completed")
    assert sorted((c.agent, c.round) for c in completed) == sorted(
        (p, r) for p in DEBATERS if p != "经济学家" for r in (1, 2)
    )
    assert of_kind(events, "round_completed") == [
        discussion_pb2.RoundCompleted(round=1, completed_agents=3, failed_agents=1),
        discussion_pb2.RoundCompleted(round=2, completed_agents=3, failed_agents=1),
    ]
    (summary,) = of_kind(events, "summary_completed")
    assert summary.text == answer(MODERATOR, 1)
    prompt = llm.calls_of(MODERATOR)[0].messages[-1].content
    assert "经济学家" not in prompt
    for persona in ("科学家", "哲学家", "工程师"):
        assert answer(persona, 2) in prompt


async def test_when_every_debater_fails_there_is_no_summary() -> None:
    llm = FakeLLM(failing=set(DEBATERS))

    events = await run_to_end(make_run(llm, rounds=2))

    assert sorted(f.agent for f in of_kind(events, "agent_failed")) == sorted(DEBATERS)
    assert of_kind(events, "round_completed") == [
        discussion_pb2.RoundCompleted(round=1, completed_agents=0, failed_agents=4)
    ]
    assert kind(events[-1]) == "round_completed"
    assert of_kind(events, "agent_completed") == []
    assert of_kind(events, "summary_completed") == []
    assert llm.calls_of(MODERATOR) == []
    assert len(llm.calls) == len(DEBATERS)


async def test_a_failing_moderator_leaves_the_rounds_intact() -> None:
    llm = FakeLLM(failing={MODERATOR})

    events = await run_to_end(make_run(llm, rounds=1))

    assert len(of_kind(events, "agent_completed")) == len(DEBATERS)
    assert [(f.agent, f.round) for f in of_kind(events, "agent_failed")] == [(MODERATOR, 2)]
    assert of_kind(events, "summary_completed") == []


async def test_closing_the_event_stream_cancels_the_llm_calls_in_flight() -> None:
    llm = FakeLLM(hang=True)
    stream = make_run(llm, rounds=2).events()
    # events() is typed as an iterator but is an async generator: closing it is the behaviour under test.
    assert isinstance(stream, AsyncGenerator)

    started: list[str] = []
    while len(started) < len(DEBATERS):
        event = await asyncio.wait_for(anext(stream), timeout=5)
        if kind(event) == "agent_started":
            started.append(event.agent_started.agent)
    await asyncio.wait_for(llm.all_hanging.wait(), timeout=5)
    assert llm.cancelled == []

    await stream.aclose()

    assert sorted(llm.cancelled) == sorted(DEBATERS)
    assert llm.in_flight == 0


async def test_a_resumed_run_rebuilds_memory_and_prompts_exactly_as_an_uninterrupted_one() -> None:
    # The reference: two rounds in one go.
    whole = FakeLLM()
    await run_to_end(make_run(whole, rounds=2))
    round_one = {p: answer(p, 1) for p in DEBATERS}
    # The same discussion resumed at round 2 on a fresh agent set (another replica, or a restart).
    resumed = FakeLLM()
    fresh = make_agent_set("session-resumed")
    run = DiscussionRun(
        agent_set=fresh,
        topic=TOPIC,
        persona_names=list(fresh.agents),
        rounds=2,
        llm=resumed,
        limits=EVERY_CHUNK,
        deadline=None,
        start_round=2,
        prior_answers={1: round_one},
    )
    events = await run_to_end(run)
    # Only round 2 and the summary ran: one call per debater, one for the moderator.
    assert sorted(c.persona for c in resumed.calls) == sorted([*DEBATERS, MODERATOR])
    assert [r.round for r in of_kind(events, "round_completed")] == [2]
    for persona in DEBATERS:
        reference = whole.calls_of(persona)[1].messages
        assert resumed.calls_of(persona)[0].messages == reference, persona


async def test_resuming_after_the_last_round_only_writes_the_summary() -> None:
    llm = FakeLLM()
    fresh = make_agent_set("session-summary-only")
    answers = {1: {p: f"{p} round one" for p in DEBATERS}, 2: {p: f"{p} round two" for p in DEBATERS[:2]}}
    run = DiscussionRun(
        agent_set=fresh,
        topic=TOPIC,
        persona_names=list(fresh.agents),
        rounds=2,
        llm=llm,
        limits=EVERY_CHUNK,
        deadline=None,
        start_round=3,
        prior_answers=answers,
    )
    events = await run_to_end(run)
    assert [c.persona for c in llm.calls] == [MODERATOR]
    prompt = llm.calls[0].messages[-1].content
    # Each debater's latest answer: round two where it gave one, round one otherwise.
    for persona in DEBATERS[:2]:
        assert f"{persona} round two" in prompt
    for persona in DEBATERS[2:]:
        assert f"{persona} round one" in prompt
    assert of_kind(events, "summary_completed")


def round_one_prompt_tokens(persona: str) -> int:
    """The prompt estimate of a debater's round-1 call (system prompt + opening prompt)."""
    system = prompts.system_prompt(PersonaRegistry.load().personas[persona])
    return estimated_usage(
        [ChatMessage("system", system), ChatMessage("user", prompts.opening_prompt(TOPIC))], 0
    ).prompt_tokens


def budget_run(llm: FakeLLM, *, rounds: int, token_budget: int, limits: StreamingLimits = EVERY_CHUNK) -> DiscussionRun:
    agent_set = make_agent_set()
    return DiscussionRun(
        agent_set=agent_set,
        topic=TOPIC,
        persona_names=list(agent_set.agents),
        rounds=rounds,
        llm=llm,
        limits=limits,
        deadline=None,
        token_budget=token_budget,
    )


def reported_tokens(events: list[agents_pb2.AgentEvent]) -> int:
    """The usage the discussion reports: every completed answer and the summary."""
    answers = of_kind(events, "agent_completed") + of_kind(events, "summary_completed")
    return sum(a.usage.total_tokens for a in answers)


async def test_calls_made_at_once_reserve_from_the_budget_and_the_last_ones_are_clamped_or_not_made() -> None:
    llm = FakeLLM(bills_prompt=True)
    first, second, third, fourth = DEBATERS
    # Two whole answers (64 tokens each), then room for a 20-token answer, then none.
    budget = sum(round_one_prompt_tokens(p) + 64 for p in (first, second)) + round_one_prompt_tokens(third) + 20
    run = budget_run(llm, rounds=3, token_budget=budget)

    events = await run_to_end(run)

    round_one = llm.calls[:3]
    assert [(c.persona, c.options.max_tokens) for c in round_one] == [(first, 64), (second, 64), (third, 20)]
    assert of_kind(events, "agent_failed")[0] == discussion_pb2.AgentFailed(
        agent=fourth,
        round=1,
        reason=f"token budget of {budget} spent: 0 tokens left (0 used), too few for the prompt "
        f"(~{round_one_prompt_tokens(fourth)}) and a minimal answer ({MIN_ANSWER_TOKENS})",
    )
    assert run.tokens_spent == reported_tokens(events) <= budget
    assert all(c.options.max_tokens is not None and c.options.max_tokens >= MIN_ANSWER_TOKENS for c in llm.calls)


async def test_what_a_call_does_not_use_returns_to_the_budget() -> None:
    llm = FakeLLM(bills_prompt=True)
    # Round 1 reserves all of it; its answers (4 words) leave 4 × 60 tokens unused for round 2.
    budget = sum(round_one_prompt_tokens(p) + 64 for p in DEBATERS)
    run = budget_run(llm, rounds=2, token_budget=budget)

    events = await run_to_end(run)

    assert [c.options.max_tokens for c in llm.calls[:4]] == [64] * 4
    assert [s.round for s in of_kind(events, "agent_started")].count(2) >= 1
    assert run.tokens_spent == reported_tokens(events) <= budget


async def test_a_budget_spent_by_the_rounds_leaves_the_summary_unwritten_with_the_reason() -> None:
    llm = FakeLLM(bills_prompt=True)
    # Answers of 4 tokens at most: round 1 spends exactly what it reserves, and leaves 10 tokens.
    short = dataclasses.replace(EVERY_CHUNK, max_tokens=4)
    spent = sum(round_one_prompt_tokens(p) + 4 for p in DEBATERS)
    run = budget_run(llm, rounds=1, token_budget=spent + 10, limits=short)

    events = await run_to_end(run)

    assert llm.calls_of(MODERATOR) == []
    ((agent, round_number, reason),) = [(f.agent, f.round, f.reason) for f in of_kind(events, "agent_failed")]
    assert (agent, round_number) == (MODERATOR, 2)
    assert reason.startswith(f"token budget of {spent + 10} spent: 10 tokens left ({spent} used), too few for")
    assert reason.endswith("and a minimal answer (4)")
    assert len(of_kind(events, "agent_completed")) == len(DEBATERS)
    assert run.tokens_spent == reported_tokens(events) == spent


async def test_each_call_carries_its_personas_model_choices() -> None:
    registry = PersonaRegistry.load()
    scientist = dataclasses.replace(
        registry.personas["科学家"], backend="bigger", model="m-7b", temperature=0.0, max_tokens=99
    )
    agent_set = AgentSetRegistry(max_agent_sets=10).acquire("session-opts", [scientist, registry.personas["工程师"]])
    llm = FakeLLM()

    await run_to_end(make_run(llm, rounds=1, agent_set=agent_set))

    assert llm.calls_of("科学家")[0].options == CallOptions(
        backend="bigger", model="m-7b", temperature=0.0, max_tokens=99
    )
    assert llm.calls_of("工程师")[0].options == CallOptions()
