"""`roundtable`: start the suite (`up`), run a discussion (`discuss`), and inspect discussions."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from services.agents import local_model
from services.cli import logs
from services.cli.client import DEFAULT_ADDRESS, Connection, cancel, discuss, env, list_discussions, status
from services.cli.launcher import Addresses, start_suite, stop_suite
from services.shared.errors import retry_delay_seconds

DEMO_TOPIC = "人工智能会让大多数工作消失吗？ (Will AI make most jobs disappear?)"


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
        local_model_port=args.local_model_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log_dir = pathlib.Path(args.log_dir)
    try:
        children = await start_suite(addresses, args.llm, args.store, {}, log_dir, args.max_tokens)
    except RuntimeError as error:  # a service or the local model could not start; what started is stopped
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        print("\nRoundtable is up:")
        for child in children:
            metrics_note = f"  (metrics: http://127.0.0.1:{child.metrics_port}/metrics)" if child.metrics_port else ""
            print(f"  {child.name:<10} {child.address}{metrics_note}")
        print(f"  service logs in {log_dir}/ (e.g. tail -f {children[-1].log_path})")
        names = {child.name for child in children}
        if "local-model" in names:
            print(f"  LLM backend: the local model {local_model.MODEL_NAME} (llama-cpp-python, on this machine)")
        elif "simulator" in names:
            print("  LLM backend: the built-in SIMULATOR — answers are synthetic, not written by a model.")
        else:
            print("  LLM backend: the OpenAI-compatible provider set by ROUNDTABLE_AGENTS_LLM_*")
        print(flush=True)
        code = 0
        if args.demo:
            code = await discuss(Connection(address=children[-1].address), args.demo, [], args.rounds, "")
            print("\nThe suite keeps running: try `roundtable list` in another terminal. Ctrl-C stops it.")
        if args.exit_after_demo:
            return code
        await stop.wait()
        return 0
    finally:
        print("stopping…", flush=True)
        await stop_suite(children)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="roundtable", description=__doc__)
    parser.add_argument(
        "--address", default=env("ADDRESS", DEFAULT_ADDRESS), help="session service host:port (ROUNDTABLE_ADDRESS)"
    )
    parser.add_argument(
        "--api-key", default=env("API_KEY"), help="sent as 'authorization: Bearer' (ROUNDTABLE_API_KEY)"
    )
    parser.add_argument(
        "--tls-ca-file", default=env("TLS_CA_FILE"), help="trust roots: talk TLS (ROUNDTABLE_TLS_CA_FILE)"
    )
    parser.add_argument("--tls-client-cert-file", default=env("TLS_CLIENT_CERT_FILE"), help="client certificate (mTLS)")
    parser.add_argument("--tls-client-key-file", default=env("TLS_CLIENT_KEY_FILE"), help="its private key")
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("up", help="start every service on loopback in the foreground")
    start.add_argument(
        "--llm",
        choices=["auto", "local", "sim", "openai"],
        default="auto",
        help="LLM backend: auto = the local model if installed and answering, else the simulator; "
        "openai: set ROUNDTABLE_AGENTS_LLM_*",
    )
    start.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    start.add_argument(
        "--max-tokens", type=int, help="longest answer of one agent (default: 128 on the local model, 60 simulated)"
    )
    start.add_argument("--session-port", type=int, default=50051)
    start.add_argument("--agents-port", type=int, default=50052)
    start.add_argument("--monitor-port", type=int, default=50053)
    start.add_argument("--simulator-port", type=int, default=50060)
    start.add_argument("--local-model-port", type=int, default=50061)
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
    logs.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `roundtable` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "logs":
        raise SystemExit(logs.run(args))
    conn = Connection.from_args(
        args.address, args.tls_ca_file, args.tls_client_cert_file, args.tls_client_key_file, args.api_key
    )
    commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "up": lambda: up(args),
        "discuss": lambda: discuss(conn, args.topic, args.personas, args.rounds, args.request_id),
        "status": lambda: status(conn, args.discussion_id),
        "list": lambda: list_discussions(conn, args.status),
        "cancel": lambda: cancel(conn, args.discussion_id),
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
