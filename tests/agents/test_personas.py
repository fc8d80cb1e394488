"""The persona file: the shipped one loads, and each malformed one is refused with a message naming file and field."""

from __future__ import annotations

import pathlib

import pytest

from services.agents.personas import BackendSpec, PersonaFileError, PersonaRegistry

VALID_PERSONAS = """
[[persona]]
name = "科学家"
aliases = ["scientist"]
role = "a scientist"

[[persona]]
name = "主持人"
aliases = ["moderator"]
role = "the moderator"
moderator = true
"""


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "personas.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_default_file_loads_the_five_personas() -> None:
    registry = PersonaRegistry.load()

    assert list(registry.personas) == ["科学家", "哲学家", "经济学家", "工程师", "主持人"]
    assert registry.default_roster == ("科学家", "哲学家", "经济学家", "工程师", "主持人")
    assert registry.moderator.name == "主持人"
    assert [p.name for p in registry.personas.values() if p.moderator] == ["主持人"]
    assert all(p.role.strip() for p in registry.personas.values())


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("Scientist", "科学家"),
        ("SCIENTIST", "科学家"),
        ("  philosopher ", "哲学家"),
        ("Economist", "经济学家"),
        ("engineer", "工程师"),
        ("Moderator", "主持人"),
        ("科学家", "科学家"),
    ],
)
def test_names_and_aliases_resolve_case_insensitively(name: str, canonical: str) -> None:
    registry = PersonaRegistry.load()

    found = registry.resolve(name)

    assert found is not None and found.name == canonical


@pytest.mark.parametrize("name", ["astrologer", "", "scientists", "科学"])
def test_unknown_names_resolve_to_nothing(name: str) -> None:
    assert PersonaRegistry.load().resolve(name) is None


def test_a_minimal_file_loads_with_every_persona_as_the_default_roster(tmp_path: pathlib.Path) -> None:
    registry = PersonaRegistry.load(write(tmp_path, VALID_PERSONAS))

    assert registry.default_roster == ("科学家", "主持人")
    assert registry.moderator.name == "主持人"
    assert registry.personas["科学家"].aliases == ("scientist",)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param(
            '[[persona]]\nrole = "no name"\n' + VALID_PERSONAS,
            ["persona[0]", "'name'"],
            id="missing-name",
        ),
        pytest.param(
            '[[persona]]\nname = "   "\nrole = "blank name"\n' + VALID_PERSONAS,
            ["persona[0]", "'name'"],
            id="blank-name",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = ""\n',
            ["persona[2]", "'role'"],
            id="empty-role",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\n',
            ["persona[2]", "'role'"],
            id="missing-role",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\naliases = "poet"\n',
            ["persona[2]", "'aliases'"],
            id="aliases-not-a-list",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\naliases = ["poet", ""]\n',
            ["persona[2]", "'aliases'"],
            id="empty-alias",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\ncolour = "blue"\n',
            ["persona[2]", "colour"],
            id="unknown-field",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\nmoderator = "yes"\n',
            ["persona[2]", "'moderator'"],
            id="moderator-not-a-bool",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "研究员"\nrole = "a researcher"\naliases = ["SCIENTIST"]\n',
            ["persona[2]", "SCIENTIST", "twice"],
            id="duplicate-alias-across-personas",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "scientist"\nrole = "a second scientist"\n',
            ["persona[2]", "scientist", "twice"],
            id="name-equal-to-another-alias",
        ),
        pytest.param(
            VALID_PERSONAS.replace("moderator = true", ""),
            ["moderator", "exactly one"],
            id="no-moderator",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "裁判"\nrole = "a referee"\nmoderator = true\n',
            ["moderator", "exactly one", "主持人", "裁判"],
            id="two-moderators",
        ),
        pytest.param(
            'default_roster = ["科学家", "astrologer"]\n' + VALID_PERSONAS,
            ["default_roster", "astrologer"],
            id="roster-names-unknown-persona",
        ),
        pytest.param(
            'default_roster = ["scientist"]\n' + VALID_PERSONAS,
            ["default_roster", "scientist"],
            id="roster-names-an-alias",
        ),
        pytest.param(
            'default_roster = "科学家"\n' + VALID_PERSONAS,
            ["default_roster"],
            id="roster-not-a-list",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人\nrole = "a poet"\n',
            ["line"],
            id="toml-syntax-error",
        ),
        pytest.param("", ["[[persona]]"], id="no-personas"),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\nbackend = "elsewhere"\n',
            ["persona[2]", "'backend'", "elsewhere", "[[backend]]"],
            id="backend-not-defined",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\nmodel = ""\n',
            ["persona[2]", "'model'"],
            id="empty-model",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\ntemperature = 2.5\n',
            ["persona[2]", "'temperature'", "0 to 2"],
            id="temperature-too-high",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\ntemperature = "warm"\n',
            ["persona[2]", "'temperature'"],
            id="temperature-not-a-number",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\nmax_tokens = 0\n',
            ["persona[2]", "'max_tokens'"],
            id="max-tokens-zero",
        ),
        pytest.param(
            VALID_PERSONAS + '[[persona]]\nname = "诗人"\nrole = "a poet"\nmax_tokens = 12.5\n',
            ["persona[2]", "'max_tokens'"],
            id="max-tokens-not-whole",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nmodel = "m"\n',
            ["backend[0]", "'base_url'"],
            id="backend-without-base-url",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nbase_url = "ftp://x/v1"\nmodel = "m"\n',
            ["backend[0]", "'base_url'", "ftp://x/v1"],
            id="backend-base-url-not-http",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\n',
            ["backend[0]", "'model'"],
            id="backend-without-model",
        ),
        pytest.param(
            VALID_PERSONAS
            + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\n'
            + '[[backend]]\nname = "big"\nbase_url = "http://y/v1"\nmodel = "n"\n',
            ["backend[1]", "'name'", "big", "twice"],
            id="backend-defined-twice",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\nkey = "k"\n',
            ["backend[0]", "key"],
            id="backend-unknown-field",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\nclient = "httpx"\n',
            ["backend[0]", "'client'", "'stream'", "'openai-sdk'", "httpx"],
            id="backend-unknown-client",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\norganization = 7\n',
            ["backend[0]", "'organization'", "string"],
            id="backend-organization-not-a-string",
        ),
        pytest.param(
            VALID_PERSONAS + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\nproject = true\n',
            ["backend[0]", "'project'", "string"],
            id="backend-project-not-a-string",
        ),
        pytest.param(
            VALID_PERSONAS
            + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\nrequests_per_minute = -1\n',
            ["backend[0]", "'requests_per_minute'", "0 (no limit) or more"],
            id="backend-negative-rpm",
        ),
        pytest.param(
            VALID_PERSONAS
            + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\ntokens_per_minute = 1.5\n',
            ["backend[0]", "'tokens_per_minute'", "whole number"],
            id="backend-fractional-tpm",
        ),
        pytest.param(
            VALID_PERSONAS
            + '[[backend]]\nname = "big"\nbase_url = "http://x/v1"\nmodel = "m"\ntokens_per_minute = true\n',
            ["backend[0]", "'tokens_per_minute'"],
            id="backend-boolean-tpm",
        ),
        pytest.param(
            'backend = "local"\n' + VALID_PERSONAS,
            ["'backend'", "[[backend]]"],
            id="backend-not-an-array-of-tables",
        ),
        pytest.param(
            "personas = []\n" + VALID_PERSONAS,
            ["top-level", "personas"],
            id="misspelt-top-level-field",
        ),
    ],
)
def test_a_malformed_file_names_the_file_and_the_field(tmp_path: pathlib.Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text)

    with pytest.raises(PersonaFileError) as caught:
        PersonaRegistry.load(path)

    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_a_missing_file_names_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nowhere" / "personas.toml"

    with pytest.raises(PersonaFileError) as caught:
        PersonaRegistry.load(path)

    assert str(path) in str(caught.value)


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "personas.toml"
    path.write_bytes(VALID_PERSONAS.encode("gb18030"))

    with pytest.raises(PersonaFileError) as caught:
        PersonaRegistry.load(path)

    assert str(path) in str(caught.value)


MIXED_MODELS = """
[[backend]]
name = "bigger"
base_url = "http://127.0.0.1:8081/v1"
model = "some-7b-instruct"

[[backend]]
name = "provider"
base_url = "https://api.example.com/v1"
model = "gpt-x"
api_key = "sk-1"
client = "openai-sdk"
organization = "org-1"
project = "proj-1"
requests_per_minute = 500
tokens_per_minute = 200000

[[persona]]
name = "科学家"
aliases = ["scientist"]
role = "a scientist"
backend = "bigger"
temperature = 0.2

[[persona]]
name = "哲学家"
role = "a philosopher"
model = "another-model"
max_tokens = 400
temperature = 1

[[persona]]
name = "主持人"
role = "the moderator"
moderator = true
"""


def test_personas_may_choose_their_backend_model_and_sampling(tmp_path: pathlib.Path) -> None:
    registry = PersonaRegistry.load(write(tmp_path, MIXED_MODELS))

    assert registry.backends["bigger"] == BackendSpec(
        name="bigger", base_url="http://127.0.0.1:8081/v1", model="some-7b-instruct"
    )
    # Client, headers and quota: unset means the service's --llm-client, no headers, no limit.
    assert (registry.backends["bigger"].client, registry.backends["bigger"].requests_per_minute) == (None, 0)
    assert registry.backends["provider"] == BackendSpec(
        name="provider",
        base_url="https://api.example.com/v1",
        model="gpt-x",
        api_key="sk-1",
        client="openai-sdk",
        organization="org-1",
        project="proj-1",
        requests_per_minute=500,
        tokens_per_minute=200_000,
    )
    scientist, philosopher, moderator = registry.personas.values()
    assert (scientist.backend, scientist.model, scientist.temperature, scientist.max_tokens) == (
        "bigger",
        None,
        0.2,
        None,
    )
    assert (philosopher.backend, philosopher.model, philosopher.temperature, philosopher.max_tokens) == (
        None,
        "another-model",
        1.0,
        400,
    )
    assert (moderator.backend, moderator.model, moderator.temperature, moderator.max_tokens) == (None,) * 4


def test_the_shipped_file_leaves_every_model_choice_to_the_service() -> None:
    registry = PersonaRegistry.load()

    assert registry.backends == {}
    assert all(p.backend is p.model is p.temperature is p.max_tokens is None for p in registry.personas.values())
