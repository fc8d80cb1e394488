"""The agent service lets go of a session's log file once the session's agent set is released."""

from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
from collections.abc import Awaitable, Callable

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.shared.logs import flush
from tests.shared.logging_setup import service_logging
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]


def open_paths() -> set[str]:
    """What every descriptor of this process points at; a deleted file reads "<path> (deleted)"."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, among others)
    return paths


async def discuss(agents: agents_pb2_grpc.AgentServiceAsyncStub, session_id: str) -> None:
    request = agents_pb2.RunDiscussionRequest(
        session_id=session_id, topic="descriptors", personas=["科学家", "工程师", "主持人"], rounds=1
    )
    events = [event.WhichOneof("event") async for event in agents.RunDiscussion(request, timeout=30)]
    assert "summary_completed" in events, events


async def test_after_release_no_session_log_stays_open_even_once_deleted(
    make_suite: MakeSuite, tmp_path: pathlib.Path
) -> None:
    with service_logging(tmp_path / "logs") as (files, _):
        suite = await make_suite(agents={"release_grace_seconds": 3600})
        agents = suite.agents()
        ids = [secrets.token_hex(16) for _ in range(30)]
        await asyncio.gather(*(discuss(agents, session_id) for session_id in ids))
        assert flush()
        paths = {str(files.path(session_id)) for session_id in ids}
        assert paths <= open_paths()  # each live set's file is open: the test sees what it claims to

        # Half go by ReleaseSession, half when the cap makes room (as an expiry or the LRU would).
        for session_id in ids[:15]:
            released = await agents.ReleaseSession(agents_pb2.ReleaseSessionRequest(session_id=session_id))
            assert released.released
        suite.agents_service.registry.max_agent_sets = 1
        suite.agents_service.registry.acquire(secrets.token_hex(16), [])
        # The session service deletes the files of expired sessions.
        texts = {session_id: files.path(session_id).read_text(encoding="utf-8") for session_id in ids}
        for session_id in ids:
            files.path(session_id).unlink()
        assert flush()

        held = open_paths()
        assert not {path.removesuffix(" (deleted)") for path in held} & paths
        assert files.open_files() == 0
        for session_id, text in texts.items():
            assert f"Session-{session_id}-Agent-科学家 - INFO - round 1: 科学家 is analysing the topic" in text
