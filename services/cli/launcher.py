"""`roundtable up`: the services as child processes on loopback, started in order and stopped together."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from services.agents import local_model
from services.cli.child import guarded
from services.shared.processes import Child, start_child, stop_in_order

# Longest answer of one agent unless --max-tokens says otherwise. A 135M model on a couple of cores:
# long enough to say something, short enough to watch live. Simulated filler: short enough to read.
LOCAL_MAX_TOKENS = 128
SIMULATOR_MAX_TOKENS = 60


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
    """Start `python -m <args>`, set to die with this process, its log in log_dir; wait for its 'listening on' line."""
    return await start_child(name, guarded([sys.executable, "-m", *args]), log_dir / f"{name}.log", env=env, cwd=cwd)


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


async def stop_suite(children: list[Child], grace_seconds: float = 15.0) -> None:
    """Stop what start_suite started, in reverse start order (clients before servers)."""
    await stop_in_order(children, grace_seconds)


def _port(address: str) -> str:
    return address.rsplit(":", 1)[1]
