"""py-spy on the suite while it serves a burst: where the session and agent services spend their CPU.

`python -m bench profile` records each service with py-spy (raw collapsed stacks,
idle frames excluded) during one burst, then ranks functions by the samples in
which they are on the stack (inclusive) and on top of it (self), per process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import pathlib
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench import client, h2load, procs
from bench.payloads import grpc_frame
from bench.systems import System, start_system
from services.gen.roundtable.session.v1 import session_pb2

RATE_HZ = 200
# Frames that only say "the event loop ran something": never a hotspot by themselves.
PLUMBING = re.compile(
    r"^(_run_once|run_forever|run_until_complete|_run|run|<module>|main|serve|run_service|_run_module_as_main"
    r"|_run_code|_bootstrap|_bootstrap_inner)(?= )"
)


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (the venv), else on PATH."""
    beside = pathlib.Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass(frozen=True)
class Hotspot:
    """A function and the share of a process's samples it appears in."""

    process: str
    function: str
    inclusive_pct: float
    self_pct: float


def parse_collapsed(text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Inclusive and self sample counts per frame from py-spy's raw (collapsed) output; total samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    return inclusive, own, total


def thread_shares(text: str) -> dict[str, float]:
    """Per cent of a process's samples in each thread, by the thread names py-spy reports (--threads)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack.startswith("thread ") and count_text.isdigit():
            counts[stack.split(";", 1)[0].split(": ", 1)[-1]] += int(count_text)
    total = sum(counts.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in counts.most_common()}


def _short_frame(frame: str) -> str:
    """'func (path/to/services/session/runner.py:123)' → 'func (session/runner.py:123)'."""
    match = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not match:
        return frame
    function, path, line = match.groups()
    parts = pathlib.PurePath(path).parts
    for anchor in ("services", "site-packages", "bench", "lib"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            path = "/".join(parts[index + 1 :])
            break
    return f"{function} ({path}:{line})"


def top(process: str, text: str, count: int = 15) -> list[Hotspot]:
    """The functions most often on the stack (plumbing frames skipped), with their self share."""
    inclusive, own, total = parse_collapsed(text)
    if not total:
        return []
    ranked = [f for f, _ in inclusive.most_common() if not PLUMBING.match(f)]
    return [
        Hotspot(process, f, round(100 * inclusive[f] / total, 1), round(100 * own[f] / total, 1))
        for f in ranked[:count]
    ]


def top_self(process: str, text: str, count: int = 15) -> list[Hotspot]:
    """The functions most often on top of the stack: where the CPU actually is."""
    inclusive, own, total = parse_collapsed(text)
    if not total:
        return []
    return [
        Hotspot(process, f, round(100 * inclusive[f] / total, 1), round(100 * n / total, 1))
        for f, n in own.most_common(count)
    ]


@dataclass(frozen=True)
class Profiled:
    """One profiled load: raw py-spy stacks and CPU seconds per thread, per process; `count` units of work."""

    stacks: dict[str, str]
    thread_cpu: dict[str, dict[str, float]]
    count: int
    seconds: float


async def record_burst(workdir: pathlib.Path, count: int, latency_seconds: float) -> Profiled:
    """Start the suite, attach py-spy to session and agents, run one burst of `count` discussions to the end."""
    system = await start_system("suite", workdir, latency_seconds=latency_seconds)

    async def load() -> int:
        stubs = client.Stubs(system.address)
        try:
            await client.burst(stubs, count, f"profile-{time.time_ns()}")
            await client.wait_all_done(stubs, 900)
        finally:
            await stubs.close()
        return count

    return await _record(system, workdir, load)


async def record_reads(workdir: pathlib.Path, concurrency: int, seconds: float) -> Profiled:
    """Start the suite, finish one discussion, attach py-spy, then GetDiscussion it under h2load."""
    system = await start_system("suite", workdir, latency_seconds=0.05)
    try:
        payload = await client.completed_payload(system.address)
    except BaseException:
        await system.stop()
        raise
    body = workdir / "get.bin"
    body.write_bytes(
        grpc_frame(session_pb2.GetDiscussionRequest(discussion_id=payload.document.discussion_id).SerializeToString())
    )

    async def load() -> int:
        result = await h2load.run(
            f"http://{system.address}/roundtable.session.v1.SessionService/GetDiscussion",
            body,
            clients=concurrency,
            streams_per_client=1,
            warmup_seconds=0.5,
            duration_seconds=seconds,
            log_path=workdir / "h2load-profile.log",
        )
        return result.succeeded

    return await _record(system, workdir, load)


async def _record(system: System, workdir: pathlib.Path, load: Callable[[], Awaitable[int]]) -> Profiled:
    """py-spy on session and agents while `load` runs; stopped and collected whatever happens."""
    executable = py_spy()
    assert system.suite is not None
    recorders: dict[str, tuple[asyncio.subprocess.Process, pathlib.Path]] = {}
    try:
        if executable is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy==0.4.1")
        for proc in (system.suite.session, system.suite.agents):
            out = workdir / f"profile-{proc.name}.txt"
            recorder = await asyncio.create_subprocess_exec(
                executable,
                "record",
                "--pid", str(proc.pid),
                "--rate", str(RATE_HZ),
                "--format", "raw",
                "--nonblocking",
                "--threads",
                "--output", str(out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            recorders[proc.name] = (recorder, out)
        await asyncio.sleep(1.0)  # py-spy attaches
        before = {p.name: procs.thread_cpu_seconds(p.pid) for p in system.suite.services}
        started = time.monotonic()
        count = await load()
        seconds = time.monotonic() - started
        thread_cpu = {
            p.name: _thread_delta(before[p.name], procs.thread_cpu_seconds(p.pid)) for p in system.suite.services
        }
    finally:
        for recorder, _ in recorders.values():
            with contextlib.suppress(ProcessLookupError):
                recorder.send_signal(signal.SIGINT)
        for recorder, _ in recorders.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorder.wait(), 30)
        await system.stop()
    stacks = {name: out.read_text() if out.exists() else "" for name, (_, out) in recorders.items()}
    return Profiled(stacks=stacks, thread_cpu=thread_cpu, count=count, seconds=seconds)


def _thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread between two readings, threads of the same name summed (tids dropped)."""
    out: dict[str, float] = {}
    for key, value in after.items():
        name = key.rsplit("/", 1)[0]
        out[name] = out.get(name, 0.0) + value - before.get(key, 0.0)
    return {name: round(seconds, 3) for name, seconds in sorted(out.items(), key=lambda kv: -kv[1])}
