"""A real SIGTERM to a session service process mid-discussion, then a restart: nothing lost, nothing stuck."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
REPO = pathlib.Path(__file__).resolve().parents[2]


class SessionProcess:
    """`python -m services.session` as its own process, as a container would run it."""

    def __init__(self, process: asyncio.subprocess.Process, address: str) -> None:
        self.process = process
        self.address = address

    @classmethod
    async def start(cls, tmp_path: pathlib.Path, agents_address: str, *flags: str) -> SessionProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.session",
            "--port", "0",
            "--metrics-port", "-1",
            "--agents-address", agents_address,
            "--sqlite-path", str(tmp_path / "sessions.db"),
            "--shutdown-grace-seconds", "0.5",
            *flags,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert " listening on " in line, line
        return cls(process, line.split()[3])

    async def sigterm(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await self.process.wait()


@pytest.fixture
async def processes() -> AsyncIterator[list[SessionProcess]]:
    started: list[SessionProcess] = []
    yield started
    for running in started:
        if running.process.returncode is None:
            running.process.kill()
            await running.process.wait()


@pytest.mark.parametrize("resume", [True, False])
async def test_sigterm_during_twenty_discussions_then_restart(
    make_suite: MakeSuite, tmp_path: pathlib.Path, processes: list[SessionProcess], resume: bool
) -> None:
    # Slow enough that all 20 are mid-flight at the SIGTERM, with round 1 done for some.
    suite = await make_suite(simulator={"first_token_latency_ms": 600})
    flags = ("--resume-interrupted", "true" if resume else "false")
    first = await SessionProcess.start(tmp_path, suite.agents_host.address, *flags)
    processes.append(first)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        created = await asyncio.gather(
            *(
                stub.CreateDiscussion(
                    session_pb2.CreateDiscussionRequest(
                        topic=f"restart {i}", personas=["engineer", "scientist"], rounds=2
                    )
                )
                for i in range(20)
            )
        )
        await asyncio.sleep(1.0)
    assert await first.sigterm() == 0

    second = await SessionProcess.start(tmp_path, suite.agents_host.address, *flags)
    processes.append(second)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        expected = session_pb2.DISCUSSION_STATUS_COMPLETED if resume else session_pb2.DISCUSSION_STATUS_INTERRUPTED
        for doc in created:
            request = session_pb2.StreamDiscussionRequest(discussion_id=doc.discussion_id)
            async with asyncio.timeout(30):
                events = [e async for e in stub.StreamDiscussion(request)]
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
            assert final.status == expected, final.error
            if resume:
                assert {(r.agent, r.round) for r in final.results} >= {
                    ("工程师", 1), ("科学家", 1), ("工程师", 2), ("科学家", 2), ("主持人", 3)
                }  # fmt: skip
                assert final.summary
        listed = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(page_size=100))
        assert {d.discussion_id for d in created} <= {d.discussion_id for d in listed.discussions}
        assert all(d.status == expected for d in listed.discussions)
    assert await second.sigterm() == 0


async def test_the_same_request_id_gives_one_discussion_across_a_restart(
    make_suite: MakeSuite, tmp_path: pathlib.Path, processes: list[SessionProcess]
) -> None:
    suite = await make_suite()
    request = session_pb2.CreateDiscussionRequest(topic="once", personas=["engineer"], request_id="client-7")
    ids = []
    for _ in range(2):
        process = await SessionProcess.start(tmp_path, suite.agents_host.address)
        processes.append(process)
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            ids += [(await stub.CreateDiscussion(request)).discussion_id for _ in range(2)]
        assert await process.sigterm() == 0
    assert len(set(ids)) == 1
