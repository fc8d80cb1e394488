"""The LLM budget a call reserves from before it starts: requests and tokens per minute per backend.

The interface the LLM clients use (reserve, settle, cool down). Implementations: `UnlimitedBudget`
(no limits configured), and `FleetBudget`, the fair queue in front of a bucket store: in memory for
one replica (`MemoryBuckets`), in Redis shared by every replica (services/agents/llm_budget_redis.py).
`build_budget` picks one from the configuration.

The model (the simulator's provider model is the same): per backend two token buckets, one of
requests and one of tokens, each holding at most its per-minute limit, refilled continuously at
limit/60 per second and starting full. A call takes one request and its token estimate when both
buckets cover it and settles to real usage afterwards; the request is never given back. One
deliberate difference: a take from full buckets starts their refill TRANSIT_ALLOWANCE_SECONDS later,
because the provider's buckets start only when that call reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from services.agents import metrics

logger = logging.getLogger(__name__)

RedisDownPolicy = Literal["open", "closed"]

# The provider's buckets start refilling when our first call of a burst reaches it, a transit time after
# we took from ours; a bucket taken from while full starts its refill this much later, so ours never runs
# ahead of the provider's. Measured in tests/agents/test_llm_budget_fleet.py: 9 of 89 requests refused by
# the simulator without it (the transit time of the first call, a few tokens, never caught up), 0 with it.
TRANSIT_ALLOWANCE_SECONDS = 0.5

# A queue sleeping on a long wait asks the store again at least this often, so room another replica
# gives back (a refund) is seen within about a second, not only when this replica's estimate says.
MAX_SLEEP_SECONDS = 1.0


class LLMBudgetExhausted(TimeoutError):
    """The budget had no room for the call before its deadline."""


class LLMBudgetUnavailable(RuntimeError):
    """The shared budget's store is unreachable and the policy is to fail closed."""


class Reservation(Protocol):
    """What one call holds of the budget from reserve() until it settles."""

    async def settle(self, used_tokens: int) -> None:
        """The call ended having spent used_tokens (0 when it failed or was cancelled: a refund)."""
        ...


class LLMBudget(Protocol):
    """Requests and tokens per minute per backend, shared fairly across principals."""

    async def reserve(self, backend: str, principal: str, tokens: int, deadline: float | None) -> Reservation:
        """Wait (fairly across principals) until the backend has room for one request of `tokens`.

        `deadline` is on time.monotonic(); raises LLMBudgetExhausted when it passes first.
        """
        ...

    async def cool_down(self, backend: str, seconds: float) -> None:
        """The provider said 429: no call to this backend starts, on any replica, for `seconds`."""
        ...

    async def close(self) -> None:
        """Release connections and wake every waiting call with LLMBudgetExhausted."""
        ...


class _NoReservation:
    async def settle(self, used_tokens: int) -> None:
        """Nothing was held."""


_NO_RESERVATION = _NoReservation()


class UnlimitedBudget:
    """No rpm/tpm limits configured: every call starts at once."""

    async def reserve(self, backend: str, principal: str, tokens: int, deadline: float | None) -> Reservation:
        """Room at once."""
        return _NO_RESERVATION

    async def cool_down(self, backend: str, seconds: float) -> None:
        """Nothing to pause: the client's own backoff honours Retry-After."""

    async def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """One backend's per-minute limits; 0 leaves that dimension unlimited."""

    requests_per_minute: int
    tokens_per_minute: int

    def __post_init__(self) -> None:
        if self.requests_per_minute < 0 or self.tokens_per_minute < 0:
            raise ValueError(f"budget limits must be >= 0 (0 = unlimited), got {self}")

    @property
    def unlimited(self) -> bool:
        """Neither requests nor tokens are limited."""
        return self.requests_per_minute == 0 and self.tokens_per_minute == 0

    def clamp_tokens(self, tokens: int) -> int:
        """`tokens` as a reservation takes them: never negative, never more than the bucket holds."""
        tokens = max(0, tokens)
        return min(tokens, self.tokens_per_minute) if self.tokens_per_minute else tokens


@dataclass(frozen=True, slots=True)
class BucketReading:
    """What one take found: granted, or the wait until there will be room; and what the buckets hold."""

    granted: bool
    wait_seconds: float
    remaining_requests: float
    remaining_tokens: float


class BucketStore(Protocol):
    """Where a backend's two buckets live: this process (one replica) or Redis (the fleet)."""

    async def take(self, backend: str, limits: BudgetLimits, tokens: int) -> BucketReading:
        """Take one request and `tokens` if both buckets cover them (and no cooldown runs), in one step."""
        ...

    async def give_back(self, backend: str, limits: BudgetLimits, tokens: int, requests: int = 0) -> None:
        """Add `tokens` (negative: a further charge) and `requests` back, capped at each bucket's capacity."""
        ...

    async def cool_down(self, backend: str, limits: BudgetLimits, seconds: float) -> None:
        """No take on `backend` succeeds before now + `seconds` (a later cooldown already set stays)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(slots=True)
class _Buckets:
    requests: float
    tokens: float
    at_seconds: float
    cool_until_seconds: float = 0.0


class MemoryBuckets:
    """The buckets in this process, on time.monotonic(): the budget of a single replica."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Buckets] = {}

    def _refilled(self, backend: str, limits: BudgetLimits) -> tuple[_Buckets, float]:
        now = self._clock()
        buckets = self._buckets.get(backend)
        if buckets is None:
            buckets = self._buckets[backend] = _Buckets(limits.requests_per_minute, limits.tokens_per_minute, now)
            return buckets, now
        if now > buckets.at_seconds:  # at_seconds is ahead of now during a transit allowance
            elapsed = now - buckets.at_seconds
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            buckets.requests = min(rpm, buckets.requests + elapsed * rpm / 60)
            buckets.tokens = min(tpm, buckets.tokens + elapsed * tpm / 60)
            buckets.at_seconds = now
        return buckets, now

    async def take(self, backend: str, limits: BudgetLimits, tokens: int) -> BucketReading:
        """Take one request and `tokens` if both buckets cover them and no cooldown runs."""
        buckets, now = self._refilled(backend, limits)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        wait_seconds = 0.0
        if rpm and buckets.requests < 1:
            wait_seconds = (1 - buckets.requests) * 60 / rpm
        if tpm and buckets.tokens < tokens:
            wait_seconds = max(wait_seconds, (tokens - buckets.tokens) * 60 / tpm)
        if wait_seconds > 0:
            wait_seconds += max(0.0, buckets.at_seconds - now)  # the refill starts after the transit allowance
        wait_seconds = max(wait_seconds, buckets.cool_until_seconds - now)
        granted = wait_seconds <= 0
        if granted:
            if buckets.requests >= rpm and buckets.tokens >= tpm:
                buckets.at_seconds = now + TRANSIT_ALLOWANCE_SECONDS
            buckets.requests -= 1 if rpm else 0
            buckets.tokens -= tokens if tpm else 0
        # At least a millisecond, like the Redis script, so a waiter never spins on rounding.
        return BucketReading(granted, 0.0 if granted else max(wait_seconds, 0.001), buckets.requests, buckets.tokens)

    async def give_back(self, backend: str, limits: BudgetLimits, tokens: int, requests: int = 0) -> None:
        """Add `tokens` and `requests` back, capped at capacity (negative tokens charge more)."""
        buckets, _ = self._refilled(backend, limits)
        buckets.requests = min(limits.requests_per_minute, buckets.requests + requests)
        buckets.tokens = min(limits.tokens_per_minute, buckets.tokens + tokens)

    async def cool_down(self, backend: str, limits: BudgetLimits, seconds: float) -> None:
        """No take succeeds before now + `seconds`; never shortens a cooldown already running."""
        buckets, now = self._refilled(backend, limits)
        buckets.cool_until_seconds = max(buckets.cool_until_seconds, now + seconds)

    async def close(self) -> None:
        """Nothing to release."""


class _Waiter:
    __slots__ = ("future", "principal", "tokens")

    def __init__(self, principal: str, tokens: int, future: asyncio.Future[Reservation]) -> None:
        self.principal = principal
        self.tokens = tokens
        self.future = future


class _BackendQueue:
    """One backend's waiting calls on this replica: a FIFO per principal, principals served round robin."""

    def __init__(self, backend: str, limits: BudgetLimits, name: str) -> None:
        self.backend = backend
        self.limits = limits
        self.name = name
        self.by_principal: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.wakeup = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None
        # Only the limited dimensions: an unlimited one would read as "0 remaining".
        self.remaining_tokens = (
            metrics.LLM_BUDGET_REMAINING_TOKENS.labels(backend=name) if limits.tokens_per_minute else None
        )
        self.remaining_requests = (
            metrics.LLM_BUDGET_REMAINING_REQUESTS.labels(backend=name) if limits.requests_per_minute else None
        )
        self.reserved_tokens = metrics.LLM_BUDGET_RESERVED_TOKENS.labels(backend=name)
        self.waiting_calls = metrics.LLM_BUDGET_WAITING_CALLS.labels(backend=name)
        self.cooldowns = metrics.LLM_BUDGET_COOLDOWNS.labels(backend=name)

    def add(self, waiter: _Waiter) -> None:
        if waiter.principal not in self.by_principal:
            # Shows which principals the fair order sees (a principal lost on the way would all read as "").
            logger.debug(
                "LLM budget of %s: principal %r starts waiting (%d others waiting)",
                self.name,
                waiter.principal,
                len(self.by_principal),
            )
        self.by_principal.setdefault(waiter.principal, deque()).append(waiter)
        self.waiting_calls.inc()

    def head(self) -> _Waiter | None:
        """The next call in the fair order: the first waiter of the principal whose turn it is."""
        for waiters in self.by_principal.values():
            return waiters[0]
        return None

    def remove(self, waiter: _Waiter) -> None:
        """Take a waiter that gives up out of the queue (no-op when it is not in it)."""
        waiters = self.by_principal.get(waiter.principal)
        if waiters is None or waiter not in waiters:
            return
        was_head = self.head() is waiter
        waiters.remove(waiter)
        if not waiters:
            del self.by_principal[waiter.principal]
        self.waiting_calls.dec()
        if was_head:
            # The next head may need fewer tokens than the one the pump is sleeping for.
            self.wakeup.set()

    def served(self, waiter: _Waiter) -> None:
        """The head was granted: its principal goes to the back of the round."""
        waiters = self.by_principal.pop(waiter.principal)
        waiters.popleft()
        if waiters:
            self.by_principal[waiter.principal] = waiters
        self.waiting_calls.dec()

    def fail_all(self, error: Exception) -> None:
        for waiters in self.by_principal.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(error)
        self.waiting_calls.dec(sum(len(waiters) for waiters in self.by_principal.values()))
        self.by_principal.clear()

    def saw(self, reading: BucketReading) -> None:
        if self.remaining_tokens is not None:
            self.remaining_tokens.set(reading.remaining_tokens)
        if self.remaining_requests is not None:
            self.remaining_requests.set(reading.remaining_requests)


class _FleetReservation:
    """One granted call's hold on a backend's budget until it settles."""

    __slots__ = ("_budget", "_queue", "_settled", "_tokens")

    def __init__(self, budget: FleetBudget, queue: _BackendQueue, tokens: int) -> None:
        self._budget = budget
        self._queue = queue
        self._tokens = tokens
        self._settled = False
        queue.reserved_tokens.inc(tokens)

    async def settle(self, used_tokens: int) -> None:
        """Give back reserved − used tokens (charge more when used is larger); a second settle is a no-op."""
        await self._end(self._tokens - max(0, used_tokens), requests=0)

    async def release(self) -> None:
        """Nobody received the grant (its caller left as it came): give back the request too."""
        await self._end(self._tokens, requests=1)

    async def _end(self, tokens: int, *, requests: int) -> None:
        if self._settled:
            return
        self._settled = True
        self._queue.reserved_tokens.dec(self._tokens)
        if not self._queue.limits.tokens_per_minute:
            tokens = 0
        if not self._queue.limits.requests_per_minute:
            requests = 0
        if tokens or requests:
            await self._budget._give_back(self._queue, tokens, requests)


class FleetBudget:
    """Per-backend request and token buckets in a store, with a fair queue across principals on this replica.

    Only the head of a backend's fair order asks the store, by one task per backend with waiters (its
    "pump"): one store round trip per granted call plus one per wake-up, however many calls wait. The
    order is fair on this replica; across replicas the Redis store serves the head that has waited
    longest (its claims), so a head that needs many tokens is not starved by another replica's small calls.
    """

    def __init__(
        self, store: BucketStore, limits: Mapping[str, BudgetLimits], *, names: Mapping[str, str] | None = None
    ) -> None:
        self._store = store
        self._limits = {backend: limit for backend, limit in limits.items() if not limit.unlimited}
        self._names = dict(names or {})
        self._queues: dict[str, _BackendQueue] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def display_name(self, backend: str) -> str:
        """The backend's metric label: its configured name, else the key itself (never an API key)."""
        return self._names.get(backend, backend)

    def _queue(self, backend: str, limits: BudgetLimits) -> _BackendQueue:
        queue = self._queues.get(backend)
        if queue is None:
            queue = self._queues[backend] = _BackendQueue(backend, limits, self.display_name(backend))
        return queue

    async def reserve(self, backend: str, principal: str, tokens: int, deadline: float | None) -> Reservation:
        """Wait in `principal`'s queue until the backend has room for one request of `tokens`, or the deadline."""
        limits = self._limits.get(backend)
        if limits is None:
            return _NO_RESERVATION
        if self._closed:
            raise LLMBudgetExhausted("the LLM budget is closed")
        started = time.monotonic()
        if deadline is not None and deadline <= started:
            raise LLMBudgetExhausted(f"the deadline passed before the call to {self.display_name(backend)} started")
        queue = self._queue(backend, limits)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(principal, limits.clamp_tokens(tokens), loop.create_future())
        queue.add(waiter)
        if queue.pump is None:
            queue.pump = loop.create_task(self._pump(queue), name=f"llm-budget-{queue.name}")
        timer = None if deadline is None else loop.call_later(deadline - started, self._expire, queue, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            queue.remove(waiter)
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted in the same loop turn the caller was cancelled: hand it all back.
                reservation = future.result()
                assert isinstance(reservation, _FleetReservation)
                self._spawn(reservation.release())
            raise
        finally:
            if timer is not None:
                timer.cancel()
            metrics.LLM_BUDGET_WAIT_SECONDS.observe(time.monotonic() - started)

    def _expire(self, queue: _BackendQueue, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        queue.remove(waiter)
        waiter.future.set_exception(
            LLMBudgetExhausted(f"no room in the LLM budget of {queue.name} before the call's deadline")
        )

    async def _pump(self, queue: _BackendQueue) -> None:
        """Serve the queue's head until the queue is empty: take for it, or sleep until the store says."""
        try:
            while (waiter := queue.head()) is not None:
                queue.wakeup.clear()
                try:
                    reading = await self._store.take(queue.backend, queue.limits, waiter.tokens)
                except Exception as error:
                    if not isinstance(error, LLMBudgetUnavailable):
                        logger.exception("LLM budget store failed for %s", queue.name)
                        error = LLMBudgetUnavailable(f"the LLM budget store failed: {error}")
                    queue.fail_all(error)
                    return
                queue.saw(reading)
                if reading.granted:
                    reservation = _FleetReservation(self, queue, waiter.tokens)
                    if waiter.future.done():  # it left (deadline, cancel) while the store answered
                        self._spawn(reservation.release())
                        continue
                    queue.served(waiter)
                    waiter.future.set_result(reservation)
                    continue
                if waiter.future.done():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.wakeup.wait(), min(reading.wait_seconds, MAX_SLEEP_SECONDS))
        finally:
            queue.pump = None

    async def _give_back(self, queue: _BackendQueue, tokens: int, requests: int) -> None:
        if self._closed:
            return
        try:
            await self._store.give_back(queue.backend, queue.limits, tokens, requests)
        except Exception:
            # A lost refund only makes the budget stricter for a while; settle must not fail the call.
            logger.warning("LLM budget: could not give back %d tokens to %s", tokens, queue.name, exc_info=True)
            return
        if tokens > 0 or requests > 0:
            queue.wakeup.set()

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cool_down(self, backend: str, seconds: float) -> None:
        """Pause every call to `backend` (on every replica sharing the store) for `seconds`, never shortening."""
        limits = self._limits.get(backend)
        if limits is None or seconds <= 0 or self._closed:
            return
        queue = self._queue(backend, limits)
        queue.cooldowns.inc()
        try:
            await self._store.cool_down(backend, limits, seconds)
        except Exception:
            # The caller backs off from its own 429 anyway; the next reserve meets the store's state.
            logger.warning("LLM budget: could not record a %.1f s cooldown of %s", seconds, queue.name, exc_info=True)

    async def close(self) -> None:
        """Wake every waiting call with LLMBudgetExhausted, stop the pumps, close the store."""
        if self._closed:
            return
        self._closed = True
        pumps = [queue.pump for queue in self._queues.values() if queue.pump is not None]
        for queue in self._queues.values():
            queue.fail_all(LLMBudgetExhausted("the LLM budget closed while the call waited"))
        for task in [*pumps, *self._background]:
            task.cancel()
        await asyncio.gather(*pumps, *self._background, return_exceptions=True)
        await self._store.close()


def build_budget(
    limits: Mapping[str, BudgetLimits],
    *,
    redis_url: str = "",
    when_redis_down: RedisDownPolicy = "open",
    names: Mapping[str, str] | None = None,
) -> LLMBudget:
    """The budget the configuration asks for: unlimited, one replica's (in memory) or the fleet's (Redis).

    `limits` maps an opaque backend key (the LLM client passes base URL # API-key hash) to its limits; a
    backend without an entry is unlimited. `names` gives each key the short name its metrics carry.
    """
    if all(limit.unlimited for limit in limits.values()):
        return UnlimitedBudget()
    if not redis_url:
        return FleetBudget(MemoryBuckets(), limits, names=names)
    from services.agents.llm_budget_redis import FailoverBuckets, RedisBuckets, connect

    store = FailoverBuckets(RedisBuckets(connect(redis_url)), when_redis_down, names=names)
    return FleetBudget(store, limits, names=names)
