"""Per-persona backends and models through real servers, what ListPersonas reports, a bad persona file."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Awaitable, Callable

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
