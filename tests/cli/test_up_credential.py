"""`roundtable up` hands the service credential from its environment to every process it starts."""

from __future__ import annotations

import pathlib

import grpc

from services.cli.launcher import Addresses, start_suite, stop_suite
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.shared.service_auth import INTERNAL_TOKEN_ENV

TOKEN = "a-token-for-the-local-fleet"


async def test_processes_started_with_a_credential_require_it_and_use_it(
    tmp_path: pathlib.Path, free_addresses: Addresses
) -> None:
    addresses = free_addresses
    children = await start_suite(addresses, "sim", "memory", {INTERNAL_TOKEN_ENV: TOKEN}, tmp_path / "log")
    try:
        credential = (("authorization", f"Bearer {TOKEN}"),)
        async with grpc.aio.insecure_channel(addresses.agents) as channel:
            stub = agents_pb2_grpc.AgentServiceStub(channel)
            try:
                await stub.ListPersonas(agents_pb2.ListPersonasRequest(), timeout=10)
                raise AssertionError("the agent service answered a caller without the credential")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.ListPersonas(agents_pb2.ListPersonasRequest(), metadata=credential, timeout=10)
        async with grpc.aio.insecure_channel(addresses.monitor) as channel:
            request = monitor_pb2.GetConcurrencyStatsRequest()
            try:
                await monitor_pb2_grpc.MonitorServiceStub(channel).GetConcurrencyStats(request, timeout=10)
                raise AssertionError("the monitor answered a caller without the credential")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        # The session service (public: no credential asked of its callers) reaches the agents with it.
        async with grpc.aio.insecure_channel(addresses.session) as channel:
            stub_session = session_pb2_grpc.SessionServiceStub(channel)
            created = await stub_session.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic="Locks on doors?", personas=["scientist"], rounds=1),
                timeout=10,
            )
            events = stub_session.StreamDiscussion(
                session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id), timeout=60
            )
            _ = [event async for event in events]
            final = await stub_session.GetDiscussion(
                session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id), timeout=10
            )
            assert (final.status, final.error) == (session_pb2.DISCUSSION_STATUS_COMPLETED, "")
    finally:
        await stop_suite(children)
