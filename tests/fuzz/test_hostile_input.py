"""Hostile input (issue 4): thousands of generated and malformed requests at every RPC of every service.

For each RPC, Hypothesis generates at least 2,000 structured requests (hostile field values, unset
fields, unknown fields, junk metadata) plus a few hundred raw payloads (random, corrupted and
hand-made undecodable bytes) and two requests past max_message_bytes. All are sent to real servers,
50 at a time, while a canary discussion runs start to end over and over. Every answer must be a
documented status (never UNKNOWN, never INTERNAL), the RPC's own rules must hold, the servers must
log no unexplained error, and afterwards every server is SERVING and a normal discussion completes.

Answers that match a product bug already found (harness.KNOWN_BUGS) are counted, not failed; each
of those bugs has a strict xfail in test_known_bugs.py, which starts failing once it is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import unicodedata
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import Message

from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from services.shared.server import ServiceHost
from tests.fuzz import strategies as S
from tests.fuzz.harness import (
    FUZZ_SEED,
    RPCS,
    Code,
    ErrorLog,
    Outcome,
    Rpc,
    create_with_retry,
    decode,
    health_status,
    judge,
    send_all,
)
from tests.fuzz.plans import PLANS, STRUCTURED_PER_RPC, ProbeSource, oversized_probes, substitute
from tests.suite import Suite, run_to_end

pytestmark = pytest.mark.fuzz

# Between canary discussions: enough of them to show the suite works under the batch, without
# taking the CPU the batch needs.
CANARY_PAUSE_SECONDS = 0.5
MAX_TOPIC_CHARS = 4_000
MAX_ROUNDS = 5
MAX_PERSONAS = 12
MAX_TTL_SECONDS = 24 * 3600
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
MAX_WINDOW_SECONDS = 3_600
HEX32 = re.compile(r"[0-9a-f]{32}")
TERMINAL = frozenset(
    {
        session_pb2.DISCUSSION_STATUS_COMPLETED,
        session_pb2.DISCUSSION_STATUS_FAILED,
        session_pb2.DISCUSSION_STATUS_CANCELLED,
        session_pb2.DISCUSSION_STATUS_TIMED_OUT,
        session_pb2.DISCUSSION_STATUS_INTERRUPTED,
    }
)
# Rejections an invalid request may also meet before validation (identity, rate limits, deadlines).
REJECTED = frozenset({Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED})

_KNOWN_KEYS = {name.casefold(): name for name in S.KNOWN_PERSONAS}
_CANONICAL = dict(zip(S.PERSONA_ALIASES, S.PERSONA_NAMES, strict=True)) | {n: n for n in S.PERSONA_NAMES}


# ---------------------------------------------------------------------------------------------
# Oracles: what the contract says about a request, beyond "a documented status"

Oracle = Callable[[Message, Outcome], "str | None"]


def rejected(outcome: Outcome) -> bool:
    """The request was turned away (or the client gave up on it first)."""
    return outcome.code in REJECTED or (outcome.code == Code.CANCELLED and outcome.cancelled_by_client)


def create_problem(request: session_pb2.CreateDiscussionRequest) -> str | None:
    """Why the contract (session.proto, DESIGN §3) makes this CreateDiscussion invalid, if it does."""
    topic = request.topic
    if not topic.strip():
        return "empty topic"
    if len(topic) > MAX_TOPIC_CHARS:
        return "topic too long"
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in topic):
        return "control characters in the topic"
    if not 0 <= request.rounds <= MAX_ROUNDS:
        return "rounds out of range"
    if request.token_budget < 0:
        return "negative token_budget"
    if len(request.request_id) > 128:
        return "request_id too long"
    if len(request.personas) > MAX_PERSONAS:
        return "too many personas"
    keys = [name.strip().casefold() for name in request.personas]
    if any(key not in _KNOWN_KEYS for key in keys):
        return "unknown persona"
    if keys and all(_CANONICAL[_KNOWN_KEYS[key]] == "主持人" for key in keys):
        return "only the moderator"
    if request.HasField("ttl") and not 0 < request.ttl.ToNanoseconds() <= MAX_TTL_SECONDS * 10**9:
        return "ttl out of range"
    return None


def create_oracle(created: list[str]) -> Oracle:
    def oracle(request: Message, outcome: Outcome) -> str | None:
        assert isinstance(request, session_pb2.CreateDiscussionRequest)
        problem = create_problem(request)
        if problem is not None and not rejected(outcome):
            return f"invalid request ({problem}) answered {outcome.code.name}"
        if outcome.code != Code.OK:
            return None
        doc = outcome.responses[0]
        assert isinstance(doc, session_pb2.Discussion)
        created.append(doc.discussion_id)
        if not HEX32.fullmatch(doc.discussion_id):
            return f"discussion_id {doc.discussion_id!r} is not 32 hex characters"
        if not request.request_id and doc.status not in (
            session_pb2.DISCUSSION_STATUS_QUEUED,
            session_pb2.DISCUSSION_STATUS_RUNNING,
        ):
            return f"a new discussion answered {session_pb2.DiscussionStatus.Name(doc.status)}"
        if not request.request_id and doc.topic != request.topic.strip():
            return "the stored topic is not the request's"
        return None

    return oracle


def id_oracle(real: set[str], on_real: frozenset[grpc.StatusCode]) -> Oracle:
    """Malformed id: INVALID_ARGUMENT; well-formed unknown id: NOT_FOUND; real id: `on_real`."""

    def oracle(request: Message, outcome: Outcome) -> str | None:
        discussion_id: str = request.discussion_id  # type: ignore[attr-defined]
        code = outcome.code
        if isinstance(request, session_pb2.StreamDiscussionRequest) and request.after_sequence < 0:
            expected = {Code.INVALID_ARGUMENT}
        elif not HEX32.fullmatch(discussion_id):
            expected = {Code.INVALID_ARGUMENT}
        elif discussion_id not in real:
            expected = {Code.NOT_FOUND}
        else:
            expected = set(on_real)
        if outcome.cancelled_by_client:
            expected.add(Code.CANCELLED)
        if code not in expected | {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED}:
            return f"expected {sorted(c.name for c in expected)}"
        if isinstance(request, session_pb2.StreamDiscussionRequest) and outcome.responses:
            return stream_problem(request, outcome)
        return None

    return oracle


def stream_problem(request: session_pb2.StreamDiscussionRequest, outcome: Outcome) -> str | None:
    """Replay starts right after after_sequence, has no gaps, and (read to the end) ends terminal."""
    sequences = [event.sequence for event in outcome.responses]  # type: ignore[attr-defined]
    if sequences[0] != request.after_sequence + 1:
        return f"replay after {request.after_sequence} started at {sequences[0]}"
    if sequences != list(range(sequences[0], sequences[0] + len(sequences))):
        return f"sequence numbers have gaps or repeats: {sequences[:20]}"
    if any(event.discussion_id != request.discussion_id for event in outcome.responses):  # type: ignore[attr-defined]
        return "an event of another discussion"
    last = outcome.responses[-1]
    if outcome.code == Code.OK and not outcome.cancelled_by_client:
        if last.WhichOneof("event") != "status_changed" or last.status_changed.status not in TERMINAL:  # type: ignore[attr-defined]
            return "the stream ended OK before a terminal status"
    return None


def list_oracle(request: Message, outcome: Outcome) -> str | None:
    assert isinstance(request, session_pb2.ListDiscussionsRequest)
    if request.page_size < 0 or request.status not in session_pb2.DiscussionStatus.values():
        if not rejected(outcome):
            return f"invalid page_size/status answered {outcome.code.name}"
        return None
    if outcome.code != Code.OK:
        return None
    response = outcome.responses[0]
    assert isinstance(response, session_pb2.ListDiscussionsResponse)
    limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if len(response.discussions) > limit:
        return f"{len(response.discussions)} discussions on a page of {limit}"
    if any(d.results for d in response.discussions):
        return "a listing carries results"
    if request.status and any(d.status != request.status for d in response.discussions):
        return "a discussion of another status"
    created = [d.created_at.ToNanoseconds() for d in response.discussions]
    if created != sorted(created, reverse=True):
        return "not newest first"
    return None


def run_oracle(request: Message, outcome: Outcome) -> str | None:
    assert isinstance(request, agents_pb2.RunDiscussionRequest)
    invalid = not request.session_id or len(request.session_id) > 128 or not 1 <= request.rounds <= 10
    if invalid and not rejected(outcome):
        return f"invalid session_id/rounds answered {outcome.code.name}"
    return None


def personas_oracle(request: Message, outcome: Outcome) -> str | None:
    if outcome.code != Code.OK:
        return "ListPersonas must answer OK"
    response = outcome.responses[0]
    assert isinstance(response, agents_pb2.ListPersonasResponse)
    names = {p.name for p in response.personas}
    if not names or not set(response.default_roster) <= names:
        return "no personas, or a default roster naming unknown ones"
    return None


def stats_oracle(request: Message, outcome: Outcome) -> str | None:
    if outcome.code == Code.OK:
        stats = outcome.responses[0]
        assert isinstance(stats, agents_pb2.AgentStats)
        if stats.live_agent_sets > stats.max_agent_sets or stats.live_agent_sets < 0:
            return f"{stats.live_agent_sets} live agent sets of at most {stats.max_agent_sets}"
    return None


def report_oracle(request: Message, outcome: Outcome) -> str | None:
    assert isinstance(request, monitor_pb2.InstanceReport)
    invalid = not request.instance_id or len(request.instance_id) > 200 or request.service not in S.MONITORED_SERVICES
    if invalid and not rejected(outcome):
        return f"an invalid report answered {outcome.code.name}"
    return None


def window_oracle(request: Message, outcome: Outcome) -> str | None:
    assert isinstance(request, monitor_pb2.GetPerformanceSummaryRequest)
    valid = 0 <= request.window_seconds <= MAX_WINDOW_SECONDS
    if valid and outcome.code != Code.OK:
        return f"a window of {request.window_seconds} s answered {outcome.code.name}"
    if not valid and not rejected(outcome):
        return f"a window of {request.window_seconds} s answered {outcome.code.name}"
    return None


def concurrency_oracle(request: Message, outcome: Outcome) -> str | None:
    return None if outcome.code == Code.OK else "GetConcurrencyStats must answer OK"


# ---------------------------------------------------------------------------------------------
# The suite around a batch


def _host(suite: Suite, rpc: Rpc, report_monitor: ServiceHost) -> ServiceHost:
    if rpc.name == "ReportInstance":
        return report_monitor
    return {"session": suite.session_host, "agents": suite.agents_host, "monitor": suite.monitor_host}[rpc.service]


async def make_pool(suite: Suite, quick: int, long: int) -> list[str]:
    """`quick` discussions run to the end, then `long` ones left running (5 rounds, default roster)."""
    stub = suite.session()
    ids = []
    for n in range(quick):
        request = session_pb2.CreateDiscussionRequest(topic=f"pool {n}", personas=["engineer"], rounds=1)
        created = await create_with_retry(stub, request)
        async for _ in stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id), timeout=60
        ):
            pass
        ids.append(created.discussion_id)
    for n in range(long):
        request = session_pb2.CreateDiscussionRequest(topic=f"long pool {n}", rounds=MAX_ROUNDS)
        ids.append((await create_with_retry(stub, request)).discussion_id)
    return ids


async def normal_discussion(suite: Suite, topic: str) -> session_pb2.Discussion:
    """A plain discussion, created (waiting out admission) and streamed to the end."""
    stub = suite.session()
    request = session_pb2.CreateDiscussionRequest(topic=topic, personas=["engineer", "economist"], rounds=2)
    for _ in range(300):
        try:
            final, events = await run_to_end(stub, request)
            break
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("a normal discussion was never admitted")
    assert events[-1].status_changed.status in TERMINAL, "the stream ended before a terminal status"
    return final


async def canary(suite: Suite, stop: asyncio.Event) -> list[session_pb2.Discussion]:
    """Normal discussions, one after another, for as long as the batch runs (at least one)."""
    finished: list[session_pb2.Discussion] = []
    while True:
        finished.append(await normal_discussion(suite, f"canary {len(finished)}: does the suite still work?"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CANARY_PAUSE_SECONDS)
        if stop.is_set():
            return finished


async def unfinished_after(suite: Suite, ids: list[str], seconds: float = 30.0) -> tuple[list[str], list[str]]:
    """Of `ids`, those not terminal (nor deleted) `seconds` after the batch: nothing may stay unfinished.

    Returns (stuck in QUEUED although nothing runs, anything else unfinished). The first kind is
    a discussion admission lost track of, recognised early so it costs no full wait.
    """
    stub = suite.session()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pending = list(dict.fromkeys(ids))
    previous_queued: set[str] = set()
    while pending:
        statuses = {}
        for discussion_id in pending:
            try:
                doc = await stub.GetDiscussion(
                    session_pb2.GetDiscussionRequest(discussion_id=discussion_id), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == Code.NOT_FOUND:
                    continue
                raise
            if doc.status not in TERMINAL:
                statuses[discussion_id] = doc.status
        pending = list(statuses)
        queued = {i for i, status in statuses.items() if status == session_pb2.DISCUSSION_STATUS_QUEUED}
        if pending and set(pending) == queued and queued == previous_queued:
            running = await stub.ListDiscussions(
                session_pb2.ListDiscussionsRequest(status=session_pb2.DISCUSSION_STATUS_RUNNING, page_size=1),
                timeout=10,
            )
            if not running.discussions:  # queued, yet no discussion runs to free a slot for them
                return sorted(queued), []
        previous_queued = queued
        if not pending or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    return [], pending


async def assert_healthy(suite: Suite, report_monitor: ServiceHost) -> None:
    """Every server SERVING (overall and per service), the fleet queries answer, a discussion completes."""
    for host in (suite.session_host, suite.agents_host, suite.monitor_host, report_monitor):
        for service in ("", *host.service.grpc_services):
            assert await health_status(host.address, service) == "SERVING", f"{host.address} {service!r}"
    monitor = suite.monitor()
    await monitor.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=10)
    await monitor.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest(), timeout=10)
    final = await normal_discussion(suite, "after the batch: is the suite healthy?")
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final


# ---------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("name", list(RPCS))
async def test_hostile_requests_get_documented_statuses(
    name: str, fuzz_suite: Suite, report_monitor: ServiceHost, error_log: ErrorLog, probe_source: ProbeSource
) -> None:
    rpc, plan = RPCS[name], PLANS[name]
    host = _host(fuzz_suite, rpc, report_monitor)
    max_bytes = host.settings.max_message_bytes

    clock = time.perf_counter()
    probes = await probe_source.probes(name) + oversized_probes(rpc, max_bytes)
    generated_seconds = time.perf_counter() - clock  # waiting for the generator process, mostly 0
    real_ids = await make_pool(fuzz_suite, *plan.pool)
    probes = substitute(probes, real_ids)

    created: list[str] = []
    real = set(real_ids)
    oracles: dict[str, Oracle] = {
        "CreateDiscussion": create_oracle(created),
        "GetDiscussion": id_oracle(real, frozenset({Code.OK})),
        "StreamDiscussion": id_oracle(real, frozenset({Code.OK, Code.CANCELLED})),
        "CancelDiscussion": id_oracle(real, frozenset({Code.OK, Code.FAILED_PRECONDITION})),
        "DeleteDiscussion": id_oracle(real, frozenset({Code.OK, Code.NOT_FOUND})),
        "ListDiscussions": list_oracle,
        "ListPersonas": personas_oracle,
        "RunDiscussion": run_oracle,
        "GetAgentStats": stats_oracle,
        "ReportInstance": report_oracle,
        "GetPerformanceSummary": window_oracle,
        "GetConcurrencyStats": concurrency_oracle,
    }

    mark = error_log.mark()
    stop = asyncio.Event()
    canary_task = asyncio.create_task(canary(fuzz_suite, stop))
    async with grpc.aio.insecure_channel(host.address) as channel:
        outcomes = await send_all(channel, rpc, probes, concurrency=plan.concurrency, deadline_seconds=plan.timeout)
    sent_seconds = time.perf_counter() - clock - generated_seconds
    stop.set()
    canaries = await canary_task

    report = judge(rpc, outcomes, max_bytes, oracles.get(name))
    print(f"\n[fuzz seed {FUZZ_SEED}] {report.summary()}; canaries {len(canaries)}")
    decodable = sum(decode(rpc, o.probe.payload) is not None for o in outcomes)
    print(f"    decodable {decodable}, undecodable {len(outcomes) - decodable}")

    stuck_queued, unfinished = await unfinished_after(fuzz_suite, real_ids + created)
    assert not stuck_queued, f"discussions left QUEUED although nothing runs: {stuck_queued}"
    await assert_healthy(fuzz_suite, report_monitor)
    if rpc.name == "ReportInstance":
        await check_poisoned_monitor(report_monitor)
    unexplained, known_logs = error_log.since(mark)
    print(
        f"    generated in {generated_seconds:.1f} s, sent in {sent_seconds:.1f} s, "
        f"checked in {time.perf_counter() - clock - generated_seconds - sent_seconds:.1f} s"
    )
    if known_logs:
        print(f"    server log lines of known bugs: {dict(known_logs)}")

    assert len(outcomes) >= STRUCTURED_PER_RPC, "fewer requests than the issue's done-when"
    assert not report.violations, (
        f"seed {FUZZ_SEED}: {len(report.violations)} bad answers of {len(outcomes)}, by kind: "
        f"{report.violation_kinds()}; one of each:\n" + "\n".join(report.first_of_each_kind())
    )
    assert not unexplained, f"seed {FUZZ_SEED}: the servers logged errors:\n" + "\n".join(unexplained[:3])
    assert all(d.status == session_pb2.DISCUSSION_STATUS_COMPLETED for d in canaries), canaries
    assert not unfinished, f"discussions still not terminal 30 s after the batch: {unfinished}"
    reached = report.codes.total() - report.codes.get("UNAUTHENTICATED", 0)
    assert reached > len(outcomes) // 2, "most requests never reached the servicer"


async def check_poisoned_monitor(host: ServiceHost) -> None:
    """The fuzzed monitor still answers its queries: OK, or the known overflow bug (INTERNAL)."""
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        for query in (
            stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=10),
            stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest(window_seconds=3600), timeout=10),
        ):
            await query  # sums past int64 saturate; they once failed every reader
