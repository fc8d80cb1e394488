"""Baseline 1, the ceiling for a control-plane RPC: grpc.aio answering SessionService with canned messages.

GetDiscussion returns a fixed document and StreamDiscussion the fixed events, both
taken from a real discussion of the suite, so the bytes on the wire match and the
only difference left is everything the suite does besides answering.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
from collections.abc import AsyncIterator

import grpc

from bench.control import Counters, announce, stats_handler
from bench.payloads import Payload
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc


class EchoSessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Answers reads with the canned document and events; nothing else."""

    def __init__(self, payload: Payload, counters: Counters) -> None:
        self._document = payload.document
        self._events = payload.events
        self._counters = counters

    async def GetDiscussion(
        self, request: session_pb2.GetDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """The canned document."""
        self._counters.ok += 1
        return self._document

    async def StreamDiscussion(
        self, request: session_pb2.StreamDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.DiscussionEvent]:
        """The canned events after after_sequence."""
        for event in self._events:
            if event.sequence > request.after_sequence:
                self._counters.msgs_sent += 1
                yield event
        self._counters.ok += 1


async def serve(port: int, payload_path: pathlib.Path) -> None:
    """Serve until cancelled (SIGTERM ends the process)."""
    counters = Counters()
    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 10_000)])
    # A baseline implements only the methods the bench calls.
    servicer = EchoSessionServicer(Payload.read(payload_path), counters)  # type: ignore[abstract]
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([stats_handler(counters)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    announce("echo", bound)
    await server.wait_for_termination()


def main() -> None:
    """python -m bench.echo_server --payload FILE [--port N]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--payload", type=pathlib.Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.payload))


if __name__ == "__main__":
    main()
