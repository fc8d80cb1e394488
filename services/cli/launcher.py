"""`roundtable up`: the services as child processes on loopback, started in order and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from services.agents import local_model
from services.cli.child import guarded

READY_TIMEOUT_SECONDS = 60.0
# Longest answer of one agent unless --max-tokens says otherwise. A 135M model on a couple of cores:
# long enough to say something, short enough to watch live. Simulated filler: short enough to read.
LOCAL_MAX_TOKENS = 128
SIMULATOR_MAX_TOKENS = 60


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
    local_model_port: int = 50061


async def start_service(
    name: str, args: list[str], env: dict[str, str], log_dir: pathlib.Path, cwd: pathlib.Path | None = None
) -> Child:
    """Start a service module, its log going to a file, and wait for its 'listening on' line."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *guarded([sys.executable, "-m", *args]),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=cwd,
        )
    child = Child(name=name, process=process, log_path=log_path)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(
                        f"{name} exited during start-up (code {await process.wait()}):\n{log_tail(log_path)}"
                    )
                if " listening on " in line:
                    words = line.split()
                    child.address = words[words.index("on") + 1]
                    if "metrics" in words:
                        child.metrics_port = words[words.index("metrics") + 1]
                    break
    except BaseException:
        # Not yet in anyone's list of children: nobody else would stop it.
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    # Keep draining stdout so a chatty child never blocks on a full pipe.
    child.drain = asyncio.create_task(_drain(process.stdout), name=f"drain-{name}")
    return child


async def _start_local_model(port: int, log_dir: pathlib.Path) -> tuple[Child | None, str]:
    """The local model server, once it answered one token; else None and why not."""
    reason = local_model.missing()
    if reason is not None:
        return None, reason
    print(f"starting the local model {local_model.MODEL_NAME} on 127.0.0.1:{port}…", flush=True)
    try:
        server = await local_model.start_server(log_dir / "local-model.log", port=port, wrap=guarded)
    except local_model.LocalModelError as error:
        return None, str(error)
    try:
        seconds = await local_model.one_token_check(server.base_url)
    except local_model.LocalModelError as error:
        await server.stop()
        return None, str(error)
    print(f"local model answered the one-token check in {seconds:.2f} s", flush=True)
    return Child(name="local-model", process=server.process, log_path=server.log_path, address=server.base_url), ""


def _announce_fallback(reason: str) -> None:
    """Nobody may mistake simulated text for a model's: say it where it cannot be missed."""
    bar = "!" * 78
    print(
        f"{bar}\n!! NO LOCAL MODEL: {reason}\n"
        "!! Falling back to the built-in LLM SIMULATOR: its answers are synthetic filler, not a model's text.\n"
        f"{bar}",
        file=sys.stderr,
        flush=True,
    )


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def start_llm(
    llm: str,
    simulator_port: int,
    local_model_port: int,
    env: dict[str, str],
    log_dir: pathlib.Path,
    max_tokens: int | None = None,
    simulator_args: Sequence[str] = (),
) -> tuple[list[Child], list[str]]:
    """Start the LLM backend `llm` names (none for `openai`); its process and the agent service's flags for it.

    `auto` runs the local model when it is installed and answers a one-token check, and
    otherwise falls back to the simulator, saying so loudly.
    """
    children: list[Child] = []
    llm_args: list[str] = []
    if llm in ("auto", "local"):
        local, reason = await _start_local_model(local_model_port, log_dir)
        if local is not None:
            children.append(local)
            llm_args = [
                "--llm-backend", "local",
                "--llm-base-url", local.address,
                "--llm-model", local_model.MODEL_NAME,
                "--llm-max-tokens", str(max_tokens or LOCAL_MAX_TOKENS),
            ]  # fmt: skip
        elif llm == "local":
            raise RuntimeError(reason)
        else:
            _announce_fallback(reason)
            llm = "sim"
    if llm == "sim":
        sim = await start_service(
            "simulator", ["services.simulator", "--port", str(simulator_port), *simulator_args], env, log_dir
        )
        children.append(sim)
        llm_args = [
            "--llm-base-url", sim.address,
            "--llm-backend", "simulator",
            "--llm-max-tokens", str(max_tokens or SIMULATOR_MAX_TOKENS),
        ]  # fmt: skip
    return children, llm_args


async def start_suite(
    addresses: Addresses,
    llm: str,
    store: str,
    extra_env: dict[str, str],
    log_dir: pathlib.Path,
    max_tokens: int | None = None,
) -> list[Child]:
    """Start the LLM backend (local model or simulator, when chosen), monitor, agents, session.

    `auto` runs the local model when it is installed and answers a one-token check, and
    otherwise falls back to the simulator, saying so loudly. Whatever started is stopped if
    a later service fails.
    """
    env = {**os.environ, **extra_env}
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any service runs
    children: list[Child] = []
    try:
        backend, llm_env = await start_llm(
            llm, addresses.simulator_port, addresses.local_model_port, env, log_dir, max_tokens
        )
        children.extend(backend)
        monitor = await start_service(
            "monitor",
            ["services.monitor", "--port", _port(addresses.monitor), "--metrics-port", str(addresses.metrics_ports[2])],
            env,
            log_dir,
        )
        children.append(monitor)
        common = ["--monitor-address", monitor.address]
        agents = await start_service(
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
        session = await start_service(
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


async def stop_together(children: Sequence[Child], grace_seconds: float = 15.0) -> None:
    """SIGTERM to all of them at once (replicas of one tier), then wait; SIGKILL stragglers."""
    await asyncio.gather(*(stop_suite([child], grace_seconds) for child in children))


def log_tail(path: pathlib.Path, lines: int = 15) -> str:
    """The end of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


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
