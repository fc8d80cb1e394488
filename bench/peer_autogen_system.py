"""AutoGen's gRPC worker runtime started and driven from the project's interpreter, through its own virtualenv.

bench/peer_autogen.py holds the host, worker and client; they import AutoGen and its older grpcio and
protobuf, so they run only under the peers virtualenv that scripts/install_peers.sh makes (outside
the repo). This module finds that interpreter, starts the host and the worker on the server core
like any bench system, and runs the client as a subprocess beside the load generator.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from dataclasses import dataclass

import grpc

from bench import procs
from bench.systems import System
from services.shared.processes import free_port

INSTALL_COMMAND = "scripts/install_peers.sh"
# Where scripts/install_peers.sh puts the virtualenv unless told otherwise (keep the two in step).
PEERS_VENV_ENV = "ROUNDTABLE_PEERS_VENV"
# A host's or worker's peak of discussions held at once (served by bench/peer_autogen.peak_active_handler).
PEAK_ACTIVE_METHOD = "/bench.Peer/PeakActive"
# The client's own cap on waiting, beyond the run's timeout, before the bench gives up on it.
CLIENT_EXIT_SLACK_SECONDS = 30.0


def peers_venv() -> pathlib.Path:
    """The peers virtualenv: $ROUNDTABLE_PEERS_VENV, else ~/.cache/roundtable/peers-venv (XDG_CACHE_HOME honoured)."""
    configured = os.environ.get(PEERS_VENV_ENV)
    if configured:
        return pathlib.Path(configured)
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return cache / "roundtable" / "peers-venv"


def peers_python() -> str | None:
    """The peers virtualenv's interpreter, or None when it is not installed."""
    python = peers_venv() / "bin" / "python"
    return str(python) if python.exists() else None


def missing_message() -> str:
    """Why the AutoGen row cannot run here, and the command that fixes it."""
    return f"AutoGen's peers virtualenv is not installed at {peers_venv()} (run {INSTALL_COMMAND})"


@dataclass
class AutoGenSystem:
    """A started host and worker: the bench System (counts from the worker), the host's address and its count's."""

    system: System
    host_address: str
    host_count_address: str
    python: str


@dataclass(frozen=True)
class ClientFigures:
    """What the AutoGen client saw: each discussion's publish and done times (wall clock), answers counted."""

    first_sent: float
    sent_wall: dict[str, float]
    done_wall: dict[str, float]
    answers: int
    unexpected_answers: int
    # The client process's own CPU over the run (it shares the load generator's core).
    cpu_seconds: float


async def start_autogen(workdir: pathlib.Path, latency_seconds: float) -> AutoGenSystem:
    """Start the runtime host and the worker with its three panelists, both on the server core."""
    python = peers_python()
    if python is None:
        raise RuntimeError(missing_message())
    # The host does not report the port it bound, so it is chosen here.
    port = free_port()
    routing_address = f"127.0.0.1:{port}"
    # It announces the address of its peak count; agents and clients connect to the port given.
    host = await procs.start(
        "autogen-host", ["bench.peer_autogen", "host", "--port", str(port)], core=procs.SERVER_CORE, cwd=workdir,
        python=python,
    )  # fmt: skip
    try:
        worker_args = ["worker", "--host-address", routing_address, "--latency-seconds", str(latency_seconds)]
        worker = await procs.start(
            "autogen-worker", ["bench.peer_autogen", *worker_args], core=procs.SERVER_CORE, cwd=workdir, python=python
        )
    except BaseException:
        await procs.stop([host], grace_seconds=5)
        raise
    # The worker's address answers /bench.Control/Stats, so System.counts() reads it like a baseline's.
    system = System(name="autogen", address=worker.address, procs=[host, worker])
    return AutoGenSystem(system=system, host_address=routing_address, host_count_address=host.address, python=python)


async def read_peak_active(address: str) -> int:
    """The most discussions the host or worker at `address` held at once (bench/peer_autogen.py: how each counts)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PEAK_ACTIVE_METHOD)
        raw = await call(b"", timeout=30)
    return int(json.loads(raw)["peak_active"])


async def run_client(
    started: AutoGenSystem, count: int, timeout_seconds: float, run_tag: str, mode: str = "publish"
) -> ClientFigures:
    """Run the AutoGen client (it inherits the load generator's core) and read its figures.

    mode: "publish" (a discussion to the panel's topic, answers published back) or "rpc" (send_message to
    each panelist, the answer in the response).
    """
    process = await asyncio.create_subprocess_exec(
        started.python,
        "-m",
        "bench.peer_autogen",
        "client",
        "--host-address",
        started.host_address,
        "--count",
        str(count),
        "--timeout-seconds",
        str(timeout_seconds),
        "--run-tag",
        run_tag,
        "--mode",
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(procs.REPO_ROOT)},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_seconds + CLIENT_EXIT_SLACK_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = stdout.decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"the AutoGen client failed (code {process.returncode}): {stderr.decode()[-2000:]}")
    raw = json.loads(lines[-1])
    return ClientFigures(
        first_sent=float(raw["first_sent"]),
        sent_wall={str(k): float(v) for k, v in raw["sent_wall"].items()},
        done_wall={str(k): float(v) for k, v in raw["done_wall"].items()},
        answers=int(raw["answers"]),
        unexpected_answers=int(raw["unexpected_answers"]),
        cpu_seconds=float(raw["cpu_seconds"]),
    )
