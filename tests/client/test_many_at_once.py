"""100 discussions at once from one caller against a per-principal cap of 20: the retry policy gets every one
through, and its retries come back spread out, never as a wave larger than the cap."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from roundtable_client import Client, DiscussionStatus, Event, Retry

from tests.client.conftest import PERSONAS, PRINCIPAL_CAP, assert_whole_stream, final_status
from tests.suite import Suite

logger = logging.getLogger(__name__)

DISCUSSIONS = 100
WINDOW_SECONDS = 0.1
# "The cap plus a small margin": retries landing in any 100 ms, at most.
MAX_RETRIES_PER_WINDOW = PRINCIPAL_CAP + 5

pytestmark = pytest.mark.timeout(300)


def largest_wave(times: list[float], window_seconds: float) -> int:
    """The most of `times` that fall within any one window of the given length."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(ordered):
        while at - ordered[start] > window_seconds:
            start += 1
        most = max(most, end - start + 1)
    return most


async def test_100_discussions_at_once_against_a_cap_of_20_all_complete_with_retries_spread(
    capped_suite: Suite,
) -> None:
    retry_times: list[float] = []

    def on_retry(retry: Retry) -> None:
        assert retry.method == "CreateDiscussion" and retry.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry.delay_seconds >= (retry.retry_info_seconds or 0), "came back before the server's RetryInfo"
        retry_times.append(time.monotonic() + retry.delay_seconds)  # when this retry goes out

    started = time.monotonic()
    async with Client(capped_suite.session_host.address, timeout_seconds=240, on_retry=on_retry) as client:

        async def one(index: int) -> list[Event]:
            return [event async for event in client.discuss(f"at once #{index}", personas=PERSONAS[:1])]

        streams = await asyncio.gather(*(one(index) for index in range(DISCUSSIONS)))
    took_seconds = time.monotonic() - started

    for events in streams:
        assert_whole_stream(events)
        assert final_status(events) == DiscussionStatus.COMPLETED
    assert len({events[0].discussion_id for events in streams}) == DISCUSSIONS
    assert len(retry_times) >= DISCUSSIONS - PRINCIPAL_CAP, "the cap never refused: the test tests nothing"
    wave = largest_wave(retry_times, WINDOW_SECONDS)
    logger.warning(
        "%d discussions against a cap of %d: all COMPLETED in %.1f s, %d retries, at most %d in any %g ms",
        DISCUSSIONS,
        PRINCIPAL_CAP,
        took_seconds,
        len(retry_times),
        wave,
        WINDOW_SECONDS * 1000,
    )
    assert wave <= MAX_RETRIES_PER_WINDOW, f"a retry wave of {wave} within {WINDOW_SECONDS * 1000:g} ms"


def test_largest_wave_counts_the_busiest_window() -> None:
    assert largest_wave([0.0, 0.05, 0.1, 0.5, 0.55], 0.1) == 3
    assert largest_wave([], 0.1) == 0
