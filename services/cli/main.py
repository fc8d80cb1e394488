"""`roundtable`: start the suite (`up`), run a discussion (`discuss`), and inspect discussions."""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from services.cli.launcher import Addresses, start_suite, stop_suite
from services.cli.render import StreamRenderer
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.shared.errors import retry_delay_seconds

DEFAULT_ADDRESS = os.environ.get("ROUNDTABLE_ADDRESS", "127.0.0.1:50051")
DEMO_TOPIC = "人工智能会让大多数工作消失吗？ (Will AI make most jobs disappear?)"


def _session_metadata(discussion_id: str) -> tuple[tuple[str, str], ...]:
    # A load balancer hashes on this to keep a discussion on one replica.
    return (("x-session-id", discussion_id),)


async def discuss(address: str, topic: str, personas: list[str], rounds: int, request_id: str) -> int:
    """Create a discussion and render its live stream; 0 when it completes."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        created = await stub.CreateDiscussion(
            session_pb2.CreateDiscussionRequest(topic=topic, personas=personas, rounds=rounds, request_id=request_id),
            timeout=30,
        )
        print(f"discussion {created.discussion_id}: {', '.join(created.personas)} · {created.rounds} round(s)")
        print(f"topic: {created.topic}\n", flush=True)
        renderer = StreamRenderer(sys.stdout)
        stream = stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id),
            metadata=_session_metadata(created.discussion_id),
        )
        async for event in stream:
            renderer.event(event)
        final = await stub.GetDiscussion(
            session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id),
            metadata=_session_metadata(created.discussion_id),
            timeout=10,
        )
        print(f"\ntokens used: {final.usage.total_tokens}; see it again with: roundtable status {final.discussion_id}")
        return 0 if final.status == session_pb2.DISCUSSION_STATUS_COMPLETED else 1


async def status(address: str, discussion_id: str) -> int:
    """Print one discussion's document."""
    async with grpc.aio.insecure_channel(address) as channel:
        doc = await session_pb2_grpc.SessionServiceStub(channel).GetDiscussion(
            session_pb2.GetDiscussionRequest(discussion_id=discussion_id),
            metadata=_session_metadata(discussion_id),
            timeout=10,
        )
    print(f"{doc.discussion_id}  {_status_name(doc.status)}  rounds={doc.rounds}  tokens={doc.usage.total_tokens}")
    print(f"topic: {doc.topic}")
    if doc.error:
        print(f"error: {doc.error}")
    for result in sorted(doc.results, key=lambda r: (r.round, r.agent)):
        print(f"\n[round {result.round}] {result.agent}: {result.text or result.error}")
    return 0


async def list_discussions(address: str, status_filter: str) -> int:
    """Print the caller's discussions, newest first."""
    wanted = session_pb2.DiscussionStatus.Value(f"DISCUSSION_STATUS_{(status_filter or 'unspecified').upper()}")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListDiscussions(
                session_pb2.ListDiscussionsRequest(page_size=100, page_token=token, status=wanted), timeout=10
            )
            for doc in page.discussions:
                created = doc.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                print(f"{doc.discussion_id}  {created}  {_status_name(doc.status):<11}  {doc.topic[:60]}")
            token = page.next_page_token
            if not token:
                return 0


async def cancel(address: str, discussion_id: str) -> int:
    """Cancel a running discussion."""
    async with grpc.aio.insecure_channel(address) as channel:
        doc = await session_pb2_grpc.SessionServiceStub(channel).CancelDiscussion(
            session_pb2.CancelDiscussionRequest(discussion_id=discussion_id),
            metadata=_session_metadata(discussion_id),
            timeout=10,
        )
    print(f"{doc.discussion_id}  {_status_name(doc.status)}")
    return 0


async def up(args: argparse.Namespace) -> int:
    """Start the suite in the foreground; optionally run a demo discussion; stop all on Ctrl-C/SIGTERM."""
    metrics = tuple(int(p) for p in args.metrics_ports.split(","))
    if len(metrics) != 3:
        raise SystemExit("--metrics-ports needs three ports: session,agents,monitor")
    addresses = Addresses(
        session=f"127.0.0.1:{args.session_port}",
        agents=f"127.0.0.1:{args.agents_port}",
        monitor=f"127.0.0.1:{args.monitor_port}",
        simulator_port=args.simulator_port,
        metrics_ports=(metrics[0], metrics[1], metrics[2]),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log_dir = pathlib.Path(args.log_dir)
    children = await start_suite(addresses, args.llm, args.store, {}, log_dir)
    try:
        print("\nRoundtable is up:")
        for child in children:
            metrics_note = f"  (metrics: http://127.0.0.1:{child.metrics_port}/metrics)" if child.metrics_port else ""
            print(f"  {child.name:<10} {child.address}{metrics_note}")
        print(f"  service logs in {log_dir}/ (e.g. tail -f {children[-1].log_path})")
        if args.llm == "sim":
            print("  LLM backend: the built-in SIMULATOR — answers are synthetic, not written by a model.")
        print(flush=True)
        code = 0
        if args.demo:
            code = await discuss(children[-1].address, args.demo, [], args.rounds, "")
            print("\nThe suite keeps running: try `roundtable list` in another terminal. Ctrl-C stops it.")
        if args.exit_after_demo:
            return code
        await stop.wait()
        return 0
    finally:
        print("stopping…", flush=True)
        await stop_suite(children)


def _status_name(status: int) -> str:
    return session_pb2.DiscussionStatus.Name(status).removeprefix("DISCUSSION_STATUS_")  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="roundtable", description=__doc__)
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="session service host:port (ROUNDTABLE_ADDRESS)")
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("up", help="start every service on loopback in the foreground")
    start.add_argument(
        "--llm", choices=["sim", "openai"], default="sim", help="LLM backend (openai: set ROUNDTABLE_AGENTS_LLM_*)"
    )
    start.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    start.add_argument("--session-port", type=int, default=50051)
    start.add_argument("--agents-port", type=int, default=50052)
    start.add_argument("--monitor-port", type=int, default=50053)
    start.add_argument("--simulator-port", type=int, default=50060)
    start.add_argument("--metrics-ports", default="9101,9102,9103", help="session,agents,monitor")
    start.add_argument("--demo", metavar="TOPIC", nargs="?", const=DEMO_TOPIC, help="run a discussion once up")
    start.add_argument("--rounds", type=int, default=2, help="rounds of the demo discussion")
    start.add_argument("--log-dir", default="var/log", help="where the services' logs go")
    start.add_argument("--exit-after-demo", action="store_true", help="stop the suite when the demo ends")

    run = commands.add_parser("discuss", help="start a discussion and watch it live")
    run.add_argument("topic")
    run.add_argument("--personas", nargs="*", default=[], help="names or aliases; default: the whole roster")
    run.add_argument("--rounds", type=int, default=1)
    run.add_argument("--request-id", default="", help="idempotency key")

    show = commands.add_parser("status", help="show one discussion")
    show.add_argument("discussion_id")
    listing = commands.add_parser("list", help="list discussions, newest first")
    listing.add_argument("--status", default="", help="e.g. running, completed")
    stop = commands.add_parser("cancel", help="cancel a running discussion")
    stop.add_argument("discussion_id")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `roundtable` console script."""
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "up": lambda: up(args),
        "discuss": lambda: discuss(args.address, args.topic, args.personas, args.rounds, args.request_id),
        "status": lambda: status(args.address, args.discussion_id),
        "list": lambda: list_discussions(args.address, args.status),
        "cancel": lambda: cancel(args.address, args.discussion_id),
    }
    try:
        code = asyncio.run(commands[args.command]())
    except grpc.aio.AioRpcError as error:
        hint = ""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            hint = f"\nis the suite running? start it with `roundtable up` (looked for {args.address})"
        delay = retry_delay_seconds(error)
        if delay is not None:
            hint += f"\nretry in {delay:.1f} s"
        print(f"error: {error.code().name}: {error.details()}{hint}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
