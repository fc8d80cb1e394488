"""The one way a service connects to Redis or a Redis Cluster: every command bounded, a dead connection replaced once.

A URL whose scheme is `redis+cluster://` (or `rediss+cluster://`, TLS) names a Redis Cluster by one or
more of its nodes (`redis+cluster://10.0.0.5:6379,10.0.0.6:6379`); the client learns the slot map from
the first that answers and sends each command to the master of its key's slot. The cluster is named by
the URL, not by a separate switch, because the URL already travels everywhere a connection is described
(--redis-url, --llm-budget-redis-url, the environment, the Kubernetes config): one value cannot disagree
with itself, and every caller that passes a URL supports a cluster without a new parameter.

Failure policy: every command (and, on one server, the wait for a pooled connection) is bounded by a
socket timeout, so a hung or unreachable Redis costs at most about that long, never a hang; a refused
connection is retried once at once (a pooled connection that died with a restarted Redis), with no
back-off, so a Redis that is down costs one timeout and the caller's own policy decides what follows.
redis-py reconnects on the next command, so a service recovers by itself when Redis returns.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

DEFAULT_TIMEOUT_SECONDS = 0.5
DEFAULT_MAX_CONNECTIONS = 64
# redis-py's cluster client has no blocking pool: past its per-node cap a command fails at once
# (MaxConnectionsError) instead of waiting, so each node gets this many times the one-server pool.
CLUSTER_CONNECTIONS_FACTOR = 4
# URL scheme of a cluster -> the scheme redis-py parses (the same options, TLS or not).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class SlotAwareRedisCluster(RedisCluster):
    """redis-py's cluster client, made to read the slot map before it routes its first command.

    redis-py 8.1 picks the node of a command with no static routing policy (EVALSHA among them) before
    it reads the slot map: on a fresh client such a command goes to an arbitrary node and draws MOVED,
    and a few of those at once make the client rebuild its topology, closing the connections of every
    command in flight (a burst of first calls then fails with "Connection closed by server").
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> SlotAwareRedisCluster:
        """Read the slot map; a ConnectionError, as from one server, when no node it knows answers."""
        try:
            await super().initialize(*args, **kwargs)
        except RedisClusterException as error:  # redis-py's own, which callers would take for a bug of theirs
            raise RedisConnectionError(f"no node of the Redis Cluster answered: {error}") from error
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Read the slot map if not read yet (a no-op after), then run the command where its key lives."""
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


# A cluster that lost a master (CLUSTERDOWN), a slot no master serves, a slot moving (TRYAGAIN): to a caller,
# Redis is unavailable, like a refused connection; redis-py reads the new layout on a later call.
CLUSTER_FAILURES = (ClusterDownError, SlotNotCoveredError, TryAgainError)

# A client of one server or of a Redis Cluster: the commands Roundtable uses behave the same on both.
AnyRedis: TypeAlias = redis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (redis+cluster:// or rediss+cluster://)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """The redis:// (rediss://) URL of the first node a cluster URL names, and the (host, port) of the others.

    `redis+cluster://user:secret@10.0.0.5:6379,10.0.0.6:6379/0?ssl_cert_reqs=none`: every node named is a
    way in (the client learns the rest from the first that answers); the credentials and options apply to all.
    """
    scheme, _, rest = url.partition("://")
    end = min((index for index in (rest.find("/"), rest.find("?")) if index >= 0), default=len(rest))
    location, tail = rest[:end], rest[end:]
    credentials, at, hosts = location.rpartition("@")
    first, *others = hosts.split(",")
    return f"{CLUSTER_SCHEMES[scheme.lower()]}://{credentials}{at}{first}{tail}", [_address(h) for h in others]


def _address(host_port: str) -> tuple[str, int]:
    host, colon, port = host_port.rpartition(":")
    if not colon:
        return host_port.strip("[]"), 6379
    return host.strip("[]"), int(port)


def connect(
    url: str,
    *,
    client_name: str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> AnyRedis:
    """A client for `url` (redis://, rediss://, or a cluster's redis+cluster://) with the failure policy above.

    No I/O until first use: a cluster client reads the slot map on its first command.
    """
    # The same connections on one server and on a cluster's nodes.
    connection: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "socket_keepalive": True,
        # redis-py's default retries three times with up to 10 s of back-off: a hang by another name.
        "retry": Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        "health_check_interval": 30,
        "client_name": client_name,
    }
    if is_cluster_url(url):
        first, others = cluster_nodes(url)
        return SlotAwareRedisCluster.from_url(
            first,
            startup_nodes=[ClusterNode(host, port) for host, port in others],
            max_connections=max_connections * CLUSTER_CONNECTIONS_FACTOR,
            **connection,
        )
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_seconds, **connection
    )
    return redis.Redis(connection_pool=pool)
