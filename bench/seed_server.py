"""Baseline 3, the floor: the seed's design as written — a sync gRPC server, agents on a thread pool,
one global dict under threading.RLock, time.sleep standing in for a blocking LLM call.

The seed (SEED.md) sizes nothing but MAX_CONCURRENT_SESSIONS = 100; this server gives
the agent pool that many threads, which is the most generous reading (fewer threads,
as in ThreadPoolExecutor's default of min(32, cores + 4), would make it slower still).
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from concurrent import futures
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from bench.control import Counters, announce, stats_handler
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc

MAX_CONCURRENT_SESSIONS = 100
GRPC_WORKERS = 10
MODERATOR = "主持人"
ANSWER_WORDS = 60


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(moment.timestamp() * 1e9))
    return stamp


class ThreadSafeDiscussionStore:
    """The seed's store: dicts of plain values under one re-entrant lock."""

    def __init__(self) -> None:
        self._discussions: dict[str, dict[str, Any]] = {}
        self.lock = threading.RLock()

    def create_session(self, session_id: str, topic: str, personas: list[str]) -> None:
        """Insert a new discussion, status processing."""
        with self.lock:
            self._discussions[session_id] = {
                "topic": topic,
                "personas": personas,
                "status": "processing",
                "created_at": datetime.now(),
                "updated_at": datetime.now(),
                "results": {},
                "completed_agents": [],
                "summary": "",
                "last_accessed": datetime.now(),
            }

    def add_result(self, session_id: str, agent: str, text: str) -> int:
        """Record one agent's answer; returns how many agents have answered."""
        with self.lock:
            discussion = self._discussions[session_id]
            discussion["results"][agent] = text
            discussion["completed_agents"].append(agent)
            discussion["updated_at"] = datetime.now()
            return len(discussion["completed_agents"])

    def complete(self, session_id: str, summary: str) -> None:
        """Store the summary and mark the discussion completed."""
        with self.lock:
            discussion = self._discussions[session_id]
            discussion["summary"] = summary
            discussion["status"] = "completed"
            discussion["updated_at"] = datetime.now()

    def get(self, session_id: str) -> dict[str, Any] | None:
        """A copy of the discussion, touching last_accessed."""
        with self.lock:
            discussion = self._discussions.get(session_id)
            if discussion is None:
                return None
            discussion["last_accessed"] = datetime.now()
            return {**discussion, "results": dict(discussion["results"])}

    def with_status(self, status: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Up to `limit` discussions in this status."""
        with self.lock:
            found = [(i, d) for i, d in self._discussions.items() if d["status"] == status]
            return found[:limit]


class SeedSessionServicer(session_pb2_grpc.SessionServiceServicer):
    """The public contract over the seed's store and thread pool."""

    def __init__(self, latency_seconds: float, counters: Counters) -> None:
        self._latency_seconds = latency_seconds
        self._counters = counters
        self._counters_lock = threading.Lock()
        self._store = ThreadSafeDiscussionStore()
        self._agents = futures.ThreadPoolExecutor(max_workers=MAX_CONCURRENT_SESSIONS)
        self._answer = " ".join(["word"] * ANSWER_WORDS)

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, delta in deltas.items():
                setattr(self._counters, name, getattr(self._counters, name) + delta)

    def CreateDiscussion(
        self, request: session_pb2.CreateDiscussionRequest, context: grpc.ServicerContext
    ) -> session_pb2.Discussion:
        """Store the discussion and hand its agents to the pool."""
        session_id = secrets.token_hex(16)
        debaters = list(request.personas)
        self._store.create_session(session_id, request.topic, [*debaters, MODERATOR])
        for name in debaters:
            self._agents.submit(self._agent, session_id, name, len(debaters))
        self._count(created=1, ok=1)
        return self._document(session_id, self._store.get(session_id) or {})

    def GetDiscussion(
        self, request: session_pb2.GetDiscussionRequest, context: grpc.ServicerContext
    ) -> session_pb2.Discussion:
        """The document, built from the dict."""
        discussion = self._store.get(request.discussion_id)
        if discussion is None:
            self._count(errors=1)
            context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        self._count(ok=1)
        return self._document(request.discussion_id, discussion)

    def ListDiscussions(
        self, request: session_pb2.ListDiscussionsRequest, context: grpc.ServicerContext
    ) -> session_pb2.ListDiscussionsResponse:
        """Discussions still processing (RUNNING), or completed."""
        status = "completed" if request.status == session_pb2.DISCUSSION_STATUS_COMPLETED else "processing"
        if request.status == session_pb2.DISCUSSION_STATUS_QUEUED:
            found: list[tuple[str, dict[str, Any]]] = []
        else:
            found = self._store.with_status(status, request.page_size or 50)
        self._count(ok=1)
        return session_pb2.ListDiscussionsResponse(discussions=[self._document(i, d) for i, d in found])

    def _agent(self, session_id: str, name: str, debaters: int) -> None:
        time.sleep(self._latency_seconds)  # the blocking LLM call holds a pool thread
        answered = self._store.add_result(session_id, name, f"{name}: {self._answer}")
        if answered == debaters:
            self._agents.submit(self._moderator, session_id)

    def _moderator(self, session_id: str) -> None:
        time.sleep(self._latency_seconds)
        self._store.add_result(session_id, MODERATOR, f"{MODERATOR}: {self._answer}")
        self._store.complete(session_id, f"{MODERATOR}: {self._answer}")
        self._count(completed=1)

    @staticmethod
    def _document(session_id: str, discussion: dict[str, Any]) -> session_pb2.Discussion:
        doc = session_pb2.Discussion(
            discussion_id=session_id,
            topic=discussion.get("topic", ""),
            status=session_pb2.DISCUSSION_STATUS_COMPLETED
            if discussion.get("status") == "completed"
            else session_pb2.DISCUSSION_STATUS_RUNNING,
            personas=discussion.get("personas", []),
            rounds=1,
            summary=discussion.get("summary", ""),
            completed_agents=discussion.get("completed_agents", []),
        )
        for agent, text in discussion.get("results", {}).items():
            doc.results.add(agent=agent, round=1, text=text, status=discussion_pb2.AGENT_STATUS_COMPLETED)
        if "created_at" in discussion:
            doc.created_at.CopyFrom(_stamp(discussion["created_at"]))
            doc.updated_at.CopyFrom(_stamp(discussion["updated_at"]))
        return doc


def serve(port: int, latency_seconds: float) -> None:
    """Serve until the process is terminated."""
    counters = Counters()
    servicer = SeedSessionServicer(latency_seconds, counters)  # type: ignore[abstract]  # a baseline implements only what the bench calls
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS))
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([stats_handler(counters, servicer._counters_lock)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    announce("seed", bound)
    server.wait_for_termination()


def main() -> None:
    """python -m bench.seed_server --latency-seconds S [--port N]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-seconds", type=float, default=1.0)
    args = parser.parse_args()
    serve(args.port, args.latency_seconds)


if __name__ == "__main__":
    main()
