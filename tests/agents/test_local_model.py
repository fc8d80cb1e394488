"""The local model backend for real: SmolLM2-135M on llama-cpp-python's server, driven through the whole suite."""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.agents import local_model
from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite, run_to_end

pytestmark = pytest.mark.local_model
MakeSuite = Callable[..., Awaitable[Suite]]
TOPIC = "Should cities ban cars from their centres?"


def skip_unless_installed() -> None:
    """Skip, naming the install command, when the local model is missing; fail instead where CI requires it."""
    reason = local_model.missing()
    if reason is not None:
        if os.environ.get("ROUNDTABLE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"ROUNDTABLE_REQUIRE_TOOLS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
async def local_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[local_model.LocalModelServer]:
    """The model server on a free loopback port; skipped when not installed, unless CI requires it."""
    skip_unless_installed()
    log_path: pathlib.Path = tmp_path_factory.mktemp("local-model") / "llama-server.log"
    server = await local_model.start_server(log_path)
    yield server
    await server.stop()


async def test_the_server_answers_the_one_token_check(local_server: local_model.LocalModelServer) -> None:
    assert await local_model.one_token_check(local_server.base_url) < local_model.CHECK_TIMEOUT_SECONDS


async def test_a_two_round_discussion_on_the_local_model_writes_real_text(
    local_server: local_model.LocalModelServer, make_suite: MakeSuite
) -> None:
    suite = await make_suite(
        agents={
            "llm_backend": "local",
            "llm_base_url": local_server.base_url,
            "llm_model": local_server.model,
            "llm_temperature": 0,
            "llm_max_tokens": 32,
        }
    )
    listing = await suite.agents().ListPersonas(agents_pb2.ListPersonasRequest())
    assert (listing.backend, listing.model, listing.notice) == ("local", local_model.MODEL_NAME, "")

    doc, events = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(
            topic=TOPIC, personas=["scientist", "economist", "engineer", "moderator"], rounds=2
        ),
    )

    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error
    answers = {(r.agent, r.round): r for r in doc.results}
    assert sorted(answers) == sorted(
        [(p, r) for p in ("科学家", "经济学家", "工程师") for r in (1, 2)] + [("主持人", 3)]
    )
    for result in answers.values():
        assert result.status == discussion_pb2.AGENT_STATUS_COMPLETED
        assert len(result.text.split()) >= 3, result
        assert result.usage.completion_tokens > 0
    assert doc.summary == answers[("主持人", 3)].text
    # Written by the model: the simulator saw none of it, and none of its «topic» headers appear.
    assert [r for r in suite.simulator.simulator.requests if r.topic == TOPIC] == []
    assert not any("«" in r.text for r in answers.values())
    assert any(e.WhichOneof("event") == "agent_delta" for e in events)
