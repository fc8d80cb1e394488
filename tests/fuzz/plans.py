"""What to throw at each RPC, and the generation of those probes, runnable in a separate process.

Hypothesis takes about 40 s of CPU to draw the ~30,000 probes of a run. Drawn in a spawned
process (on the machine's other core) while the test process sends the previous RPC's batch,
it costs almost no wall time; if a process cannot be started, the probes are drawn in-process.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import multiprocessing
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.fuzz import strategies as S
from tests.fuzz.harness import FUZZ_SEED, RPCS, Rpc, generate
from tests.fuzz.strategies import Probe

STRUCTURED_PER_RPC = 2_000
RAW_PER_RPC = 300
CONCURRENCY = 50

# Stand-ins for real discussion ids: exactly 32 characters, so substituting the ids of discussions
# created just before sending keeps every length prefix of the serialized (or corrupted) payload right.
PLACEHOLDERS = [f"<<real-discussion-id-{n:02d}>>".ljust(32, "~") for n in range(12)]
assert all(len(p) == 32 for p in PLACEHOLDERS)
_PLACEHOLDER_MARK = b"<<real-discussion-id-"


@dataclass(frozen=True)
class Plan:
    """How to fuzz one RPC."""

    structured: st.SearchStrategy[Message] | None  # None: a request without fields
    # Discussions to create just before sending: (quick ones run to the end, long ones left running).
    pool: tuple[int, int] = (0, 0)
    concurrency: int = CONCURRENCY
    timeout: float = 20.0
    max_events: int = 4


PLANS: dict[str, Plan] = {
    "CreateDiscussion": Plan(S.create_discussion),
    "GetDiscussion": Plan(S.get_discussion(PLACEHOLDERS), pool=(4, 8)),
    "StreamDiscussion": Plan(S.stream_discussion(PLACEHOLDERS), pool=(4, 8), timeout=30.0, max_events=30),
    "CancelDiscussion": Plan(S.cancel_discussion(PLACEHOLDERS), pool=(4, 8)),
    "ListDiscussions": Plan(S.list_discussions),
    "DeleteDiscussion": Plan(S.delete_discussion(PLACEHOLDERS), pool=(4, 8)),
    "ListPersonas": Plan(None),
    # Valid runs are real discussions on the simulator: fewer at once, and many are cut short.
    "RunDiscussion": Plan(S.run_discussion, concurrency=20, timeout=10.0, max_events=6),
    "ReleaseSession": Plan(S.release_session(PLACEHOLDERS), pool=(0, 8)),
    "GetAgentStats": Plan(S.get_agent_stats(PLACEHOLDERS), pool=(0, 8)),
    "ReportInstance": Plan(S.instance_report),
    "GetPerformanceSummary": Plan(S.get_performance_summary),
    "GetConcurrencyStats": Plan(None),
}
assert set(PLANS) == set(RPCS)


_hypothesis_home: str | None = None


def _keep_hypothesis_files_out_of_the_repository() -> None:
    """Hypothesis caches (constants, unicode data) under ./.hypothesis; this run's go to a temporary one."""
    global _hypothesis_home
    if _hypothesis_home is None:
        _hypothesis_home = tempfile.mkdtemp(prefix="roundtable-fuzz-hypothesis-")
        atexit.register(shutil.rmtree, _hypothesis_home, True)
        set_hypothesis_home_dir(_hypothesis_home)


def build_probes(name: str, fuzz_seed: int) -> list[Probe]:
    """At least STRUCTURED_PER_RPC structured and RAW_PER_RPC raw probes for one RPC."""
    _keep_hypothesis_files_out_of_the_repository()
    rpc, plan = RPCS[name], PLANS[name]
    salt = fuzz_seed + list(RPCS).index(name) * 1_000
    structured_strategy = plan.structured if plan.structured is not None else st.just(rpc.request())
    if plan.structured is None:
        structured = generate(S.empty_message_probes(rpc.request), STRUCTURED_PER_RPC, fuzz_seed=salt)
    else:
        probes = S.structured_probes(plan.structured, streaming=rpc.streaming, max_events=plan.max_events)
        structured = generate(probes, STRUCTURED_PER_RPC, fuzz_seed=salt)
    raw = generate(
        S.raw_probes(rpc.request, structured_strategy, streaming=rpc.streaming), RAW_PER_RPC, fuzz_seed=salt + 500
    )
    return structured + raw


def oversized_probes(rpc: Rpc, max_message_bytes: int) -> list[Probe]:
    """Two requests past max_message_bytes: a decodable one (one huge field) and random bytes."""
    strings = [f.number for f in rpc.request.DESCRIPTOR.fields if f.type == f.TYPE_STRING]
    field_number = strings[0] if strings else 99
    huge_field = S.length_delimited(field_number, b"x" * (max_message_bytes + 1024))
    noise = random.Random(FUZZ_SEED).randbytes(max_message_bytes + 1)
    return [Probe(huge_field, origin="oversized"), Probe(noise, origin="oversized")]


def substitute(probes: list[Probe], ids: list[str]) -> list[Probe]:
    """Put real discussion ids where the strategies drew placeholders."""
    if not ids:
        return probes
    pairs = [(p.encode(), ids[n % len(ids)].encode()) for n, p in enumerate(PLACEHOLDERS)]
    out = []
    for probe in probes:
        payload = probe.payload
        if _PLACEHOLDER_MARK in payload:
            for placeholder, real in pairs:
                payload = payload.replace(placeholder, real)
            probe = Probe(payload, probe.metadata, probe.cancel_after, probe.origin)
        out.append(probe)
    return out


class ProbeSource:
    """Probes of every RPC, drawn ahead in another process in the order the tests ask for them."""

    def __init__(self, names: list[str], fuzz_seed: int) -> None:
        self._seed = fuzz_seed
        self._futures: dict[str, concurrent.futures.Future[list[Probe]]] = {}
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        try:
            # spawn, not fork: this process runs gRPC threads, which fork must not copy.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
            for name in names:
                self._futures[name] = self._executor.submit(build_probes, name, fuzz_seed)
        except (OSError, RuntimeError):
            self.close()

    async def probes(self, name: str) -> list[Probe]:
        future = self._futures.pop(name, None)
        if future is not None:
            try:
                return await asyncio.wrap_future(future)
            except concurrent.futures.process.BrokenProcessPool:
                pass
        return build_probes(name, self._seed)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


@contextmanager
def probe_source(names: list[str], fuzz_seed: int = FUZZ_SEED) -> Iterator[ProbeSource]:
    source = ProbeSource(names, fuzz_seed)
    try:
        yield source
    finally:
        source.close()
