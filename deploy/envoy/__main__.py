"""Render Envoy's config: `python -m deploy.envoy local --session-ports 50061,50062 --agent-ports 50071,50072`
or `python -m deploy.envoy kubernetes --namespace roundtable`; JSON on stdout or to --output."""

from __future__ import annotations

import argparse
import pathlib
import sys

from deploy.envoy.config import kubernetes_topology, local_topology, to_json, validate_config, write_config


def _ports(text: str) -> list[int]:
    try:
        ports = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ports, got {text!r}") from None
    if not ports:
        raise argparse.ArgumentTypeError("at least one port")
    return ports


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, render, optionally validate with the envoy binary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    local = modes.add_parser("local", help="replicas on loopback ports (roundtable up)")
    local.add_argument("--session-ports", type=_ports, required=True, help="ports of the session replicas")
    local.add_argument("--agent-ports", type=_ports, required=True, help="ports of the agent replicas")
    local.add_argument("--session-listen-port", type=int, default=50051, help="where clients connect")
    local.add_argument("--agents-listen-port", type=int, default=50052, help="where session replicas connect")
    local.add_argument("--admin-port", type=int, default=9901)
    kube = modes.add_parser("kubernetes", help="replicas behind headless Services (STRICT_DNS)")
    kube.add_argument("--namespace", required=True)
    for sub in (local, kube):
        sub.add_argument("--output", "-o", type=pathlib.Path, help="write here (.json) instead of stdout")
        sub.add_argument("--validate", action="store_true", help="check the written file with envoy --mode validate")
    args = parser.parse_args(argv)

    if args.mode == "local":
        topology = local_topology(
            args.session_ports,
            args.agent_ports,
            session_listen_port=args.session_listen_port,
            agents_listen_port=args.agents_listen_port,
            admin_port=args.admin_port,
        )
    else:
        topology = kubernetes_topology(args.namespace)
    if args.output is None:
        if args.validate:
            parser.error("--validate needs --output")
        sys.stdout.write(to_json(topology))
        return 0
    write_config(topology, args.output)
    if args.validate:
        try:
            validate_config(args.output)
        except (FileNotFoundError, ValueError) as error:
            print(error, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
