"""The one way a service connects to Redis: every command bounded, a dead pooled connection replaced once.

Failure policy: every command (and the wait for a pooled connection) is bounded by a socket timeout,
so a hung or unreachable Redis costs at most about that long, never a hang; a refused connection is
retried once at once (a pooled connection that died with a restarted Redis), with no back-off, so a
Redis that is down costs one timeout and the caller's own policy decides what follows. redis-py
reconnects on the next command, so a service recovers by itself when Redis returns.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

DEFAULT_TIMEOUT_SECONDS = 0.5
DEFAULT_MAX_CONNECTIONS = 64


def connect(
    url: str,
    *,
    client_name: str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> redis.Redis:
    """A client for redis:// or rediss:// `url` with the failure policy above (no I/O until first use)."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_seconds,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        socket_keepalive=True,
        # redis-py's default retries three times with up to 10 s of back-off: a hang by another name.
        retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
        client_name=client_name,
    )
    return redis.Redis(connection_pool=pool)
