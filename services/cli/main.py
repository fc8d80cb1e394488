"""`roundtable`: start the suite (`up`), run a discussion (`discuss`), and inspect discussions."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from roundtable_client import DEFAULT_ADDRESS, Client, RoundtableError, Tls, Unavailable

from services.agents import local_model
from services.cli import dashboard, logs, report
from services.cli.commands import cancel, discuss, list_discussions, status
from services.cli.launcher import Addresses, start_suite, stop_suite
from services.cli.replicas import Fleet, FleetOptions, describe

DEMO_TOPIC = "人工智能会让大多数工作消失吗？ (Will AI make most jobs disappear?)"


def _stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _print_backend(names: set[str]) -> None:
    if "local-model" in names:
        print(f"  LLM backend: the local model {local_model.MODEL_NAME} (llama-cpp-python, on this machine)")
    elif "simulator" in names:
        print("  LLM backend: the built-in SIMULATOR — answers are synthetic, not written by a model.")
    else:
        print("  LLM backend: the OpenAI-compatible provider set by ROUNDTABLE_AGENTS_LLM_*")


async def _demo_then_wait(args: argparse.Namespace, session_address: str, stop: asyncio.Event) -> int:
    """Run the demo discussion when asked, then keep running until stopped (or return after the demo)."""
    code = 0
    if args.demo:
        # The suite just started here: plaintext, no key, whatever ROUNDTABLE_* says about other servers.
        async with Client(session_address, api_key="", tls=False) as client:
            code = await discuss(client, args.demo, [], args.rounds, "")
        print("\nThe suite keeps running: try `roundtable list` in another terminal. Ctrl-C stops it.")
    if args.exit_after_demo:
        return code
    await stop.wait()
    return 0


def _replicated(args: argparse.Namespace) -> bool:
    """Whether `up` starts replicas behind Envoy rather than one process of each service."""
    return args.session_replicas > 1 or args.agent_replicas > 1 or args.store == "redis" or bool(args.redis_url)


async def up(args: argparse.Namespace) -> int:
    """Start the suite in the foreground; optionally run a demo discussion; stop all on Ctrl-C/SIGTERM."""
    metrics = tuple(int(p) for p in args.metrics_ports.split(","))
    if len(metrics) != 3:
        raise SystemExit("--metrics-ports needs three ports: session,agents,monitor")
    if _replicated(args):
        return await up_fleet(args, monitor_metrics_port=metrics[2])
    addresses = Addresses(
        session=f"127.0.0.1:{args.session_port}",
        agents=f"127.0.0.1:{args.agents_port}",
        monitor=f"127.0.0.1:{args.monitor_port}",
        simulator_port=args.simulator_port,
        metrics_ports=(metrics[0], metrics[1], metrics[2]),
        local_model_port=args.local_model_port,
    )
    stop = _stop_on_signals()
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
        _print_backend({child.name for child in children})
        print(flush=True)
        return await _demo_then_wait(args, children[-1].address, stop)
    finally:
        print("stopping…", flush=True)
        await stop_suite(children)


async def up_fleet(args: argparse.Namespace, monitor_metrics_port: int) -> int:
    """N session and M agent replicas behind Envoy, state in Redis (`--session-replicas`, `--store redis`)."""
    log_dir = pathlib.Path(args.log_dir)
    try:
        options = FleetOptions(
            session_replicas=args.session_replicas,
            agent_replicas=args.agent_replicas,
            store=args.store,
            redis_url=args.redis_url,
            llm=args.llm,
            max_tokens=args.max_tokens,
            session_port=args.session_port,
            agents_port=args.agents_port,
            envoy_admin_port=args.envoy_admin_port,
            monitor_port=args.monitor_port,
            monitor_metrics_port=monitor_metrics_port,
            simulator_port=args.simulator_port,
            local_model_port=args.local_model_port,
            state_dir=pathlib.Path(args.state_dir),
            log_dir=log_dir,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    try:
        fleet = await Fleet.launch(options)
    except RuntimeError as error:  # something could not start; what started is stopped
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        print(
            f"\nRoundtable is up: {options.session_replicas} session and {options.agent_replicas} agent "
            "replicas behind Envoy, every one healthy:"
        )
        for line in describe(fleet):
            print(line)
        print(f"  service logs in {log_dir}/ (e.g. tail -f {log_dir}/session-1.log)")
        _print_backend({child.name for child in fleet.llm})
        print(flush=True)
        return await _demo_then_wait(args, fleet.session_address, stop)
    finally:
        print("stopping…", flush=True)
        await fleet.stop()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="roundtable", description=__doc__)
    # Unset flags fall back to the ROUNDTABLE_* variables, read by the client SDK (roundtable_client).
    parser.add_argument("--address", help=f"session service host:port (ROUNDTABLE_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--api-key", help="sent as 'authorization: Bearer' (ROUNDTABLE_API_KEY)")
    parser.add_argument("--tls-ca-file", help="trust roots: talk TLS (ROUNDTABLE_TLS_CA_FILE)")
    parser.add_argument("--tls-client-cert-file", help="client certificate (mTLS) (ROUNDTABLE_TLS_CLIENT_CERT_FILE)")
    parser.add_argument("--tls-client-key-file", help="its private key (ROUNDTABLE_TLS_CLIENT_KEY_FILE)")
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=30.0,
        help="longest one call may take, retries of RESOURCE_EXHAUSTED and UNAVAILABLE included",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("up", help="start every service on loopback in the foreground")
    start.add_argument(
        "--llm",
        choices=["auto", "local", "sim", "openai"],
        default="auto",
        help="LLM backend: auto = the local model if installed and answering, else the simulator; "
        "openai: set ROUNDTABLE_AGENTS_LLM_*",
    )
    start.add_argument(
        "--store",
        choices=["sqlite", "memory", "redis"],
        default="sqlite",
        help="redis: state shared by every session replica (needed for more than one)",
    )
    start.add_argument(
        "--session-replicas", type=_positive, default=1, help="session replicas behind Envoy on --session-port"
    )
    start.add_argument(
        "--agent-replicas", type=_positive, default=1, help="agent replicas behind Envoy on --agents-port"
    )
    start.add_argument(
        "--redis-url", default="", help="with --store redis: use this Redis (default: a private redis-server, AOF on)"
    )
    start.add_argument("--envoy-admin-port", type=int, default=9901, help="Envoy's admin interface (loopback)")
    start.add_argument(
        "--state-dir", default="var", help="with replicas: the private Redis's data and Envoy's config go here"
    )
    start.add_argument(
        "--max-tokens", type=int, help="longest answer of one agent (default: 128 on the local model, 60 simulated)"
    )
    start.add_argument("--session-port", type=int, default=50051, help="the session service (Envoy, with replicas)")
    start.add_argument(
        "--agents-port", type=int, default=50052, help="the agent service (Envoy's agents hop, with replicas)"
    )
    start.add_argument("--monitor-port", type=int, default=50053)
    start.add_argument("--simulator-port", type=int, default=50060)
    start.add_argument("--local-model-port", type=int, default=50061)
    start.add_argument(
        "--metrics-ports",
        default="9101,9102,9103",
        help="session,agents,monitor (with replicas only the monitor's: each replica picks a free one)",
    )
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
    for name, about in (
        ("monitor", "live terminal dashboard of the fleet (--address of the monitor; --help for more)"),
        ("report", "Markdown performance report with a chart (--address, --window, --out; --help for more)"),
    ):
        commands.add_parser(name, help=about)  # listed here; main() hands their arguments over whole
    return parser


def _client(args: argparse.Namespace) -> Client:
    """The SDK client the flags describe; what they leave unset comes from ROUNDTABLE_* variables."""
    tls: Tls | None = None
    if (args.tls_client_cert_file or args.tls_client_key_file) and not args.tls_ca_file:
        raise SystemExit("error: a client certificate is only sent over TLS: give --tls-ca-file too")
    if args.tls_ca_file:
        try:
            tls = Tls(
                ca_file=pathlib.Path(args.tls_ca_file),
                cert_file=pathlib.Path(args.tls_client_cert_file) if args.tls_client_cert_file else None,
                key_file=pathlib.Path(args.tls_client_key_file) if args.tls_client_key_file else None,
            )
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    return Client(args.address, api_key=args.api_key, tls=tls, timeout_seconds=args.timeout_seconds)


PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {"monitor": dashboard.main, "report": report.main}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `roundtable` console script."""
    words = sys.argv[1:] if argv is None else argv
    # The monitor's tools have their own command lines (--address is the monitor's there).
    if words and words[0] in PASSTHROUGH:
        raise SystemExit(PASSTHROUGH[words[0]](words[1:]))
    args = build_parser().parse_args(words)
    if args.command == "logs":
        raise SystemExit(logs.run(args))
    # `up` talks to the suite it starts; every other command to the server the flags and variables name.
    client = _client(args) if args.command != "up" else Client(api_key="", tls=False)
    commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "up": lambda: up(args),
        "discuss": lambda: discuss(client, args.topic, args.personas, args.rounds, args.request_id),
        "status": lambda: status(client, args.discussion_id),
        "list": lambda: list_discussions(client, args.status),
        "cancel": lambda: cancel(client, args.discussion_id),
    }

    async def run() -> int:
        async with client:  # opens its channel on first use only: `up` never does
            return await commands[args.command]()

    try:
        code = asyncio.run(run())
    except RoundtableError as error:
        hint = ""
        if isinstance(error, Unavailable):
            hint = f"\nis the suite running? start it with `roundtable up` (looked for {client.address})"
        if error.retry_delay_seconds is not None:
            hint += f"\nretry in {error.retry_delay_seconds:.1f} s"
        print(f"error: {error.code.name}: {error.message}{hint}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
