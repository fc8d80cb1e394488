"""Baseline 2, the ceiling for discussions: grpc.aio, a dict, one task per agent, asyncio.sleep as the LLM.

It speaks the public SessionService contract (Create, Get, Stream, List) so the same
client drives it and the suite; it keeps every document in memory, records the same
kinds of events, and has no store, admission, metrics or logging.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import timestamp_pb2

from bench.control import Counters, announce, stats_handler
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc

MODERATOR = "主持人"
ANSWER_WORDS = 60


@dataclass
class Live:
    """A discussion's document, its events and a wake-up for streams."""

    doc: session_pb2.Discussion
    events: list[session_pb2.DiscussionEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class MinimalSessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Runs discussions with asyncio.sleep standing in for every LLM call."""

    def __init__(
        self, latency_seconds: float, counters: Counters, summary_latency_seconds: float | None = None
    ) -> None:
        self._latency_seconds = latency_seconds
        self._summary_latency_seconds = latency_seconds if summary_latency_seconds is None else summary_latency_seconds
        self._counters = counters
        self._discussions: dict[str, Live] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._answer = " ".join(["word"] * ANSWER_WORDS)

    async def CreateDiscussion(
        self, request: session_pb2.CreateDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """Store the document and start its task."""
        now = _now()
        doc = session_pb2.Discussion(
            discussion_id=secrets.token_hex(16),
            topic=request.topic,
            status=session_pb2.DISCUSSION_STATUS_RUNNING,
            personas=[*request.personas, MODERATOR],
            rounds=max(request.rounds, 1),
            created_at=now,
            updated_at=now,
            request_id=request.request_id,
        )
        live = Live(doc=doc)
        self._discussions[doc.discussion_id] = live
        task = asyncio.create_task(self._run(live))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._counters.created += 1
        self._counters.ok += 1
        return doc

    async def GetDiscussion(
        self, request: session_pb2.GetDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """The document as it stands."""
        live = self._discussions.get(request.discussion_id)
        if live is None:
            self._counters.errors += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        self._counters.ok += 1
        return live.doc

    async def StreamDiscussion(
        self, request: session_pb2.StreamDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.DiscussionEvent]:
        """Replay, then follow until the discussion ends."""
        live = self._discussions.get(request.discussion_id)
        if live is None:
            self._counters.errors += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        sent = request.after_sequence
        while True:
            for event in live.events[sent:]:
                sent = event.sequence
                self._counters.msgs_sent += 1
                yield event
            if _terminal(live.doc.status) and sent >= len(live.events):
                break
            await live.changed.wait()
        self._counters.ok += 1

    async def ListDiscussions(
        self, request: session_pb2.ListDiscussionsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ListDiscussionsResponse:
        """One page of documents with the status asked for (the runner only asks whether any is left)."""
        size = request.page_size or 50
        found: list[session_pb2.Discussion] = []
        for live in self._discussions.values():
            if request.status in (0, live.doc.status):
                copy = session_pb2.Discussion()
                copy.CopyFrom(live.doc)
                del copy.results[:]
                found.append(copy)
                if len(found) >= size:
                    break
        self._counters.ok += 1
        return session_pb2.ListDiscussionsResponse(discussions=found)

    async def _run(self, live: Live) -> None:
        doc = live.doc
        self._record(live, status_changed=session_pb2.StatusChanged(status=doc.status))
        debaters = [p for p in doc.personas if p != MODERATOR]
        await asyncio.gather(*(asyncio.create_task(self._agent(live, name, 1)) for name in debaters))
        self._record(live, round_completed=discussion_pb2.RoundCompleted(round=1, completed_agents=len(debaters)))
        summary = await self._agent(live, MODERATOR, doc.rounds + 1)
        doc.summary = summary
        doc.status = session_pb2.DISCUSSION_STATUS_COMPLETED
        self._record(live, status_changed=session_pb2.StatusChanged(status=doc.status))
        self._counters.completed += 1

    async def _agent(self, live: Live, name: str, round_number: int) -> str:
        self._record(live, agent_started=discussion_pb2.AgentStarted(agent=name, round=round_number))
        await asyncio.sleep(self._summary_latency_seconds if name == MODERATOR else self._latency_seconds)
        text = f"{name}: {self._answer}"
        live.doc.results.add(agent=name, round=round_number, text=text, status=discussion_pb2.AGENT_STATUS_COMPLETED)
        live.doc.completed_agents.append(name)
        self._record(live, agent_completed=discussion_pb2.AgentCompleted(agent=name, round=round_number, text=text))
        return text

    def _record(self, live: Live, **payload: object) -> None:
        event = session_pb2.DiscussionEvent(
            discussion_id=live.doc.discussion_id,
            sequence=len(live.events) + 1,
            time=_now(),
            **payload,  # type: ignore[arg-type]
        )
        live.events.append(event)
        live.doc.last_sequence = event.sequence
        live.doc.updated_at.CopyFrom(event.time)
        live.changed.set()
        live.changed = asyncio.Event()


def _terminal(status: int) -> bool:
    return status >= session_pb2.DISCUSSION_STATUS_COMPLETED


async def serve(port: int, latency_seconds: float, summary_latency_seconds: float | None) -> None:
    """Serve until the process is terminated."""
    counters = Counters()
    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 10_000)])
    servicer = MinimalSessionServicer(latency_seconds, counters, summary_latency_seconds)  # type: ignore[abstract]  # a baseline implements only what the bench calls
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([stats_handler(counters)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    announce("minimal", bound)
    await server.wait_for_termination()


def main() -> None:
    """python -m bench.minimal_server --latency-seconds S [--port N]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-seconds", type=float, default=1.0)
    parser.add_argument("--summary-latency-seconds", type=float, default=None)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.latency_seconds, args.summary_latency_seconds))


if __name__ == "__main__":
    main()
