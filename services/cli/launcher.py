"""`roundtable up`: the services as child processes on loopback, started in order and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pathlib
import signal
import sys
from dataclasses import dataclass

READY_TIMEOUT_SECONDS = 60.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Child:
    """One service process and where it listens."""

    name: str
    process: asyncio.subprocess.Process
    log_path: pathlib.Path
    address: str = ""
    metrics_port: str = ""
    drain: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class Addresses:
    """Where each service of the suite listens."""

    session: str
    agents: str
    monitor: str
    simulator_port: int
    metrics_ports: tuple[int, int, int]


async def _start(name: str, args: list[str], env: dict[str, str], log_dir: pathlib.Path) -> Child:
    """Start a service module, its log going to a file, and wait for its 'listening on' line."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            preexec_fn=_die_with_parent,
        )
    child = Child(name=name, process=process, log_path=log_path)
    assert process.stdout is not None
    async with asyncio.timeout(READY_TIMEOUT_SECONDS):
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{name} exited during start-up (code {await process.wait()}):\n{tail}")
            if " listening on " in line:
                words = line.split()
                child.address = words[words.index("on") + 1]
                if "metrics" in words:
                    child.metrics_port = words[words.index("metrics") + 1]
                break
    # Keep draining stdout so a chatty child never blocks on a full pipe.
    child.drain = asyncio.create_task(_drain(process.stdout), name=f"drain-{name}")
    return child


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `roundtable up` dies, so no service is orphaned."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def start_suite(
    addresses: Addresses, llm: str, store: str, extra_env: dict[str, str], log_dir: pathlib.Path
) -> list[Child]:
    """Start simulator (when chosen), monitor, agents, session; stop what started if one fails."""
    env = {**os.environ, **extra_env}
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any service runs
    children: list[Child] = []
    try:
        llm_env: list[str] = []
        if llm == "sim":
            sim = await _start(
                "simulator", ["services.simulator", "--port", str(addresses.simulator_port)], env, log_dir
            )
            children.append(sim)
            # Simulated answers are filler words: keep them short enough to read.
            llm_env = ["--llm-base-url", sim.address, "--llm-backend", "simulator", "--llm-max-tokens", "60"]
        monitor = await _start(
            "monitor",
            ["services.monitor", "--port", _port(addresses.monitor), "--metrics-port", str(addresses.metrics_ports[2])],
            env,
            log_dir,
        )
        children.append(monitor)
        common = ["--monitor-address", monitor.address]
        agents = await _start(
            "agents",
            [
                "services.agents",
                "--port",
                _port(addresses.agents),
                "--metrics-port",
                str(addresses.metrics_ports[1]),
                *common,
                *llm_env,
            ],
            env,
            log_dir,
        )
        children.append(agents)
        session = await _start(
            "session",
            [
                "services.session",
                "--port",
                _port(addresses.session),
                "--metrics-port",
                str(addresses.metrics_ports[0]),
                "--agents-address",
                agents.address,
                "--store",
                store,
                *common,
            ],
            env,
            log_dir,
        )
        children.append(session)
    except BaseException:
        await stop_suite(children)
        raise
    return children


async def stop_suite(children: list[Child], grace_seconds: float = 15.0) -> None:
    """SIGTERM in reverse start order (clients before servers), then wait; SIGKILL stragglers."""
    for child in reversed(children):
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace_seconds)
            except TimeoutError:
                child.process.kill()
                await child.process.wait()


def _port(address: str) -> str:
    return address.rsplit(":", 1)[1]
