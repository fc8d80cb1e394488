"""A real gRPC server in front of the agent service, for tests that watch or break what the session service sends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc


class ForwardingAgentService(agents_pb2_grpc.AgentServiceServicer):
    """Forwards every call to the real agent service; subclasses override the calls they watch or break."""

    def __init__(self, upstream: agents_pb2_grpc.AgentServiceAsyncStub) -> None:
        self._upstream = upstream

    async def ListPersonas(
        self, request: agents_pb2.ListPersonasRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ListPersonasResponse:
        """Forwarded."""
        return await self._upstream.ListPersonas(request)

    async def ReleaseSession(
        self, request: agents_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ReleaseSessionResponse:
        """Forwarded."""
        return await self._upstream.ReleaseSession(request)

    async def GetAgentStats(
        self, request: agents_pb2.GetAgentStatsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.AgentStats:
        """Forwarded."""
        return await self._upstream.GetAgentStats(request)

    async def RunDiscussion(
        self, request: agents_pb2.RunDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agents_pb2.AgentEvent]:
        """Forwarded."""
        async for event in self._upstream.RunDiscussion(request):
            yield event

    async def RunLane(
        self, requests: AsyncIterator[agents_pb2.RunLaneRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agents_pb2.RunLaneResponse]:
        """Forwarded."""
        async for response in self._upstream.RunLane(requests):
            yield response


async def serve(proxy: ForwardingAgentService) -> tuple[grpc.aio.Server, str]:
    """Start a server for the proxy on a free loopback port: the server and its address."""
    server = grpc.aio.server()
    agents_pb2_grpc.add_AgentServiceServicer_to_server(proxy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
