"""Sends generated probes to real servers and judges every answer against the documented statuses.

Every probe goes over the wire as raw bytes (`request_serializer=None`), so structured requests,
requests with unknown fields and undecodable payloads all take the same path to the server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.monitor.v1 import monitor_pb2
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from tests.fuzz.strategies import Probe

Code = grpc.StatusCode

# The answers the contract allows (DESIGN.md §3; UNAUTHENTICATED is the session service's, once keys land).
DOCUMENTED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
    }
)
SESSION_ONLY = frozenset({Code.UNAUTHENTICATED})

# One seed per run, printed with every failure so a run can be replayed: ROUNDTABLE_FUZZ_SEED=<n>.
FUZZ_SEED = int(os.environ.get("ROUNDTABLE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


@dataclass(frozen=True)
class Rpc:
    """One method of one service, as the fuzz sees it."""

    service: str  # "session", "agents" or "monitor": which host serves it
    name: str
    path: str
    request: type[Message]
    response: type[Message]
    streaming: bool = False


def _rpcs() -> dict[str, Rpc]:
    table = [
        ("session", session_pb2, "SessionService", "CreateDiscussion", False),
        ("session", session_pb2, "SessionService", "GetDiscussion", False),
        ("session", session_pb2, "SessionService", "StreamDiscussion", True),
        ("session", session_pb2, "SessionService", "CancelDiscussion", False),
        ("session", session_pb2, "SessionService", "ListDiscussions", False),
        ("session", session_pb2, "SessionService", "DeleteDiscussion", False),
        ("agents", agents_pb2, "AgentService", "ListPersonas", False),
        ("agents", agents_pb2, "AgentService", "RunDiscussion", True),
        ("agents", agents_pb2, "AgentService", "ReleaseSession", False),
        ("agents", agents_pb2, "AgentService", "GetAgentStats", False),
        ("monitor", monitor_pb2, "MonitorService", "ReportInstance", False),
        ("monitor", monitor_pb2, "MonitorService", "GetPerformanceSummary", False),
        ("monitor", monitor_pb2, "MonitorService", "GetConcurrencyStats", False),
    ]
    rpcs = {}
    for service, module, service_name, method, streaming in table:
        descriptor = module.DESCRIPTOR.services_by_name[service_name].methods_by_name[method]
        rpcs[method] = Rpc(
            service=service,
            name=method,
            path=f"/{descriptor.containing_service.full_name}/{method}",
            request=message_factory.GetMessageClass(descriptor.input_type),
            response=message_factory.GetMessageClass(descriptor.output_type),
            streaming=streaming,
        )
    return rpcs


RPCS = _rpcs()

# ---------------------------------------------------------------------------------------------
# Generation


def generate(strategy: st.SearchStrategy[Any], count: int, *, fuzz_seed: int = FUZZ_SEED, batch: int = 10) -> list[Any]:
    """At least `count` values drawn by Hypothesis (generate phase only, no shrinking, no database).

    Each example draws a list of `batch` values: Hypothesis costs about half a millisecond per example
    whatever its size, so batching keeps thousands of requests per RPC affordable.
    """
    drawn: list[Any] = []
    round_number = 0
    while len(drawn) < count:

        @seed(fuzz_seed + round_number)
        @settings(
            max_examples=max((count - len(drawn)) // batch, 1) + 1,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )
        @given(st.lists(strategy, min_size=batch, max_size=batch))
        def collect(values: list[Any]) -> None:
            drawn.extend(values)

        before = len(drawn)
        collect()
        round_number += 1
        if len(drawn) == before:  # a tiny search space, exhausted: repeat what there is
            drawn.extend(drawn[: count - len(drawn)] or [])
            if not drawn:
                raise RuntimeError("the strategy produced nothing")
    return drawn


# ---------------------------------------------------------------------------------------------
# Sending


@dataclass
class Outcome:
    """What one probe got back."""

    probe: Probe
    code: grpc.StatusCode
    details: str = ""
    trailing: Any = None
    error: grpc.aio.AioRpcError | None = None
    responses: list[Message] = field(default_factory=list)
    cancelled_by_client: bool = False
    seconds: float = 0.0


async def _call_unary(channel: grpc.aio.Channel, rpc: Rpc, probe: Probe, seconds: float) -> Outcome:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, Message] = channel.unary_unary(
        rpc.path, request_serializer=None, response_deserializer=rpc.response.FromString
    )
    try:
        response = await call(probe.payload, timeout=seconds, metadata=probe.metadata or None)
    except grpc.aio.AioRpcError as error:
        return Outcome(probe, error.code(), error.details() or "", error.trailing_metadata(), error)
    return Outcome(probe, Code.OK, responses=[response])


async def _call_stream(channel: grpc.aio.Channel, rpc: Rpc, probe: Probe, seconds: float) -> Outcome:
    multi: grpc.aio.UnaryStreamMultiCallable[bytes, Message] = channel.unary_stream(
        rpc.path, request_serializer=None, response_deserializer=rpc.response.FromString
    )
    call = multi(probe.payload, timeout=seconds, metadata=probe.metadata or None)
    responses: list[Message] = []
    cancelled = False
    try:
        if probe.cancel_after == 0:
            cancelled = call.cancel()
        else:
            async for response in call:
                responses.append(response)
                if probe.cancel_after is not None and len(responses) >= probe.cancel_after:
                    cancelled = call.cancel()
                    break
        code = await call.code()
        details = await call.details()
        trailing = await call.trailing_metadata()
    except grpc.aio.AioRpcError as error:
        return Outcome(probe, error.code(), error.details() or "", error.trailing_metadata(), error, responses)
    except asyncio.CancelledError:
        if not cancelled:
            raise
        code, details, trailing = Code.CANCELLED, "cancelled by the fuzz client", None
    return Outcome(probe, code, details or "", trailing, None, responses, cancelled_by_client=cancelled)


async def send_all(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    probes: Sequence[Probe],
    *,
    concurrency: int = 50,
    deadline_seconds: float = 15.0,
) -> list[Outcome]:
    """Send every probe, at most `concurrency` in flight, each with a deadline; outcomes in probe order."""
    outcomes: list[Outcome | None] = [None] * len(probes)
    queue: collections.deque[int] = collections.deque(range(len(probes)))
    call = _call_stream if rpc.streaming else _call_unary

    async def worker() -> None:
        while queue:
            index = queue.popleft()
            started = time.perf_counter()
            outcome = await call(channel, rpc, probes[index], deadline_seconds)
            outcome.seconds = time.perf_counter() - started
            outcomes[index] = outcome

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(probes)))))
    return [outcome for outcome in outcomes if outcome is not None]


# ---------------------------------------------------------------------------------------------
# Judging


def decode(rpc: Rpc, payload: bytes) -> Message | None:
    """The request as the server's deserializer sees it, or None if it cannot be parsed."""
    try:
        return rpc.request.FromString(payload)
    except DecodeError:
        return None


@dataclass(frozen=True)
class KnownBug:
    """A product bug this fuzz found: how to recognise its answers and its server log lines."""

    key: str
    summary: str
    matches: Callable[[Rpc, Message | None, Outcome], bool]
    log_matches: Callable[[logging.LogRecord], bool] = lambda record: False


def _exception_text(record: logging.LogRecord) -> str:
    if not record.exc_info or record.exc_info[1] is None:
        return ""
    error = record.exc_info[1]
    return f"{type(error).__name__}: {error}"


# Findings not fixed yet, which the fuzz counts instead of failing on (each with a strict xfail in
# test_fuzz_findings.py). Empty: every finding so far is fixed.
KNOWN_BUGS: dict[str, KnownBug] = {}


def _retry_info(outcome: Outcome) -> bool:
    if outcome.error is None:
        return False
    status = rpc_status.from_call(outcome.error)
    return status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


Oracle = Callable[[Message, Outcome], "str | None"]


@dataclass
class Report:
    """Outcomes of one batch, judged."""

    rpc: Rpc
    outcomes: list[Outcome]
    violations: list[str] = field(default_factory=list)
    known: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    origins: collections.Counter[str] = field(default_factory=collections.Counter)

    def violation_kinds(self) -> dict[str, int]:
        """How many violations of each kind (their first line)."""
        return dict(collections.Counter(v.splitlines()[0] for v in self.violations))

    def first_of_each_kind(self) -> list[str]:
        firsts: dict[str, str] = {}
        for violation in self.violations:
            firsts.setdefault(violation.splitlines()[0], violation)
        return list(firsts.values())

    def summary(self) -> str:
        codes = ", ".join(f"{code}={count}" for code, count in sorted(self.codes.items()))
        known = ", ".join(f"{key}={count}" for key, count in sorted(self.known.items())) or "none"
        origins = ", ".join(f"{key}={count}" for key, count in sorted(self.origins.items()))
        return f"{self.rpc.name}: {len(self.outcomes)} requests ({origins}); {codes}; known bugs hit: {known}"


def _show(payload: bytes, limit: int = 160) -> str:
    shown = repr(payload[:limit])
    return shown + (f"… ({len(payload)} bytes)" if len(payload) > limit else "")


def judge(rpc: Rpc, outcomes: Iterable[Outcome], max_message_bytes: int, oracle: Oracle | None = None) -> Report:
    """Check every outcome: a documented status, never UNKNOWN or our INTERNAL, and the RPC's own oracle."""
    report = Report(rpc, list(outcomes))
    for outcome in report.outcomes:
        report.codes[outcome.code.name] += 1
        report.origins[outcome.probe.origin] += 1
        request = decode(rpc, outcome.probe.payload)
        known = next((bug.key for bug in KNOWN_BUGS.values() if bug.matches(rpc, request, outcome)), None)
        if known is not None:
            report.known[known] += 1
            continue
        problem = _problem(rpc, request, outcome, max_message_bytes)
        oversized = len(outcome.probe.payload) > max_message_bytes
        if problem is None and oracle is not None and request is not None and not oversized:
            problem = oracle(request, outcome)
        if problem is not None:
            shown = _show(outcome.probe.payload)
            described = f"{request!r}"[:300] if request is not None else "<undecodable>"
            report.violations.append(
                f"{rpc.name}: {problem}\n    got {outcome.code.name}: {outcome.details[:300]!r}\n"
                f"    payload {shown}\n    request {described}\n    metadata {outcome.probe.metadata!r}"
            )
    return report


def _problem(rpc: Rpc, request: Message | None, outcome: Outcome, max_message_bytes: int) -> str | None:
    code = outcome.code
    oversized = len(outcome.probe.payload) > max_message_bytes
    if code == Code.CANCELLED:
        return None if outcome.cancelled_by_client else "CANCELLED, but the client did not cancel"
    if oversized:
        if code == Code.RESOURCE_EXHAUSTED and "larger than max" in outcome.details:
            return None
        return f"a {len(outcome.probe.payload)}-byte request (max {max_message_bytes}) was not RESOURCE_EXHAUSTED"
    if code == Code.RESOURCE_EXHAUSTED:
        if "larger than max" in outcome.details or "metadata size" in outcome.details:
            return "RESOURCE_EXHAUSTED from a transport limit for a request within max_message_bytes"
        if not _retry_info(outcome):
            return "RESOURCE_EXHAUSTED without google.rpc.RetryInfo"
        return None
    if code in SESSION_ONLY and rpc.service == "session":
        return None
    if code not in DOCUMENTED:
        return f"{code.name} is not a documented answer"
    if code == Code.INVALID_ARGUMENT and not outcome.details.strip():
        return "INVALID_ARGUMENT without a message"
    if request is None and code == Code.OK:
        return "an undecodable payload was answered OK"
    return None


# ---------------------------------------------------------------------------------------------
# Server logs


class ErrorLog(logging.Handler):
    """Keeps every ERROR record (with its traceback) the servers log while the fuzz runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def mark(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> tuple[list[str], collections.Counter[str]]:
        """Unexplained error records since `mark` (formatted), and counts of known-bug ones."""
        unexplained: list[str] = []
        known: collections.Counter[str] = collections.Counter()
        for record in self.records[mark:]:
            bug = next((b.key for b in KNOWN_BUGS.values() if b.log_matches(record)), None)
            if bug is not None:
                known[bug] += 1
                continue
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            unexplained.append(text)
        return unexplained, known


# ---------------------------------------------------------------------------------------------
# Health


async def health_status(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def create_with_retry(
    stub: session_pb2_grpc.SessionServiceAsyncStub,
    request: session_pb2.CreateDiscussionRequest,
    *,
    budget_seconds: float = 60.0,
) -> session_pb2.Discussion:
    """CreateDiscussion, waiting out RESOURCE_EXHAUSTED (admission) as RetryInfo says."""
    deadline = time.monotonic() + budget_seconds
    while True:
        try:
            return await stub.CreateDiscussion(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
