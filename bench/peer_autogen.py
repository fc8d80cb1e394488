"""AutoGen 0.7.5's gRPC worker runtime as a benchmark peer: its host, a worker with three panelists, and the client.

Runs only under the peers virtualenv (scripts/install_peers.sh: autogen-core and autogen-ext[grpc] 0.7.5,
which pin grpcio 1.70 and protobuf 5.29), never the project's; bench/peer_autogen_system.py starts it
from there. The workload is the one every bench server runs: a discussion is three agents, each one
fake LLM call of fixed latency, in parallel. The client publishes a discussion to the panel's topic;
the host routes it to the worker, whose three panelists each sleep, then publish an answer to the
client's topic; the client counts a discussion done at its third answer. This is the AutoGen way a
new user would build it: three long-lived agents (one instance per agent type, key "panel"),
publish/subscribe through the host, JSON payloads, the runtime's defaults otherwise. The client's
other mode, `--mode rpc`, asks each panelist directly instead (send_message: a request and its
response, both through the host), the other way AutoGen's API offers.

    python -m bench.peer_autogen host --port N
    python -m bench.peer_autogen worker --host-address ADDR [--latency-seconds S]
    python -m bench.peer_autogen client --host-address ADDR --count K [--mode publish|rpc] [--timeout-seconds S]

The host and worker print the suite's ready line ("<name> listening on ADDRESS metrics -1"); the
worker's address answers /bench.Control/Stats with its counts (created: discussions received,
completed: discussions whose three answers went out), so a run is validated by the server's side.
Both addresses answer /bench.Peer/PeakActive with the most discussions that process held at once:
the worker's received and not yet answered, the host's routed in and not yet answered back out (the
host listens for agents on the --port given; its announced address is that count's).
The client prints one JSON object: when it published each discussion, when each one's third answer
came, and the answers counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from autogen_core import (
    AgentId,
    MessageContext,
    RoutedAgent,
    TopicId,
    TypeSubscription,
    message_handler,
    try_get_known_serializers_for_type,
)
from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime, GrpcWorkerAgentRuntimeHost

from bench.control import Counters, announce, stats_handler

PANELISTS = ("panelist-0", "panelist-1", "panelist-2")
# Every panelist subscribes to this topic type; the client's collector to the answer topic type.
DISCUSSION_TOPIC = "discussion"
ANSWER_TOPIC = "answer"
# One instance per agent type: the three agents of the workload, long-lived, handling every discussion.
PANEL_KEY = "panel"
COLLECTOR = "collector"
ANSWER_WORDS = 60
# The worker's extra count beside /bench.Control/Stats (bench/peer_autogen_system.PEAK_ACTIVE_METHOD reads it).
PEAK_ACTIVE_SERVICE = "bench.Peer"
PEAK_ACTIVE_NAME = "PeakActive"
# How long the host's server lets calls finish once asked to stop.
STOP_GRACE_SECONDS = 2


@dataclass
class Discussion:
    """What the client publishes: one discussion for the panel, and where its answers go."""

    discussion_id: str
    topic: str
    reply_to: str


@dataclass
class Question:
    """What the client sends each panelist in rpc mode: one discussion, answered in the response."""

    discussion_id: str
    topic: str


@dataclass
class Answer:
    """What each panelist publishes back: its answer to one discussion."""

    discussion_id: str
    agent: str
    text: str


@dataclass
class WorkerTally:
    """The worker's counts (served on /bench.Control/Stats) and the answers still owed per discussion."""

    counters: Counters = field(default_factory=Counters)
    owed_answers: dict[str, int] = field(default_factory=dict)
    # The most discussions the worker held at once (received, not yet answered by all three).
    peak_active: int = 0

    def received(self, discussion_id: str) -> None:
        """A panelist got a discussion: the first of the three counts it as created."""
        if discussion_id not in self.owed_answers:
            self.owed_answers[discussion_id] = len(PANELISTS)
            self.counters.created += 1
            self.peak_active = max(self.peak_active, len(self.owed_answers))

    def answered(self, discussion_id: str) -> None:
        """A panelist published its answer: the last of the three completes the discussion."""
        self.counters.msgs_sent += 1
        self.owed_answers[discussion_id] -= 1
        if not self.owed_answers[discussion_id]:
            del self.owed_answers[discussion_id]
            self.counters.completed += 1


class Panelist(RoutedAgent):
    """One of the three agents: answers every discussion after a fixed latency, the fake LLM call."""

    def __init__(self, name: str, latency_seconds: float, tally: WorkerTally) -> None:
        super().__init__(f"bench panelist {name}")
        self._name = name
        self._latency_seconds = latency_seconds
        self._tally = tally
        self._answer = " ".join(["word"] * ANSWER_WORDS)

    @message_handler
    async def on_discussion(self, message: Discussion, ctx: MessageContext) -> None:
        """Wait the call's latency, then publish the answer to the client's topic."""
        self._tally.received(message.discussion_id)
        await asyncio.sleep(self._latency_seconds)
        answer = Answer(discussion_id=message.discussion_id, agent=self._name, text=f"{self._name}: {self._answer}")
        await self.publish_message(answer, TopicId(ANSWER_TOPIC, source=message.reply_to))
        self._tally.answered(message.discussion_id)

    @message_handler
    async def on_question(self, message: Question, ctx: MessageContext) -> Answer:
        """Wait the call's latency, then answer in the response (rpc mode)."""
        self._tally.received(message.discussion_id)
        await asyncio.sleep(self._latency_seconds)
        self._tally.answered(message.discussion_id)
        return Answer(discussion_id=message.discussion_id, agent=self._name, text=f"{self._name}: {self._answer}")


@dataclass
class ClientTally:
    """What the client saw: when each discussion was published and when each of its answers arrived."""

    sent_wall: dict[str, float] = field(default_factory=dict)
    answers: dict[str, set[str]] = field(default_factory=dict)
    done_wall: dict[str, float] = field(default_factory=dict)
    unexpected_answers: int = 0
    # rpc mode: requests that came back as an error instead of an answer.
    failed_requests: int = 0
    all_done: asyncio.Event = field(default_factory=asyncio.Event)

    def sent(self, discussion_id: str) -> None:
        """Note a discussion as sent now."""
        self.sent_wall[discussion_id] = time.time()
        self.answers[discussion_id] = set()

    def answer(self, message: Answer) -> None:
        """Record one answer; the third distinct one marks the discussion done."""
        agents = self.answers.get(message.discussion_id)
        if agents is None or message.agent in agents:
            self.unexpected_answers += 1
            return
        agents.add(message.agent)
        if len(agents) == len(PANELISTS):
            self.done_wall[message.discussion_id] = time.time()
            if len(self.done_wall) == len(self.sent_wall):
                self.all_done.set()


class Collector(RoutedAgent):
    """The client's agent: receives every answer published to its topic."""

    def __init__(self, tally: ClientTally) -> None:
        super().__init__("bench answer collector")
        self._tally = tally

    @message_handler
    async def on_answer(self, message: Answer, ctx: MessageContext) -> None:
        """Hand the answer to the tally."""
        self._tally.answer(message)


@dataclass
class HostTally:
    """The answers the host still owes clients: what a discussion held by the server is, seen from the router."""

    owed_answers: int = 0
    peak_owed_answers: int = 0

    @property
    def peak_active(self) -> int:
        """The most discussions in the host's hands at once (three answers owed make one discussion)."""
        return -(-self.peak_owed_answers // len(PANELISTS))

    def saw(self, message: Any) -> None:
        """Count one message routed: a discussion (or a question) in owes answers, an answer (or response) out pays."""
        kind = message.WhichOneof("message")
        if kind == "cloudEvent":
            if message.cloudEvent.type == DISCUSSION_TOPIC:
                self.owed_answers += len(PANELISTS)
            elif message.cloudEvent.type == ANSWER_TOPIC:
                self.owed_answers -= 1
        elif kind == "request":
            self.owed_answers += 1
        elif kind == "response":
            self.owed_answers -= 1
        self.peak_owed_answers = max(self.peak_owed_answers, self.owed_answers)


def count_host_traffic(host: GrpcWorkerAgentRuntimeHost, tally: HostTally) -> None:
    """Have the host's servicer count every message it routes (before any worker or client connects)."""
    # The runtime offers no hook on its traffic: this wraps the one method every routed message goes through.
    servicer = host._servicer
    route = servicer._receive_message

    async def counted(client_id: str, message: Any) -> None:
        tally.saw(message)
        await route(client_id, message)

    servicer._receive_message = counted


def peak_active_handler(peak_active: Callable[[], int]) -> grpc.GenericRpcHandler:
    """/bench.Peer/PeakActive: a process's peak of discussions held at once, as JSON {"peak_active": N}."""

    async def behaviour(request: bytes, context: object) -> bytes:
        return json.dumps({"peak_active": peak_active()}).encode()

    method: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(behaviour)
    return grpc.method_handlers_generic_handler(PEAK_ACTIVE_SERVICE, {PEAK_ACTIVE_NAME: method})


async def _until_signalled() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()


async def run_host(port: int) -> None:
    """Serve the runtime host (the message router) on `port` until SIGTERM; announce the port of its peak count."""
    address = f"127.0.0.1:{port}"
    tally = HostTally()
    host = GrpcWorkerAgentRuntimeHost(address=address)
    count_host_traffic(host, tally)
    host.start()
    # start() serves from a background task: ready once a channel to it connects.
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
    stats = grpc.aio.server()
    stats.add_generic_rpc_handlers([peak_active_handler(lambda: tally.peak_active)])
    stats_port = stats.add_insecure_port("127.0.0.1:0")
    await stats.start()
    announce("autogen-host", stats_port)
    await _until_signalled()
    await stats.stop(grace=None)
    await host.stop(grace=STOP_GRACE_SECONDS)


async def run_worker(host_address: str, latency_seconds: float) -> None:
    """Connect the worker runtime to the host with the three panelists; serve its counts until SIGTERM."""
    tally = WorkerTally()
    runtime = GrpcWorkerAgentRuntime(host_address=host_address)
    await runtime.start()
    runtime.add_message_serializer(try_get_known_serializers_for_type(Answer))
    for name in PANELISTS:

        def build(name: str = name) -> Panelist:
            return Panelist(name, latency_seconds, tally)

        await Panelist.register(runtime, name, build)
        await runtime.add_subscription(TypeSubscription(topic_type=DISCUSSION_TOPIC, agent_type=name))
    # The counts on a port of their own: the runtime's server is the host's, not ours to extend.
    stats = grpc.aio.server()
    stats.add_generic_rpc_handlers([stats_handler(tally.counters), peak_active_handler(lambda: tally.peak_active)])
    stats_port = stats.add_insecure_port("127.0.0.1:0")
    await stats.start()
    announce("autogen-worker", stats_port)
    await _until_signalled()
    await stats.stop(grace=None)
    with contextlib.suppress(Exception):  # the host may already be gone; the process ends either way
        await runtime.stop()


async def run_client(
    host_address: str, count: int, timeout_seconds: float, run_tag: str, mode: str = "publish"
) -> dict[str, object]:
    """Send `count` discussions at once, wait for every answer (or the timeout); what was sent and when it ended."""
    tally = ClientTally()
    cpu_started = time.process_time()
    runtime = GrpcWorkerAgentRuntime(host_address=host_address)
    await runtime.start()
    for message_type in (Discussion, Question, Answer):
        runtime.add_message_serializer(try_get_known_serializers_for_type(message_type))
    if mode == "publish":
        await Collector.register(runtime, COLLECTOR, lambda: Collector(tally))
        await runtime.add_subscription(TypeSubscription(topic_type=ANSWER_TOPIC, agent_type=COLLECTOR))
    first_sent = time.time()
    asked: list[asyncio.Task[None]] = []
    for index in range(count):
        discussion_id = f"{run_tag}-{index}"
        tally.sent(discussion_id)
        if mode == "publish":
            # Fire and forget: the runtime queues the event for the host and returns; nothing acknowledges it.
            await runtime.publish_message(
                Discussion(discussion_id=discussion_id, topic=f"bench topic #{index}", reply_to=COLLECTOR),
                TopicId(DISCUSSION_TOPIC, source=PANEL_KEY),
                sender=AgentId(COLLECTOR, COLLECTOR),
            )
        else:
            asked.append(asyncio.create_task(_ask_panel(runtime, tally, Question(discussion_id, f"bench #{index}"))))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.all_done.wait(), timeout_seconds)
    for task in asked:
        task.cancel()
    # The client shares the load generator's core: its CPU says whether it, not the server, set the pace.
    cpu_seconds = time.process_time() - cpu_started
    with contextlib.suppress(Exception):  # the figures are taken; a stop that stumbles changes none of them
        await runtime.stop()
    return {
        "first_sent": first_sent,
        "sent_wall": tally.sent_wall,
        "done_wall": tally.done_wall,
        "answers": sum(len(a) for a in tally.answers.values()),
        "unexpected_answers": tally.unexpected_answers + tally.failed_requests,
        "cpu_seconds": cpu_seconds,
    }


async def _ask_panel(runtime: GrpcWorkerAgentRuntime, tally: ClientTally, question: Question) -> None:
    """rpc mode: ask the three panelists at once; each response is one answer."""
    replies = await asyncio.gather(
        *(runtime.send_message(question, AgentId(name, PANEL_KEY)) for name in PANELISTS), return_exceptions=True
    )
    for reply in replies:
        if isinstance(reply, Answer):
            tally.answer(reply)
        else:
            tally.failed_requests += 1


def main(argv: list[str] | None = None) -> int:
    """Parse the role and run it."""
    parser = argparse.ArgumentParser(prog="python -m bench.peer_autogen", description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    host = roles.add_parser("host", help="the runtime host (message router)")
    host.add_argument("--port", type=int, required=True)
    worker = roles.add_parser("worker", help="the worker runtime with the three panelists")
    worker.add_argument("--host-address", required=True)
    worker.add_argument("--latency-seconds", type=float, default=1.0)
    client = roles.add_parser("client", help="publish discussions, wait for their answers, print JSON")
    client.add_argument("--host-address", required=True)
    client.add_argument("--count", type=int, required=True)
    client.add_argument("--mode", choices=("publish", "rpc"), default="publish")
    client.add_argument("--timeout-seconds", type=float, default=600.0)
    client.add_argument("--run-tag", default=f"autogen-{time.time_ns()}")
    args = parser.parse_args(argv)
    if args.role == "host":
        asyncio.run(run_host(args.port))
    elif args.role == "worker":
        asyncio.run(run_worker(args.host_address, args.latency_seconds))
    else:
        figures = asyncio.run(run_client(args.host_address, args.count, args.timeout_seconds, args.run_tag, args.mode))
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
