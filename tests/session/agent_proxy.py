"""A real gRPC server in front of the agent service, for tests that watch or break what the session service sends."""

from __future__ import annotations

import grpc

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc


class ForwardingAgentService(agents_pb2_grpc.AgentServiceServicer):
    """Forwards personas and releases to the real agent service; subclasses add the calls they watch."""

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


async def serve(proxy: ForwardingAgentService) -> tuple[grpc.aio.Server, str]:
    """Start a server for the proxy on a free loopback port: the server and its address."""
    server = grpc.aio.server()
    agents_pb2_grpc.add_AgentServiceServicer_to_server(proxy, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
