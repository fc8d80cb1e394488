"""The Redis (or Redis Cluster) connection the store, admission and rate limiter share, and its failure policy.

Failure policy: every command is bounded by a socket timeout (a hung or unreachable
Redis costs at most about that long, never a hang), a refused connection is retried
once at once (a pooled connection that died with a restarted Redis), and whatever
still fails surfaces as RedisUnavailable, which the error mapping turns into
UNAVAILABLE. redis-py reconnects on the next command, so the service recovers by
itself when Redis returns.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import redis.asyncio as redis
from redis.asyncio.client import Pipeline as ServerPipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.shared import redis_client
from services.shared.errors import Unavailable

# One server or a Redis Cluster (a redis+cluster:// URL): the scripts and commands here run on both.
Client: TypeAlias = redis_client.AnyRedis
# A non-transactional pipeline of either; on a cluster it sends each node its commands, in one round trip each.
Pipeline: TypeAlias = ServerPipeline | ClusterPipeline
EncodableArg: TypeAlias = bytes | str | int | float

DEFAULT_TIMEOUT_SECONDS = redis_client.DEFAULT_TIMEOUT_SECONDS
DEFAULT_MAX_CONNECTIONS = redis_client.DEFAULT_MAX_CONNECTIONS


# What unavailable_on_failure() turns into RedisUnavailable.
UNAVAILABLE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OutOfMemoryError,
    *redis_client.CLUSTER_FAILURES,
)


class RedisUnavailable(Unavailable):
    """Redis could not be reached or did not answer in time; the call may be retried later."""


def connect(
    url: str,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Client:
    """The session service's client for `url` (services.shared.redis_client's failure policy)."""
    return redis_client.connect(
        url, client_name="roundtable-session", timeout_seconds=timeout_seconds, max_connections=max_connections
    )


def blocking_twin(client: Client, extra_timeout_seconds: float) -> Client:
    """A client for the same server (or cluster) with the same options whose reads may wait longer (XREAD BLOCK)."""
    if isinstance(client, RedisCluster):
        return _cluster_twin(client, extra_timeout_seconds)
    pool = client.connection_pool
    options = dict(pool.connection_kwargs)
    timeout_seconds = float(options.get("socket_timeout") or DEFAULT_TIMEOUT_SECONDS) + extra_timeout_seconds
    options["socket_timeout"] = timeout_seconds
    # Each blocked reader holds a connection: a pool of their own, so commands never wait behind them.
    twin = redis.BlockingConnectionPool(
        connection_class=pool.connection_class,
        max_connections=pool.max_connections * 4,
        timeout=timeout_seconds,
        **options,
    )
    return redis.Redis(connection_pool=twin)


def _cluster_twin(client: RedisCluster, extra_timeout_seconds: float) -> RedisCluster:
    """blocking_twin() of a cluster client: the nodes it knows and its connection options, a longer read timeout."""
    options = dict(client.connection_kwargs)
    # Only what RedisCluster() takes as such: the rest (callbacks, internal registries) it builds itself.
    accepted = inspect.signature(RedisCluster.__init__).parameters
    kept = {name: value for name, value in options.items() if name in accepted and name != "max_connections"}
    kept["ssl"] = options.get("connection_class") is SSLConnection
    kept["socket_timeout"] = float(options.get("socket_timeout") or DEFAULT_TIMEOUT_SECONDS) + extra_timeout_seconds
    node = client.get_default_node() or next(iter(client.nodes_manager.startup_nodes.values()))
    return redis_client.SlotAwareRedisCluster(
        host=node.host,
        port=node.port,
        # Each blocked reader holds a connection: room for four times the command client's.
        max_connections=int(options.get("max_connections") or redis_client.DEFAULT_MAX_CONNECTIONS) * 4,
        retry=client.retry,
        **kept,
    )


@contextlib.contextmanager
def unavailable_on_failure(operation: str) -> Iterator[None]:
    """Turn connection errors, timeouts, a read-only replica, a full Redis, a failing cluster into RedisUnavailable."""
    try:
        yield
    except UNAVAILABLE_ERRORS as error:
        raise RedisUnavailable(f"Redis is unavailable ({operation}): {error}") from error


class Script:
    """A Lua script run by its SHA1 (EVALSHA), loaded again when Redis has forgotten it (a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def load(self, client: Client) -> None:
        """SCRIPT LOAD; the script cache is not persisted, so a restarted Redis needs this again."""
        self.sha = await client.script_load(self.source)

    async def __call__(self, client: Client, keys: Sequence[str], args: Sequence[EncodableArg]) -> Any:
        """Run on `client`, loading the script first if Redis does not know it."""
        if self.sha is None:
            await self.load(client)
        assert self.sha is not None
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[EncodableArg]) -> None:
        """Add an EVALSHA to a pipeline; run it with execute_pipeline(), which handles NOSCRIPT."""
        assert self.sha is not None, "load the script before queueing it"
        # The command, not pipe.evalsha(): redis-py's cluster pipeline refuses that method, yet routes the
        # command itself by its first key like any other.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


async def load_scripts(client: Client, scripts: Sequence[Script]) -> None:
    """Load every script (at start-up, and after a NOSCRIPT)."""
    for script in scripts:
        await script.load(client)


async def execute_pipeline(client: Client, scripts: Sequence[Script], build: Callable[[Pipeline], None]) -> list[Any]:
    """Build a non-transactional pipeline with `build(pipe)` and run it in one round trip.

    A NOSCRIPT (Redis restarted and lost its script cache) reloads the scripts and runs
    the pipeline again, which is safe because every pipeline here is idempotent.
    """
    if any(script.sha is None for script in scripts):
        await load_scripts(client, scripts)
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        try:
            return list(await pipe.execute())
        except NoScriptError:
            if attempt:
                raise
            await load_scripts(client, scripts)
    raise AssertionError("unreachable")


async def execute_in_order(client: Client, scripts: Sequence[Script], *stages: Callable[[Pipeline], None]) -> list[Any]:
    """Run the stages' commands so that each stage's are applied before the next's; the replies of all, in order.

    One server applies a pipeline in order, so every stage goes in one round trip. A cluster pipeline
    sends each node its share at once, so order across slots holds only between round trips: there
    each stage is a round trip of its own (what crash-safety orderings across slots need).
    """
    if not isinstance(client, RedisCluster):

        def build(pipe: Pipeline) -> None:
            for stage in stages:
                stage(pipe)

        return await execute_pipeline(client, scripts, build)
    replies: list[Any] = []
    for stage in stages:
        replies.extend(await execute_pipeline(client, scripts, stage))
    return replies
