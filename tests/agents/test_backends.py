"""Per-persona backends and models through real servers, what ListPersonas reports, a bad persona file."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Awaitable, Callable

from services.agents.llm_budget import FleetBudget, UnlimitedBudget
from services.agents.llm_openai_sdk import OpenAISDKChatClient
from services.agents.llm_stream import StreamingChatClient
from services.agents.service import AgentsService
from services.agents.settings import AgentsSettings
from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.simulator.server import start_simulator
from services.simulator.settings import SimulatorSettings
from tests.suite import FAST_SIMULATOR, Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
REPO = pathlib.Path(__file__).resolve().parents[2]

MIXED = """
[[backend]]
name = "second"
base_url = "{second_url}"
model = "second-model"
client = "openai-sdk"

[[persona]]
name = "科学家"
aliases = ["scientist"]
role = "a scientist"

[[persona]]
name = "哲学家"
aliases = ["philosopher"]
role = "a philosopher"
model = "big-model"
temperature = 0
max_tokens = 5

[[persona]]
name = "经济学家"
aliases = ["economist"]
role = "an economist"
backend = "second"

[[persona]]
name = "主持人"
aliases = ["moderator"]
role = "the moderator"
moderator = true
"""


async def test_personas_can_mix_models_and_endpoints(make_suite: MakeSuite, tmp_path: pathlib.Path) -> None:
    async with await start_simulator(SimulatorSettings(**FAST_SIMULATOR)) as second:
        personas_file = tmp_path / "mixed.toml"
        personas_file.write_text(MIXED.format(second_url=second.base_url), encoding="utf-8")
        suite = await make_suite(agents={"personas_file": personas_file})

        # The service's own backend streams through the lean client, the second through the openai SDK.
        llm = suite.agents_service.llm
        assert isinstance(llm.default_client, StreamingChatClient)
        assert isinstance(llm.clients["second"], OpenAISDKChatClient)

        listing = await suite.agents().ListPersonas(agents_pb2.ListPersonasRequest())
        assert {p.name: (p.backend, p.model) for p in listing.personas} == {
            "科学家": ("simulator", "roundtable-sim-1"),
            "哲学家": ("simulator", "big-model"),
            "经济学家": ("second", "second-model"),
            "主持人": ("simulator", "roundtable-sim-1"),
        }
        assert "SIMULATOR" in listing.notice

        doc, _ = await run_to_end(suite.session(), session_pb2.CreateDiscussionRequest(topic="mixing", rounds=2))
        assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED

        main_calls = [r for r in suite.simulator.simulator.requests if r.topic == "mixing"]
        second_calls = [r for r in second.simulator.requests if r.topic == "mixing"]
        assert sorted({r.persona for r in main_calls}) == sorted(["科学家", "哲学家", "主持人"])
        assert {r.persona for r in second_calls} == {"经济学家"}
        assert {(r.model, r.max_tokens, r.temperature) for r in second_calls} == {("second-model", 24, 0.7)}
        philosopher = [r for r in main_calls if r.persona == "哲学家"]
        assert {(r.model, r.max_tokens, r.temperature) for r in philosopher} == {("big-model", 5, 0.0)}
        assert all(len(r.answer.split()) <= 5 for r in philosopher)
        scientist = [r for r in main_calls if r.persona == "科学家"]
        assert {(r.model, r.max_tokens, r.temperature) for r in scientist} == {("roundtable-sim-1", 24, 0.7)}


async def test_list_personas_names_the_backend_and_warns_about_the_simulator(suite: Suite) -> None:
    listing = await suite.agents().ListPersonas(agents_pb2.ListPersonasRequest())

    assert (listing.backend, listing.model) == ("simulator", "roundtable-sim-1")
    assert "SIMULATOR" in listing.notice and "not a language model" in listing.notice
    assert all((p.backend, p.model) == ("simulator", "roundtable-sim-1") for p in listing.personas)


def test_a_malformed_persona_file_stops_the_service_naming_file_and_field(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "personas.toml"
    path.write_text('[[persona]]\nname = "诗人"\nrole = "a poet"\ntemperature = "hot"\n', encoding="utf-8")

    done = subprocess.run(
        [sys.executable, "-m", "services.agents", "--personas-file", str(path), "--port", "0", "--metrics-port", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert f"{path}: persona[0]: field 'temperature'" in done.stderr


SHARED_KEY = """
[[backend]]
name = "same-key-a"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key = "sk-shared"
requests_per_minute = 100

[[backend]]
name = "same-key-b"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key = "sk-shared"
requests_per_minute = 40
tokens_per_minute = 9000

[[persona]]
name = "科学家"
role = "a scientist"
backend = "same-key-a"

[[persona]]
name = "主持人"
role = "the moderator"
moderator = true
"""


async def test_the_llm_client_and_budget_follow_the_settings_and_the_persona_file(tmp_path: pathlib.Path) -> None:
    # Defaults (make run): the lean client and no limits, so no budget in the way.
    service = AgentsService(AgentsSettings(port=0, metrics_port=-1))
    assert isinstance(service.llm.default_client, StreamingChatClient)
    assert isinstance(service.llm.budget, UnlimitedBudget)
    await service.close()

    personas_file = tmp_path / "shared.toml"
    personas_file.write_text(SHARED_KEY, encoding="utf-8")
    settings = AgentsSettings(port=0, metrics_port=-1, llm_client="openai-sdk", personas_file=personas_file)
    service = AgentsService(settings)
    try:
        assert isinstance(service.llm.default_client, OpenAISDKChatClient)
        assert all(isinstance(c, OpenAISDKChatClient) for c in service.llm.clients.values())  # they inherit it
        budget = service.llm.budget
        assert isinstance(budget, FleetBudget)
        # Two backend names on one endpoint and key share one quota: the smaller limits of the two.
        a, b = service.llm.backends["same-key-a"], service.llm.backends["same-key-b"]
        assert a.budget_key == b.budget_key != service.llm.default.budget_key
        limits = budget._limits[a.budget_key]
        assert (limits.requests_per_minute, limits.tokens_per_minute) == (40, 9000)
        assert service.llm.default.budget_key not in budget._limits  # the default backend has no limits
    finally:
        await service.close()
