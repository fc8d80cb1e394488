"""The CLI's calls to the session service: create and watch, status, list, cancel."""

from __future__ import annotations

import os
import pathlib
import sys
from dataclasses import dataclass, field

import grpc

from services.cli.render import StreamRenderer
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.shared.tls import ClientTls, create_channel

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class Connection:
    """Where the session service is, how to reach it (TLS), and who we are (API key)."""

    address: str = DEFAULT_ADDRESS
    tls: ClientTls = field(default_factory=ClientTls)
    api_key: str = ""

    @classmethod
    def from_args(cls, address: str, ca_file: str, cert_file: str, key_file: str, api_key: str) -> Connection:
        """From the command line, with ROUNDTABLE_* environment variables as the defaults."""

        def path(value: str) -> pathlib.Path | None:
            return pathlib.Path(value) if value else None

        return cls(
            address=address,
            tls=ClientTls(
                tls_ca_file=path(ca_file), tls_client_cert_file=path(cert_file), tls_client_key_file=path(key_file)
            ),
            api_key=api_key,
        )

    def channel(self) -> grpc.aio.Channel:
        """A channel to the session service (TLS when a CA file is given)."""
        return create_channel(self.address, self.tls)

    def metadata(self, discussion_id: str = "") -> tuple[tuple[str, str], ...]:
        """Call metadata: the API key, and the session id a load balancer hashes on for affinity."""
        entries: list[tuple[str, str]] = []
        if self.api_key:
            entries.append(("authorization", f"Bearer {self.api_key}"))
        if discussion_id:
            entries.append(("x-session-id", discussion_id))
        return tuple(entries)


def env(name: str, default: str = "") -> str:
    """A ROUNDTABLE_* environment variable, as a command-line default."""
    return os.environ.get(f"ROUNDTABLE_{name}", default)


async def discuss(conn: Connection, topic: str, personas: list[str], rounds: int, request_id: str) -> int:
    """Create a discussion and render its live stream; 0 when it completes."""
    async with conn.channel() as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        created = await stub.CreateDiscussion(
            session_pb2.CreateDiscussionRequest(topic=topic, personas=personas, rounds=rounds, request_id=request_id),
            metadata=conn.metadata(),
            timeout=30,
        )
        print(f"discussion {created.discussion_id}: {', '.join(created.personas)} · {created.rounds} round(s)")
        print(f"topic: {created.topic}\n", flush=True)
        renderer = StreamRenderer(sys.stdout)
        stream = stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id),
            metadata=conn.metadata(created.discussion_id),
        )
        async for event in stream:
            renderer.event(event)
        final = await stub.GetDiscussion(
            session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id),
            metadata=conn.metadata(created.discussion_id),
            timeout=10,
        )
        print(f"\ntokens used: {final.usage.total_tokens}; see it again with: roundtable status {final.discussion_id}")
        return 0 if final.status == session_pb2.DISCUSSION_STATUS_COMPLETED else 1


async def status(conn: Connection, discussion_id: str) -> int:
    """Print one discussion's document."""
    async with conn.channel() as channel:
        doc = await session_pb2_grpc.SessionServiceStub(channel).GetDiscussion(
            session_pb2.GetDiscussionRequest(discussion_id=discussion_id),
            metadata=conn.metadata(discussion_id),
            timeout=10,
        )
    print(f"{doc.discussion_id}  {status_name(doc.status)}  rounds={doc.rounds}  tokens={doc.usage.total_tokens}")
    print(f"topic: {doc.topic}")
    if doc.error:
        print(f"error: {doc.error}")
    for result in sorted(doc.results, key=lambda r: (r.round, r.agent)):
        print(f"\n[round {result.round}] {result.agent}: {result.text or result.error}")
    return 0


async def list_discussions(conn: Connection, status_filter: str) -> int:
    """Print the caller's discussions, newest first."""
    wanted = session_pb2.DiscussionStatus.Value(f"DISCUSSION_STATUS_{(status_filter or 'unspecified').upper()}")
    async with conn.channel() as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListDiscussions(
                session_pb2.ListDiscussionsRequest(page_size=100, page_token=token, status=wanted),
                metadata=conn.metadata(),
                timeout=10,
            )
            for doc in page.discussions:
                created = doc.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                print(f"{doc.discussion_id}  {created}  {status_name(doc.status):<11}  {doc.topic[:60]}")
            token = page.next_page_token
            if not token:
                return 0


async def cancel(conn: Connection, discussion_id: str) -> int:
    """Cancel a running discussion."""
    async with conn.channel() as channel:
        doc = await session_pb2_grpc.SessionServiceStub(channel).CancelDiscussion(
            session_pb2.CancelDiscussionRequest(discussion_id=discussion_id),
            metadata=conn.metadata(discussion_id),
            timeout=10,
        )
    print(f"{doc.discussion_id}  {status_name(doc.status)}")
    return 0


def status_name(status: int) -> str:
    """DISCUSSION_STATUS_COMPLETED → COMPLETED."""
    return session_pb2.DiscussionStatus.Name(status).removeprefix("DISCUSSION_STATUS_")  # type: ignore[arg-type]
