"""The simulator's per-key quotas: bucket arithmetic on a fake clock, then OpenAI's wire format end to end."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import openai
import pytest

from services.simulator.quota import Quotas, format_duration
from services.simulator.server import RunningSimulator
from tests.simulator.test_simulator import ask, make_messages

RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
# OpenAI's reset durations: "20ms", "1s", "1.5s", "6m0s", "1h2m3.5s".
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s|(\d+)ms)$")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        """Start at an arbitrary non-zero time."""
        self.now = 1000.0

    def __call__(self) -> float:
        """Return the current fake time."""
        return self.now


def duration_seconds(text: str) -> float:
    """Parse one of OpenAI's reset durations back into seconds."""
    match = DURATION.match(text)
    assert match, text
    hours, minutes, seconds, millis = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0) + int(millis or 0) / 1000


def prompt_estimate(messages: list[dict[str, str]]) -> int:
    """The simulator's prompt-token estimate: content characters // 4 + 1."""
    return sum(len(m["content"]) for m in messages) // 4 + 1


async def post_chat(
    http: aiohttp.ClientSession, key: str, messages: list[dict[str, str]], **body: Any
) -> tuple[int, dict[str, str], Any]:
    """Send a chat completion with an API key; return status, headers and the decoded JSON body."""
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post("v1/chat/completions", json={"messages": messages, **body}, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def quota_report(http: aiohttp.ClientSession) -> dict[str, Any]:
    """GET /_sim/quota."""
    async with http.get("_sim/quota") as resp:
        assert resp.status == 200
        report: dict[str, Any] = await resp.json()
        return report


# --- bucket arithmetic ---------------------------------------------------------------------------------


def test_format_duration_follows_openai() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.02) == "20ms"
    assert format_duration(0.0201) == "21ms"  # rounded up: waiting the reported time is always enough
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(8.64) == "8.64s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723.5) == "1h2m3.5s"
    for seconds in (0.02, 1.5, 59.999, 360, 3723.5):
        assert duration_seconds(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)


def test_requests_bucket_refuses_when_empty_and_refills_continuously() -> None:
    clock = FakeClock()
    quotas = Quotas(clock=clock)
    admitted = [quotas.admit("k", rpm_limit=3, tpm_limit=0, tokens=10) for _ in range(3)]
    assert all(d.admitted for d in admitted)
    assert [d.requests.remaining for d in admitted if d.requests] == [2, 1, 0]
    assert all(d.tokens is None and d.tokens_charged == 0 for d in admitted)

    refused = quotas.admit("k", rpm_limit=3, tpm_limit=0, tokens=10)
    assert refused.refused_by == "requests" and not refused.admitted
    # 3 per minute is one every 20 s; the bucket is empty, so the next request fits in 20 s.
    assert refused.retry_after_seconds == pytest.approx(20.0)
    assert (refused.used, refused.requested) == (3, 1)
    assert refused.requests is not None and refused.requests.reset_seconds == pytest.approx(60.0)

    clock.now += 19.9
    assert not quotas.admit("k", rpm_limit=3, tpm_limit=0, tokens=10).admitted
    clock.now += 0.2
    assert quotas.admit("k", rpm_limit=3, tpm_limit=0, tokens=10).admitted
    usage = quotas.usage()["k"]
    assert (usage.requests_admitted, usage.requests_refused, usage.peak_overuse_requests) == (4, 2, 0.0)


def test_tokens_are_charged_up_front_and_the_unused_part_refunded() -> None:
    clock = FakeClock()
    quotas = Quotas(clock=clock)
    first = quotas.admit("k", rpm_limit=0, tpm_limit=1000, tokens=600)
    assert first.admitted and first.tokens_charged == 600
    assert first.tokens is not None and first.tokens.remaining == 400
    # While the first answer runs, its whole charge is held.
    second = quotas.admit("k", rpm_limit=0, tpm_limit=1000, tokens=600)
    assert second.refused_by == "tokens"
    # 200 tokens short at 1000/60 per second: 12 s.
    assert second.retry_after_seconds == pytest.approx(12.0)
    assert (second.used, second.requested) == (600, 600)

    quotas.settle(first, used_tokens=150)
    third = quotas.admit("k", rpm_limit=0, tpm_limit=1000, tokens=600)
    assert third.admitted and third.tokens is not None and third.tokens.remaining == 1000 - 150 - 600
    usage = quotas.usage()["k"]
    assert (usage.tokens_charged, usage.tokens_refunded, usage.peak_overuse_tokens) == (1200, 450, 0.0)


def test_an_answer_that_outgrows_its_charge_is_charged_the_excess_and_shows_as_overuse() -> None:
    quotas = Quotas(clock=FakeClock())
    decision = quotas.admit("k", rpm_limit=0, tpm_limit=100, tokens=90)
    quotas.settle(decision, used_tokens=130)
    usage = quotas.usage()["k"]
    assert (usage.tokens_charged, usage.tokens_refunded, usage.peak_overuse_tokens) == (130, 0, 30.0)


def test_a_request_larger_than_the_limit_is_refused_without_a_retry_time() -> None:
    quotas = Quotas(clock=FakeClock())
    decision = quotas.admit("k", rpm_limit=0, tpm_limit=100, tokens=101)
    assert decision.refused_by == "tokens" and decision.retry_after_seconds is None


def test_keys_are_independent_a_changed_limit_starts_full_and_idle_keys_are_forgotten() -> None:
    clock = FakeClock()
    quotas = Quotas(clock=clock, max_keys=2)
    assert quotas.admit("a", rpm_limit=1, tpm_limit=0, tokens=1).admitted
    assert not quotas.admit("a", rpm_limit=1, tpm_limit=0, tokens=1).admitted
    assert quotas.admit("b", rpm_limit=1, tpm_limit=0, tokens=1).admitted
    assert quotas.admit("a", rpm_limit=5, tpm_limit=0, tokens=1).admitted  # a new limit, a full bucket
    assert quotas.admit("c", rpm_limit=5, tpm_limit=0, tokens=1).admitted
    assert set(quotas.usage()) == {"a", "c"}  # "b" was the least recently seen


def test_both_buckets_must_fit_and_a_refusal_waits_for_the_slower() -> None:
    clock = FakeClock()
    quotas = Quotas(clock=clock)
    assert quotas.admit("k", rpm_limit=60, tpm_limit=600, tokens=600).admitted
    refused = quotas.admit("k", rpm_limit=60, tpm_limit=600, tokens=300)
    # Requests are plentiful; 300 tokens take 30 s at 10 tokens/s.
    assert refused.refused_by == "tokens" and refused.retry_after_seconds == pytest.approx(30.0)
    # A refusal charges nothing: the requests bucket still holds 59.
    assert refused.requests is not None and refused.requests.remaining == 59


# --- end to end -----------------------------------------------------------------------------------------


async def test_rpm_quota_answers_429_like_openai_then_admits_after_retry_after(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    sim.simulator.configure(rpm_limit=60)  # one request a second
    messages = make_messages("Ann", "quotas")
    started = time.monotonic()
    admitted = 0
    for _ in range(200):
        status, headers, body = await post_chat(http, "sk-ann", messages)
        if status != 200:
            break
        admitted += 1
    elapsed = time.monotonic() - started
    assert 60 <= admitted <= 60 + elapsed + 1

    assert status == 429
    assert body["error"]["type"] == "requests" and body["error"]["code"] == "rate_limit_exceeded"
    assert "on requests per min (RPM): Limit 60, Used 60, Requested 1. Please try again in" in body["error"]["message"]
    retry_after_ms = int(headers["retry-after-ms"])
    assert 0 < retry_after_ms <= 1000 and headers["Retry-After"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in headers  # no TPM quota, no token headers
    record = sim.simulator.requests[-1]
    assert record.quota_refused and (record.outcome, record.status_code) == ("429", 429)
    assert record.retry_after_seconds == retry_after_ms / 1000 and record.answer == ""

    await asyncio.sleep(retry_after_ms / 1000)
    status, _, _ = await post_chat(http, "sk-ann", messages)
    assert status == 200
    assert not sim.simulator.requests[-1].quota_refused


async def test_the_openai_sdk_sees_a_rate_limit_error_with_the_quota_message(sim: RunningSimulator) -> None:
    sim.simulator.configure(tpm_limit=1000)
    async with openai.AsyncOpenAI(api_key="sk-sdk", base_url=sim.base_url, max_retries=0) as oai:
        with pytest.raises(openai.RateLimitError) as info:
            await ask(oai, make_messages("Bea", "big asks"), max_tokens=2000)
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "tokens"
    assert "Request too large" in info.value.message and "Limit 1000" in info.value.message
    assert "Retry-After" not in info.value.response.headers  # waiting would never help


async def test_two_api_keys_have_separate_quotas(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    sim.simulator.configure(rpm_limit=3)
    messages = make_messages("Cai", "fairness")
    assert [(await post_chat(http, "sk-a", messages))[0] for _ in range(4)] == [200, 200, 200, 429]
    assert (await post_chat(http, "sk-b", messages))[0] == 200
    # A request without a key is its own (anonymous) principal.
    async with http.post("v1/chat/completions", json={"messages": messages}) as resp:
        assert resp.status == 200

    report = await quota_report(http)
    assert (report["rpm_limit"], report["tpm_limit"]) == (3, 0)
    counts = {key: (u["requests_admitted"], u["requests_refused"]) for key, u in report["keys"].items()}
    assert counts == {"sk-a": (3, 1), "sk-b": (1, 0), "": (1, 0)}


async def test_tpm_holds_prompt_plus_max_tokens_while_answering_and_refunds_the_rest(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    # 6000 a minute is 100 tokens a second: the refill over this test is small next to the amounts checked.
    sim.simulator.configure(tpm_limit=6000, tokens_per_second=50.0)
    long_messages = make_messages("Dee", "a slow answer")
    long_cost = prompt_estimate(long_messages) + 5000
    small_messages = make_messages("Dee", "a quick one")
    small_cost = prompt_estimate(small_messages) + 10

    async def stream_long() -> dict[str, str]:
        async with http.post(
            "v1/chat/completions",
            json={"messages": long_messages, "max_tokens": 5000, "stream": True},
            headers={"Authorization": "Bearer sk-dee"},
        ) as resp:
            assert resp.status == 200
            await resp.read()
            return dict(resp.headers)

    task = asyncio.create_task(stream_long())
    async with asyncio.timeout(2.0):
        await sim.simulator.wait_for_record(lambda r: r.pieces_sent >= 1)
    status, during, _ = await post_chat(http, "sk-dee", small_messages, max_tokens=10)
    long_headers = await task
    assert status == 200
    # A fresh bucket charged exactly prompt estimate + max_tokens at admission.
    assert long_headers["x-ratelimit-remaining-tokens"] == str(6000 - long_cost)
    # Still held while the long answer streams (give or take the refill of a second or two).
    assert 6000 - long_cost - small_cost <= int(during["x-ratelimit-remaining-tokens"]) <= 6000 - long_cost + 300

    long_record = next(r for r in sim.simulator.requests if r.topic == "a slow answer")
    long_used = long_record.prompt_tokens + long_record.pieces_sent
    assert long_record.tokens_charged == long_cost and long_record.pieces_sent == 24
    status, after, _ = await post_chat(http, "sk-dee", small_messages, max_tokens=10)
    assert status == 200
    # Refunded: only what both answers used (and this request's charge) is missing from the bucket.
    assert int(after["x-ratelimit-remaining-tokens"]) >= 6000 - long_used - 2 * small_cost

    usage = (await quota_report(http))["keys"]["sk-dee"]
    small_used = 2 * (prompt_estimate(small_messages) + 10)
    assert usage["tokens_charged"] == long_cost + 2 * small_cost
    assert usage["tokens_refunded"] == usage["tokens_charged"] - long_used - small_used
    assert usage["peak_overuse_tokens"] == 0


async def test_tpm_refusal_names_the_limit_and_its_retry_after_is_enough(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    # 100 tokens a second; every answer is 60 tokens.
    sim.simulator.configure(tpm_limit=6000, answer_tokens_min=60, answer_tokens_max=60)
    messages = make_messages("Eli", "token budgets")
    assert (await post_chat(http, "sk-eli", messages, max_tokens=60))[0] == 200
    # Asks for the whole minute while the first answer's ~80 tokens are gone: about 0.8 s short.
    whole_minute = 6000 - prompt_estimate(messages)
    status, headers, body = await post_chat(http, "sk-eli", messages, max_tokens=whole_minute)
    assert status == 429
    assert body["error"]["type"] == "tokens" and body["error"]["code"] == "rate_limit_exceeded"
    assert "on tokens per min (TPM): Limit 6000, Used " in body["error"]["message"]
    assert "Requested 6000." in body["error"]["message"]
    retry_after_ms = int(headers["retry-after-ms"])
    assert 0 < retry_after_ms <= 2000 and int(headers["Retry-After"]) == -(-retry_after_ms // 1000)
    assert duration_seconds(body["error"]["message"].split("try again in ")[1].rstrip(".")) == pytest.approx(
        retry_after_ms / 1000, abs=0.002
    )

    await asyncio.sleep(retry_after_ms / 1000)
    status, _, body = await post_chat(http, "sk-eli", messages, max_tokens=whole_minute)
    assert status == 200, body


async def test_every_answer_reports_remaining_and_reset_like_openai(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    messages = make_messages("Fin", "headers")
    _, headers, _ = await post_chat(http, "sk-fin", messages)
    assert not any(name in headers for name in RATE_LIMIT_HEADERS)  # no quota, no quota headers

    sim.simulator.configure(rpm_limit=100, tpm_limit=10_000)
    cost = prompt_estimate(messages) + 40
    status, headers, _ = await post_chat(http, "sk-fin", messages, max_tokens=40)
    assert status == 200
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("100", "99")
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == (
        "10000",
        str(10_000 - cost),
    )
    # Full again after one request at 100/60 per second, and after `cost` tokens at 10000/60 per second.
    assert duration_seconds(headers["x-ratelimit-reset-requests"]) == pytest.approx(0.6, abs=0.002)
    assert duration_seconds(headers["x-ratelimit-reset-tokens"]) == pytest.approx(cost * 60 / 10_000, abs=0.002)

    body = {"messages": messages, "stream": True, "max_tokens": 40}
    async with http.post("v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-fin"}) as resp:
        assert resp.status == 200
        assert all(name in resp.headers for name in RATE_LIMIT_HEADERS)
        assert int(resp.headers["x-ratelimit-remaining-requests"]) == 98
        await resp.read()


async def test_100_concurrent_requests_never_get_more_than_the_bucket_holds(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    sim.simulator.configure(rpm_limit=20, tpm_limit=20 * 200)
    messages = make_messages("Gil", "a stampede")
    started = time.monotonic()
    results = await asyncio.gather(*(post_chat(http, "sk-gil", messages, max_tokens=150) for _ in range(100)))
    elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in results]
    admitted = statuses.count(200)
    # Each request costs 1 of 20 requests and well under 200 of 4000 tokens: requests run out first.
    assert 20 <= admitted <= 20 + elapsed * 20 / 60 + 1
    assert statuses.count(429) == 100 - admitted
    assert {body["error"]["type"] for status, _, body in results if status == 429} == {"requests"}

    usage = (await quota_report(http))["keys"]["sk-gil"]
    assert (usage["requests_admitted"], usage["requests_refused"]) == (admitted, 100 - admitted)
    assert usage["peak_overuse_requests"] == 0 and usage["peak_overuse_tokens"] == 0
    assert sum(r.quota_refused for r in sim.simulator.requests) == 100 - admitted


async def test_reset_starts_the_quotas_afresh(sim: RunningSimulator, http: aiohttp.ClientSession) -> None:
    sim.simulator.configure(rpm_limit=1)
    messages = make_messages("Hu", "reset")
    assert [(await post_chat(http, "sk-hu", messages))[0] for _ in range(2)] == [200, 429]
    async with http.post("_sim/reset") as resp:
        assert resp.status == 200
    assert (await quota_report(http))["keys"] == {}
    assert (await post_chat(http, "sk-hu", messages))[0] == 200
