"""End to end: two agent replicas share one provider quota through the Redis LLM budget, so the provider barely refuses.

A real fleet (Envoy, a session replica, two agent replicas, the simulator with a tokens-per-minute quota
per API key) runs more discussions than the quota covers at once. Both agent replicas reserve from one
budget in Redis, so calls wait on our side instead of meeting the provider's 429s.
"""

from __future__ import annotations

import logging
import pathlib

import pytest

from services.cli.replicas import Fleet
from tests.redis_server import running_redis
from tests.scaleout.conftest import fleet_options, require_tools
from tests.scaleout.test_scaleout import TERMINAL, assert_whole, client, create_many, simulator

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(300)

# The discussions below (80 calls of about 190 tokens) ask for about 1.5 times what the bucket holds at the start.
TOKENS_PER_MINUTE = 10_000
DISCUSSIONS = 16
# A handful at most (measured: 0 in three runs), where the same fleet without the budget met 46 refusals
# (and left calls failed once their retries were spent).
MAX_REFUSED_REQUESTS = 3


async def test_two_agent_replicas_keep_within_one_provider_quota(tmp_path: pathlib.Path) -> None:
    require_tools()
    with running_redis() as redis:
        base = fleet_options(tmp_path)
        options = fleet_options(
            tmp_path,
            session_replicas=1,
            agent_replicas=2,
            redis_url=redis.url,
            agents_args=(
                *base.agents_args,
                "--llm-tokens-per-minute", str(TOKENS_PER_MINUTE),
                "--llm-budget-redis-url", redis.url,
                "--llm-budget-when-redis-down", "closed",
            ),
            simulator_args=(
                "--first-token-latency-ms", "50",
                "--tokens-per-second", "400",
                "--tpm-limit", str(TOKENS_PER_MINUTE),
            ),
        )  # fmt: skip
        async with Fleet.start(options) as fleet, client(fleet.session_address) as api:
            created = await create_many(api, DISCUSSIONS, "Should a fleet share one quota?")
            documents = await api.wait_for(created, lambda doc: doc.status in TERMINAL, 240, "finished")
            quota = await simulator(fleet, "/_sim/quota")
            requests = await simulator(fleet, "/_sim/requests")

    (usage,) = quota["keys"].values()  # both replicas call with one API key
    largest_charge = max(record.get("tokens_charged", 0) for record in requests)
    logger.info(
        "fleet LLM budget: %d requests admitted, %d refused, %d tokens charged (%d refunded) against %d tpm; "
        "peak overuse %.0f tokens, largest charge %d",
        usage["requests_admitted"],
        usage["requests_refused"],
        usage["tokens_charged"],
        usage["tokens_refunded"],
        TOKENS_PER_MINUTE,
        usage["peak_overuse_tokens"],
        largest_charge,
    )
    failures = [result.error for doc in documents.values() for result in doc.results if result.error]
    assert not failures, failures[:5]
    for document in documents.values():
        assert_whole(document)
    # The discussions asked for more than the bucket held: without waiting they could not all have fit.
    assert usage["tokens_charged"] - usage["tokens_refunded"] > TOKENS_PER_MINUTE
    assert usage["requests_refused"] <= MAX_REFUSED_REQUESTS, usage
    # Never beyond one in-flight reservation over the quota (an answer longer than its estimate).
    assert usage["peak_overuse_tokens"] <= largest_charge, usage
