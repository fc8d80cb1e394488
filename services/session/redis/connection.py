"""The Redis connection the Redis store, admission and rate limiter share, and its failure policy.

Failure policy: every command is bounded by a socket timeout (a hung or unreachable
Redis costs at most about that long, never a hang), a refused connection is retried
once at once (a pooled connection that died with a restarted Redis), and whatever
still fails surfaces as RedisUnavailable, which the error mapping turns into
UNAVAILABLE. redis-py reconnects on the next command, so the service recovers by
itself when Redis returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.shared import redis_client
from services.shared.errors import Unavailable

Client: TypeAlias = "redis.Redis"
EncodableArg: TypeAlias = bytes | str | int | float

DEFAULT_TIMEOUT_SECONDS = redis_client.DEFAULT_TIMEOUT_SECONDS
DEFAULT_MAX_CONNECTIONS = redis_client.DEFAULT_MAX_CONNECTIONS


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
    """A client for the same server with the same options whose reads may wait longer (XREAD BLOCK)."""
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


@contextlib.contextmanager
def unavailable_on_failure(operation: str) -> Iterator[None]:
    """Turn connection errors, timeouts, a read-only replica and a full Redis into RedisUnavailable."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError) as error:
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
        pipe.evalsha(self.sha, len(keys), *keys, *args)


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
