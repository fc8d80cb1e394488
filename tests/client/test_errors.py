"""Typed exceptions for every error a caller can act on, each with what the server said: status, RetryInfo,
QuotaFailure, BadRequest."""

from __future__ import annotations

import pathlib

import grpc
import pytest
from roundtable_client import (
    NO_RETRY,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RoundtableError,
    Unauthenticated,
)

from services.session.keys import add_key
from tests.client.conftest import PERSONAS, MakeSuite
from tests.suite import Suite


async def test_an_empty_topic_is_invalid_argument_naming_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await client.create("   ", personas=PERSONAS)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in raised.value.field_violations] == ["topic"]


async def test_an_unknown_discussion_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as raised:
        await client.get("0" * 32)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFound):  # the stream says so at once instead of reopening
        _ = [event async for event in client.events("0" * 32)]


async def test_cancelling_a_finished_discussion_is_failed_precondition(client: Client) -> None:
    events = [event async for event in client.discuss("Finished already", personas=PERSONAS)]
    with pytest.raises(FailedPrecondition) as raised:
        await client.cancel(events[0].discussion_id)
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_no_api_key_is_unauthenticated_and_a_key_works(make_suite: MakeSuite, tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys.toml"
    key = add_key(keys, "alice")
    locked = await make_suite(session={"api_keys_file": keys, "allow_anonymous": False})
    async with Client(locked.session_host.address, api_key="") as anonymous:
        with pytest.raises(Unauthenticated) as raised:
            await anonymous.create("Who goes there?", personas=PERSONAS)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with Client(locked.session_host.address, api_key=key) as alice:
        assert (await alice.create("Alice it is", personas=PERSONAS)).discussion_id


async def test_over_the_cap_is_resource_exhausted_with_the_delay_and_the_quota_subject(make_suite: MakeSuite) -> None:
    capped: Suite = await make_suite(
        session={"max_concurrent_sessions_per_principal": 1}, simulator={"first_token_latency_ms": 3000}
    )
    async with Client(capped.session_host.address, retry=NO_RETRY) as client:
        await client.create("Takes the only slot", personas=PERSONAS)
        with pytest.raises(ResourceExhausted) as raised:
            await client.create("One too many", personas=PERSONAS)
    refused = raised.value
    assert isinstance(refused, RoundtableError) and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.retry_delay_seconds is not None and refused.retry_delay_seconds > 0
    assert [violation.subject for violation in refused.quota_violations] == ["principal:anonymous"]
    assert refused.quota_violations[0].description == "max_concurrent_sessions_per_principal"


async def test_a_refusal_that_outlasts_the_deadline_is_raised_without_waiting(make_suite: MakeSuite) -> None:
    """The retry policy never sleeps past the call's deadline: a RetryInfo longer than what is left raises now."""
    capped: Suite = await make_suite(
        session={"max_concurrent_sessions_per_principal": 1}, simulator={"first_token_latency_ms": 3000}
    )
    retries: list[object] = []
    async with Client(capped.session_host.address, timeout_seconds=0.3, on_retry=retries.append) as client:
        await client.create("Takes the only slot", personas=PERSONAS)
        with pytest.raises(ResourceExhausted) as raised:
            await client.create("One too many", personas=PERSONAS)
    assert (raised.value.retry_delay_seconds or 0) >= 0.3  # the server's floor is 0.5 s
    assert retries == []
