"""The CLI's discussion commands — discuss (create and watch), status, list, cancel — printed for a terminal.

Every call goes through the client SDK (roundtable_client): its retries, typed errors and resuming streams.
"""

from __future__ import annotations

import sys

from roundtable_client import Client, DiscussionStatus

from services.cli.render import StreamRenderer


async def discuss(client: Client, topic: str, personas: list[str], rounds: int, request_id: str) -> int:
    """Create a discussion and render its live stream; 0 when it completes."""
    created = await client.create(topic, personas=personas, rounds=rounds, request_id=request_id or None)
    print(f"discussion {created.discussion_id}: {', '.join(created.personas)} · {created.rounds} round(s)")
    print(f"topic: {created.topic}\n", flush=True)
    renderer = StreamRenderer(sys.stdout)
    async for event in client.events(created.discussion_id):
        renderer.event(event)
    final = await client.get(created.discussion_id)
    print(f"\ntokens used: {final.usage.total_tokens}; see it again with: roundtable status {final.discussion_id}")
    return 0 if final.status == DiscussionStatus.COMPLETED else 1


async def status(client: Client, discussion_id: str) -> int:
    """Print one discussion's document."""
    doc = await client.get(discussion_id)
    print(f"{doc.discussion_id}  {status_name(doc.status)}  rounds={doc.rounds}  tokens={doc.usage.total_tokens}")
    print(f"topic: {doc.topic}")
    if doc.error:
        print(f"error: {doc.error}")
    for result in sorted(doc.results, key=lambda r: (r.round, r.agent)):
        print(f"\n[round {result.round}] {result.agent}: {result.text or result.error}")
    return 0


async def list_discussions(client: Client, status_filter: str) -> int:
    """Print the caller's discussions, newest first."""
    try:
        wanted = DiscussionStatus[status_filter.upper()] if status_filter else None
    except KeyError:
        names = ", ".join(s.name.lower() for s in DiscussionStatus if s != DiscussionStatus.UNSPECIFIED)
        print(f"error: unknown status {status_filter!r}; one of: {names}", file=sys.stderr)
        return 2
    async for doc in client.list(status=wanted):
        created = doc.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{doc.discussion_id}  {created}  {status_name(doc.status):<11}  {doc.topic[:60]}")
    return 0


async def cancel(client: Client, discussion_id: str) -> int:
    """Cancel a running discussion."""
    doc = await client.cancel(discussion_id)
    print(f"{doc.discussion_id}  {status_name(doc.status)}")
    return 0


def status_name(status: int) -> str:
    """A Discussion's wire status as a word: 3 → COMPLETED."""
    return DiscussionStatus.of(status).name
