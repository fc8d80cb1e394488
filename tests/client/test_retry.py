"""The retry policy: RetryInfo is the floor, the jitter window grows exponentially to its cap, attempts are
bounded; and a create retried through UNAVAILABLE lands once the server is there."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest
from roundtable_client import Client, DiscussionStatus, NotFound, Retry, RetryPolicy

from services.shared.processes import free_port
from tests.client.conftest import PERSONAS, MakeSuite


def test_the_delay_is_the_retry_info_plus_a_jittered_share_of_a_capped_exponential_window() -> None:
    policy = RetryPolicy(initial_backoff_seconds=0.5, max_backoff_seconds=4.0, rng=random.Random(7))
    assert [policy.window_seconds(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.window_seconds(10_000) == 4.0
    for retry_number in range(6):
        delays = [policy.delay_seconds(retry_number, 1.5) for _ in range(2000)]
        assert min(delays) >= 1.5, "came back before the server's RetryInfo"
        assert max(delays) <= 1.5 + policy.window_seconds(retry_number)
        # Full jitter: spread over the whole window, not bunched at one end.
        assert max(delays) - min(delays) > 0.9 * policy.window_seconds(retry_number)
    assert 0 <= policy.delay_seconds(0, None) <= 0.5


def test_max_attempts_bounds_the_attempts_and_bad_settings_are_refused() -> None:
    assert [RetryPolicy(max_attempts=3).allows(made) for made in (1, 2, 3)] == [True, True, False]
    assert RetryPolicy().allows(10_000)
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=-1)


async def test_a_create_retried_through_unavailable_lands_once_the_server_is_up(make_suite: MakeSuite) -> None:
    port = free_port()
    retries: list[Retry] = []
    policy = RetryPolicy(initial_backoff_seconds=0.2, max_backoff_seconds=1.0)
    async with Client(f"127.0.0.1:{port}", retry=policy, timeout_seconds=30, on_retry=retries.append) as client:
        pending = asyncio.create_task(client.create("Anyone there yet?", personas=PERSONAS))
        await asyncio.sleep(1.0)  # nothing listens: UNAVAILABLE, retried
        assert not pending.done()
        await make_suite(session={"port": port})
        created = await asyncio.wait_for(pending, 20)
        assert created.topic == "Anyone there yet?"
        listed = [doc.discussion_id async for doc in client.list()]
    assert listed.count(created.discussion_id) == 1
    assert retries and {retry.code for retry in retries} == {grpc.StatusCode.UNAVAILABLE}
    assert all(retry.method == "CreateDiscussion" for retry in retries)


class _LoseFirstReply(grpc.aio.UnaryUnaryClientInterceptor):
    """Lets the first call of `method` reach the server and do its work, then reports UNAVAILABLE (a lost reply)."""

    def __init__(self, method: str) -> None:
        self.method = method.encode()
        self.lost = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        if details.method.endswith(self.method) and not self.lost:
            await call  # done on the server
            self.lost += 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "reply lost (test)"
            )
        return call


async def test_a_cancel_and_a_delete_whose_reply_was_lost_are_retried_to_success(make_suite: MakeSuite) -> None:
    """The retry of a cancel that did go through finds it CANCELLED, of a delete finds it gone: both succeed."""
    suite = await make_suite(simulator={"first_token_latency_ms": 2000})
    cancel_lost, delete_lost = _LoseFirstReply("/CancelDiscussion"), _LoseFirstReply("/DeleteDiscussion")
    async with Client(suite.session_host.address, interceptors=[cancel_lost, delete_lost]) as client:
        created = await client.create("Lost in the mail", personas=PERSONAS)
        cancelled = await client.cancel(created.discussion_id)
        assert DiscussionStatus.of(cancelled.status) == DiscussionStatus.CANCELLED
        await client.delete(created.discussion_id)
        with pytest.raises(NotFound):
            await client.get(created.discussion_id)
        # Without a lost reply the same calls still say what happened.
        with pytest.raises(NotFound):
            await client.delete(created.discussion_id)
    assert (cancel_lost.lost, delete_lost.lost) == (1, 1)
