"""AgentSetRegistry: fresh agents per session, kept while in use, released on time, bounded by an LRU cap."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import secrets
from collections.abc import Iterator

import pytest

from services.agents.agent_set import AgentSetRegistry
from services.agents.llm import ChatMessage
from services.agents.personas import Persona, PersonaRegistry
from services.shared.logs import FILE_FORMAT, SessionContextFilter, session_context
from services.shared.session_logs import SessionLogFiles, install

RELEASE_DELAY_SECONDS = 0.05


@pytest.fixture(scope="module")
def personas() -> list[Persona]:
    registry = PersonaRegistry.load()
    return [registry.personas[name] for name in registry.default_roster]


async def wait_until_released(registry: AgentSetRegistry, session_id: str) -> None:
    """Poll until the session's set is gone; fails the test if that never happens."""
    for _ in range(500):
        if registry.get(session_id) is None:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"agent set of {session_id} was never released")


def test_each_session_gets_its_own_fresh_agents(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)

    first = registry.acquire("session-1", personas)
    second = registry.acquire("session-2", personas)

    assert list(first.agents) == [p.name for p in personas]
    assert list(second.agents) == [p.name for p in personas]
    instance_ids = [a.instance_id for a in (*first.agents.values(), *second.agents.values())]
    assert len(set(instance_ids)) == 2 * len(personas)
    assert all(not a.memory for a in (*first.agents.values(), *second.agents.values()))
    assert all(first.agents[name] is not second.agents[name] for name in first.agents)
    assert first.session_id == "session-1"
    assert registry.get("session-1") is first
    assert registry.get("session-2") is second
    assert len(registry) == 2
    assert registry.created_total == 2


def test_acquiring_a_session_again_keeps_its_agents_and_their_memory(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    first = registry.acquire("session-1", personas)
    ids_before = {name: agent.instance_id for name, agent in first.agents.items()}
    first.agents["科学家"].memory.append(ChatMessage("assistant", "my earlier answer"))

    again = registry.acquire("session-1", personas)

    assert again is first
    assert {name: agent.instance_id for name, agent in again.agents.items()} == ids_before
    assert again.agents["科学家"].memory == [ChatMessage("assistant", "my earlier answer")]
    assert len(registry) == 1
    assert registry.created_total == 1


def test_acquiring_with_more_personas_adds_agents_and_keeps_the_old_ones(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    first = registry.acquire("session-1", personas[:2])
    kept = dict(first.agents)

    grown = registry.acquire("session-1", personas)

    assert list(grown.agents) == [p.name for p in personas]
    assert all(grown.agents[name] is agent for name, agent in kept.items())


def test_after_a_release_the_session_starts_with_new_agents(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    old = registry.acquire("session-1", personas)
    old.agents["科学家"].memory.append(ChatMessage("assistant", "old answer"))

    assert registry.release("session-1") is True
    new = registry.acquire("session-1", personas)

    assert new is not old
    assert not {a.instance_id for a in new.agents.values()} & {a.instance_id for a in old.agents.values()}
    assert new.agents["科学家"].memory == []
    assert registry.created_total == 2
    assert registry.released_total == 1


def test_release_of_an_unknown_session_is_false(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    registry.acquire("session-1", personas)

    assert registry.release("nope") is False
    assert registry.release("session-1") is True
    assert registry.release("session-1") is False
    assert registry.released_total == 1
    assert len(registry) == 0


async def test_release_later_releases_after_the_delay(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    registry.acquire("session-1", personas)
    registry.acquire("session-2", personas)

    registry.release_later("session-1", RELEASE_DELAY_SECONDS)

    await wait_until_released(registry, "session-1")
    assert registry.get("session-2") is not None
    assert registry.released_total == 1


async def test_release_later_with_no_delay_releases_at_once(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    registry.acquire("session-1", personas)

    registry.release_later("session-1", 0)

    assert registry.get("session-1") is None
    assert registry.released_total == 1


async def test_acquiring_before_the_delay_cancels_the_release(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    first = registry.acquire("session-1", personas)
    registry.release_later("session-1", RELEASE_DELAY_SECONDS)

    again = registry.acquire("session-1", personas)
    await asyncio.sleep(RELEASE_DELAY_SECONDS * 4)

    assert again is first
    assert registry.get("session-1") is first
    assert registry.released_total == 0


async def test_a_pending_release_never_drops_the_next_set_of_the_session(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    registry.acquire("session-1", personas)
    registry.release_later("session-1", RELEASE_DELAY_SECONDS)
    registry.release("session-1")

    new = registry.acquire("session-1", personas)
    await asyncio.sleep(RELEASE_DELAY_SECONDS * 4)

    assert registry.get("session-1") is new
    assert registry.released_total == 1


async def test_release_later_of_an_unknown_session_does_nothing(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)

    registry.release_later("nope", RELEASE_DELAY_SECONDS)
    await asyncio.sleep(RELEASE_DELAY_SECONDS * 4)

    assert registry.released_total == 0


def test_the_cap_is_never_exceeded_and_the_newest_sets_survive(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=100)

    for number in range(500):
        acquired = registry.acquire(f"session-{number}", personas)
        assert len(registry) <= 100
        assert registry.get(f"session-{number}") is acquired

    live = [f"session-{n}" for n in range(500) if registry.get(f"session-{n}") is not None]
    assert live == [f"session-{n}" for n in range(400, 500)]
    assert registry.created_total == 500
    assert registry.released_total == 400


def test_the_least_recently_used_set_is_evicted_first(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=3)
    for session_id in ("a", "b", "c"):
        registry.acquire(session_id, personas)
    registry.acquire("a", personas)  # a is now the most recently used

    registry.acquire("d", personas)

    assert registry.get("b") is None
    assert all(registry.get(s) is not None for s in ("a", "c", "d"))
    registry.acquire("e", personas)
    assert registry.get("c") is None
    assert all(registry.get(s) is not None for s in ("a", "d", "e"))


def test_running_sets_are_skipped_while_an_idle_one_can_go(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=3)
    registry.acquire("a", personas).running = True
    registry.acquire("b", personas).running = True
    registry.acquire("c", personas)

    registry.acquire("d", personas)

    assert registry.get("c") is None
    assert all(registry.get(s) is not None for s in ("a", "b", "d"))
    assert len(registry) == 3


def test_when_every_set_is_running_the_least_recent_running_one_goes(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=3)
    for session_id in ("a", "b", "c"):
        registry.acquire(session_id, personas).running = True

    acquired = registry.acquire("d", personas)

    assert len(registry) == 3
    assert registry.get("d") is acquired
    assert registry.get("a") is None
    assert all(registry.get(s) is not None for s in ("b", "c"))


def test_release_all_drops_every_set(personas: list[Persona]) -> None:
    registry = AgentSetRegistry(max_agent_sets=10)
    for number in range(5):
        registry.acquire(f"session-{number}", personas)

    registry.release_all()

    assert len(registry) == 0
    assert registry.released_total == 5
    assert registry.created_total == 5


@pytest.fixture
def session_files(tmp_path: pathlib.Path) -> Iterator[SessionLogFiles]:
    files = SessionLogFiles(tmp_path / "logs", max_bytes=100_000, max_open_files=16)
    files.addFilter(SessionContextFilter())
    files.setFormatter(logging.Formatter(FILE_FORMAT))
    install(files)
    yield files
    install(None)
    files.close()


def test_a_released_or_evicted_set_closes_its_sessions_log_file(
    personas: list[Persona], session_files: SessionLogFiles
) -> None:
    registry = AgentSetRegistry(max_agent_sets=2)
    logger = logging.getLogger("tests.agent_set")
    ids = [secrets.token_hex(16) for _ in range(3)]
    for session_id in ids[:2]:
        registry.acquire(session_id, personas)
        with session_context(session_id, "科学家"):
            session_files.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, "answered", (), None))
    session_files.flush()  # lines are held until a flush (the logging thread's, in a service)
    assert session_files.open_files() == 2

    registry.release(ids[0])
    assert session_files.open_files() == 1
    registry.acquire(ids[2], personas)
    registry.acquire(secrets.token_hex(16), personas)  # evicts ids[1]
    assert session_files.open_files() == 0
    assert all(session_files.path(i).read_text(encoding="utf-8").endswith("answered\n") for i in ids[:2])
