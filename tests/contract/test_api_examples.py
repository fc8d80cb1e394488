"""Every `buf curl` example in docs/api.md runs against a real suite (API keys on, reflection on) and answers
what the doc shows: the same fields and values, bar the ones that differ per run (times, ids of agent
instances, generated text, token counts)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from scripts.api_reference import API_DOC
from services.session.keys import add_key
from tests.suite import Suite

# A sh block is an example when it starts with this; its answer is the json or text block right after it.
EXAMPLE = re.compile(r"```sh\n(buf curl .*?)\n```\s*\n```(json|text)\n(.*?)\n```", re.DOTALL)
# Values that differ from run to run: only their JSON type is compared.
VARYING_KEYS = {
    "createdAt",
    "updatedAt",
    "lastAccessedAt",
    "expiresAt",
    "time",
    "sequence",
    "lastSequence",
    "agentInstanceId",
    "text",
    "summary",
    "promptTokens",
    "completionTokens",
    "totalTokens",
    "value",
}
COMMAND_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Example:
    """One command from the doc and the answer it shows."""

    command: str
    answer_format: str
    answer: str


def examples() -> list[Example]:
    """The examples of docs/api.md's Examples section, in order."""
    text = API_DOC.read_text(encoding="utf-8").split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    found = [Example(command, answer_format, answer) for command, answer_format, answer in EXAMPLE.findall(text)]
    # An example without a shown answer would go unchecked: refuse it.
    assert len(found) == text.count("```sh\nbuf curl "), "every buf curl example needs its answer block right after"
    return found


def json_documents(text: str) -> list[Any]:
    """The JSON documents printed one after another (a stream prints one per message)."""
    decoder = json.JSONDecoder()
    documents = []
    position = 0
    while (position := _skip_space(text, position)) < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
    return documents


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def mismatch(shown: Any, actual: Any, where: str = "$") -> str | None:
    """Where the actual answer departs from the one shown, or None: objects may hold more keys, lists more items
    (each shown item must match one of them), varying values need only the same JSON type."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected an object, got {actual!r}"
        for key, value in shown.items():
            if key not in actual:
                return f"{where}.{key}: missing from {sorted(actual)}"
            if key in VARYING_KEYS:
                if type(value) is not type(actual[key]):
                    return f"{where}.{key}: expected a {type(value).__name__}, got {actual[key]!r}"
                continue
            if (problem := mismatch(value, actual[key], f"{where}.{key}")) is not None:
                return problem
        return None
    if isinstance(shown, list):
        if not isinstance(actual, list):
            return f"{where}: expected a list, got {actual!r}"
        for index, item in enumerate(shown):
            if all(mismatch(item, candidate) is not None for candidate in actual):
                return f"{where}[{index}]: {item!r} matches none of {actual!r}"
        return None
    return None if shown == actual else f"{where}: expected {shown!r}, got {actual!r}"


def stream_mismatch(shown: list[Any], actual: list[Any]) -> str | None:
    """Where the printed messages depart from the ones shown, which must appear among them in order."""
    remaining = iter(enumerate(actual))
    for index, message in enumerate(shown):
        if not any(mismatch(message, candidate) is None for _, candidate in remaining):
            return f"message {index} shown, {message!r}, is not among the answer's in order: {actual!r}"
    return None


def expected_exit_code(answer: list[Any]) -> int:
    """0, or for an error answer 8 × its status code's number (buf curl's convention)."""
    if len(answer) == 1 and isinstance(answer[0], dict) and "code" in answer[0]:
        return 8 * int(grpc.StatusCode[answer[0]["code"].upper()].value[0])
    return 0


async def run_example(command: str, environment: dict[str, str]) -> tuple[int, str, str]:
    """Run one doc command in bash; its exit code, standard output and standard error."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        f"set -euo pipefail\n{command}",
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def client_environment(buf: str, suite: Suite, api_key: str) -> dict[str, str]:
    """The doc's variables, pointing at the suite, with this buf first on PATH."""
    path = f"{pathlib.Path(buf).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "ROUNDTABLE_ADDRESS": suite.session_host.address, "ROUNDTABLE_API_KEY": api_key}


async def api_key_suite(make_suite: Callable[..., Awaitable[Suite]], tmp_path: pathlib.Path) -> tuple[Suite, str]:
    """A suite that refuses anonymous callers, and a key it accepts."""
    keys_file = tmp_path / "api_keys.toml"
    api_key = add_key(keys_file, "docs-reader")
    suite = await make_suite(session={"api_keys_file": keys_file, "allow_anonymous": False})
    return suite, api_key


def test_the_doc_has_examples_of_every_public_rpc() -> None:
    """Each SessionService RPC is called by at least one example (the doc's walk-through misses none)."""
    called = {m for e in examples() for m in re.findall(r"SessionService/(\w+)\"", e.command)}
    assert called == {
        "CreateDiscussion",
        "GetDiscussion",
        "StreamDiscussion",
        "CancelDiscussion",
        "ListDiscussions",
        "DeleteDiscussion",
    }


async def test_examples_answer_what_the_doc_shows(
    buf: str, make_suite: Callable[..., Awaitable[Suite]], tmp_path: pathlib.Path
) -> None:
    """Run in order (they build on each other), each example exits as the doc says and answers what it shows."""
    suite, api_key = await api_key_suite(make_suite, tmp_path)
    environment = client_environment(buf, suite, api_key)
    for number, example in enumerate(examples(), start=1):
        code, stdout, stderr = await run_example(example.command, environment)
        context = f"example {number}:\n{example.command}\nstdout: {stdout}\nstderr: {stderr}"
        if example.answer_format == "text":
            assert code == 0, context
            missing = set(example.answer.splitlines()) - set(stdout.splitlines())
            assert not missing, f"{context}\nlines shown but not printed: {missing}"
            continue
        shown = json_documents(example.answer)
        assert code == expected_exit_code(shown), context
        actual = json_documents(stderr if code else stdout)
        problem = stream_mismatch(shown, actual) if len(shown) > 1 else mismatch(shown[0], actual[0])
        assert problem is None, f"{context}\n{problem}"


async def test_every_reply_names_its_replica(
    buf: str, make_suite: Callable[..., Awaitable[Suite]], tmp_path: pathlib.Path
) -> None:
    """The x-roundtable-instance trailer the doc's metadata table promises reaches a buf curl client."""
    suite, api_key = await api_key_suite(make_suite, tmp_path)
    command = (
        'buf curl -v --protocol grpc --http2-prior-knowledge -H "authorization: Bearer $ROUNDTABLE_API_KEY" '
        "-d '{}' \"http://$ROUNDTABLE_ADDRESS/roundtable.session.v1.SessionService/ListDiscussions\""
    )
    code, _, stderr = await run_example(command, client_environment(buf, suite, api_key))
    assert code == 0, stderr
    instance = suite.session_host.settings.instance_id
    assert instance
    # buf -v prints each trailer as "buf: < (#<stream>) Name: value", names in HTTP's canonical case.
    trailer = rf"^buf: < \(#\d+\) x-roundtable-instance: {re.escape(instance)}$"
    assert re.search(trailer, stderr, re.MULTILINE | re.IGNORECASE), stderr
