"""A blocking client for code without an event loop: the asyncio Client run on a private loop in a thread."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from roundtable_client.client import Client, Discussion, Tls
from roundtable_client.events import DiscussionStatus, Event
from roundtable_client.retry import Retry, RetryPolicy

T = TypeVar("T")


class SyncClient:
    """The same calls as Client, blocking, with the same arguments; use it as `with SyncClient() as client:`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: Tls | bool | None = None,
        timeout_seconds: float = 60.0,
        resume_timeout_seconds: float = 60.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[Retry], None] | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._client = Client(
            address,
            api_key=api_key,
            tls=tls,
            timeout_seconds=timeout_seconds,
            resume_timeout_seconds=resume_timeout_seconds,
            retry=retry,
            on_retry=on_retry,
            interceptors=interceptors,
            channel_options=channel_options,
        )
        self._loop = asyncio.new_event_loop()
        # A thread of its own: it works from any thread, including one whose own event loop is running.
        # on_retry is called on that thread.
        self._thread = threading.Thread(target=self._loop.run_forever, name="roundtable-client", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """The server's host:port."""
        return self._client.address

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop's thread."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def create(
        self,
        topic: str,
        *,
        personas: Sequence[str] = (),
        rounds: int = 1,
        ttl: datetime.timedelta | None = None,
        token_budget: int = 0,
        summary: bool = True,
        max_duration: datetime.timedelta | None = None,
        request_id: str | None = None,
        discussion_id: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Discussion:
        """Client.create, blocking."""
        return self._run(
            self._client.create(
                topic,
                personas=personas,
                rounds=rounds,
                ttl=ttl,
                token_budget=token_budget,
                summary=summary,
                max_duration=max_duration,
                request_id=request_id,
                discussion_id=discussion_id,
                timeout_seconds=timeout_seconds,
            )
        )

    def get(self, discussion_id: str, *, timeout_seconds: float | None = None) -> Discussion:
        """Client.get, blocking."""
        return self._run(self._client.get(discussion_id, timeout_seconds=timeout_seconds))

    def cancel(self, discussion_id: str, *, timeout_seconds: float | None = None) -> Discussion:
        """Client.cancel, blocking."""
        return self._run(self._client.cancel(discussion_id, timeout_seconds=timeout_seconds))

    def delete(self, discussion_id: str, *, timeout_seconds: float | None = None) -> None:
        """Client.delete, blocking."""
        self._run(self._client.delete(discussion_id, timeout_seconds=timeout_seconds))

    def list(
        self, *, status: DiscussionStatus | None = None, page_size: int = 100, timeout_seconds: float | None = None
    ) -> Iterator[Discussion]:
        """Client.list, as a blocking iterator."""
        return self._iterate(self._client.list(status=status, page_size=page_size, timeout_seconds=timeout_seconds))

    def events(self, discussion_id: str, *, after_sequence: int = 0) -> Iterator[Event]:
        """Client.events (resuming by itself), as a blocking iterator."""
        return self._iterate(self._client.events(discussion_id, after_sequence=after_sequence))

    def discuss(
        self,
        topic: str,
        *,
        personas: Sequence[str] = (),
        rounds: int = 1,
        ttl: datetime.timedelta | None = None,
        token_budget: int = 0,
        summary: bool = True,
        max_duration: datetime.timedelta | None = None,
        request_id: str | None = None,
    ) -> Iterator[Event]:
        """Client.discuss, as a blocking iterator."""
        return self._iterate(
            self._client.discuss(
                topic,
                personas=personas,
                rounds=rounds,
                ttl=ttl,
                token_budget=token_budget,
                summary=summary,
                max_duration=max_duration,
                request_id=request_id,
            )
        )

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _iterate(self, source: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(source)
            except StopAsyncIteration:
                return False, None

        async def stop() -> None:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            # Stops the stream on the server too when the caller leaves the loop early.
            if not self._loop.is_closed():
                self._run(stop())
