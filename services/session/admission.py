"""Admission: which discussions may run now, which wait in line, and which are turned away.

Slots are leases: a runner renews its lease while it runs, and a lease not
renewed within its ttl lapses, so a runner that dies without releasing its slot
(a crashed replica) never leaks it. Waiting discussions are admitted strictly in
arrival order. This memory implementation serves one replica; the scale-out work
backs the same interface with Redis.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from services.shared.errors import ResourceExhausted

# Until a discussion has finished, assume one takes this long (for RetryInfo).
INITIAL_DURATION_SECONDS = 30.0
# Bounds of a RetryInfo delay: not sooner than this, and never so late that a client gives up on a busy server.
MIN_RETRY_AFTER_SECONDS = 0.5
MAX_RETRY_AFTER_SECONDS = 120.0
# Return times remembered per subject (principal or "global"): bounds the memory a flood of refusals takes.
MAX_WAITING_REMEMBERED = 10_000


class Admission(Protocol):
    """Slots (leases) for running discussions, a bounded FIFO queue, and per-principal caps."""

    capacity: int

    async def admit(self, discussion_id: str, principal: str) -> bool:
        """True: a slot is leased now. False: queued. Raises ResourceExhausted when neither is allowed."""
        ...

    async def admit_unchecked(self, discussion_id: str, principal: str) -> None:
        """Lease a slot even past the caps (a discussion resumed after a restart was admitted before)."""
        ...

    async def adopt(self, discussion_id: str, principal: str) -> bool:
        """Take over a discussion whose lease lapsed (its runner died): True for exactly one caller, past the caps."""
        ...

    async def renew(self, discussion_id: str) -> bool:
        """Extend a lease; False if it had already lapsed (the slot may have gone to another)."""
        ...

    async def release(self, discussion_id: str, duration_seconds: float | None = None) -> list[str]:
        """Free a lease or a queue place; returns the queued discussions admitted in its stead."""
        ...

    async def reap(self) -> list[str]:
        """Let lapsed leases go; returns the queued discussions admitted in their stead."""
        ...

    def active(self) -> int:
        """Leases held."""
        ...

    def queued(self) -> int:
        """Discussions waiting."""
        ...


class WaitingCallers:
    """Callers refused and told when to come back, per subject; a new refusal is told to come back behind them.

    Telling every refused caller the same delay brings them all back at once for the one slot that freed
    (a thundering herd): the n-th waiting caller is told n slot-intervals instead, bounded.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._return_times: dict[str, list[float]] = {}

    def retry_after(self, subject: str, seconds_per_slot: float, ahead: int = 0) -> float:
        """The delay to give one more refused caller: a slot frees every seconds_per_slot, `ahead` others wait too."""
        now = self._clock()
        return_times = self._return_times.setdefault(subject, [])
        # Those told to come back by now have (or will have been refused again and counted anew).
        del return_times[: bisect.bisect_right(return_times, now)]
        position = ahead + len(return_times) + 1
        delay = min(MAX_RETRY_AFTER_SECONDS, max(MIN_RETRY_AFTER_SECONDS, position * seconds_per_slot))
        if len(return_times) < MAX_WAITING_REMEMBERED:
            bisect.insort(return_times, now + delay)
        if len(self._return_times) > MAX_WAITING_REMEMBERED:
            self._forget_idle(now)
        return delay

    def _forget_idle(self, now: float) -> None:
        idle = [subject for subject, times in self._return_times.items() if not times or times[-1] <= now]
        for subject in idle:
            del self._return_times[subject]


class MemoryAdmission:
    """Admission for one replica, in memory; every method completes without yielding, so each is atomic."""

    def __init__(
        self,
        *,
        capacity: int,
        max_queued: int,
        max_per_principal: int,
        lease_ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self._max_queued = max_queued
        self._max_per_principal = max_per_principal
        self._lease_ttl_seconds = lease_ttl_seconds
        self._clock = clock
        # discussion id → (principal, expiry), oldest expiry first: the ttl is the same for every lease and
        # the clock never goes back, so a lease granted or renewed later expires later, and _lease and
        # renew move it to the end. _expire_lapsed then stops at the first live lease instead of scanning all.
        self._leases: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._queue: OrderedDict[str, str] = OrderedDict()
        self._per_principal: Counter[str] = Counter()
        self._mean_duration_seconds = INITIAL_DURATION_SECONDS
        self._waiting = WaitingCallers(clock)

    def active(self) -> int:
        """Leases held."""
        return len(self._leases)

    def queued(self) -> int:
        """Discussions waiting."""
        return len(self._queue)

    async def admit(self, discussion_id: str, principal: str) -> bool:
        """Lease a slot, or queue, or raise ResourceExhausted naming the limit; an admitted id keeps its place."""
        self._expire_lapsed()
        # Idempotent, as in RedisAdmission: a concurrent retry of one create must not count it twice.
        if discussion_id in self._leases:
            return True
        if discussion_id in self._queue:
            return False
        if self._per_principal[principal] >= self._max_per_principal:
            raise ResourceExhausted(
                f"you already have {self._max_per_principal} discussions running or queued; "
                "wait for one to finish or cancel one",
                retry_after_seconds=self._waiting.retry_after(
                    f"principal:{principal}", self._mean_duration_seconds / max(self._per_principal[principal], 1)
                ),
                subject=f"principal:{principal}",
                limit="max_concurrent_sessions_per_principal",
            )
        if len(self._leases) < self.capacity and not self._queue:
            self._lease(discussion_id, principal)
            return True
        if len(self._queue) < self._max_queued:
            self._queue[discussion_id] = principal
            self._per_principal[principal] += 1
            return False
        full = "and its queue is full" if self._max_queued else "(no queue)"
        raise ResourceExhausted(
            f"the server is running its maximum of {self.capacity} discussions {full}; retry later",
            retry_after_seconds=self._waiting.retry_after(
                "global", self._mean_duration_seconds / max(len(self._leases), 1), ahead=len(self._queue)
            ),
            subject="global",
            limit="max_queued_sessions" if self._max_queued else "max_concurrent_sessions",
        )

    async def admit_unchecked(self, discussion_id: str, principal: str) -> None:
        """Lease past the caps."""
        if discussion_id not in self._leases:
            self._lease(discussion_id, principal)

    async def adopt(self, discussion_id: str, principal: str) -> bool:
        """Lease past the caps unless a live lease is held (one replica: only a restart adopts)."""
        self._expire_lapsed()
        if discussion_id in self._leases or discussion_id in self._queue:
            return False
        self._lease(discussion_id, principal)
        return True

    async def renew(self, discussion_id: str) -> bool:
        """Extend the lease by a ttl from now."""
        lease = self._leases.get(discussion_id)
        if lease is None or lease[1] < self._clock():
            return False
        self._leases[discussion_id] = (lease[0], self._clock() + self._lease_ttl_seconds)
        self._leases.move_to_end(discussion_id)
        return True

    async def release(self, discussion_id: str, duration_seconds: float | None = None) -> list[str]:
        """Free the lease or queue place; admit from the queue into freed slots."""
        lease = self._leases.pop(discussion_id, None)
        if lease is not None:
            self._per_principal[lease[0]] -= 1
        principal = self._queue.pop(discussion_id, None)
        if principal is not None:
            self._per_principal[principal] -= 1
        if duration_seconds is not None:
            # Exponentially weighted: recent discussions say most about the next ones.
            self._mean_duration_seconds += 0.2 * (duration_seconds - self._mean_duration_seconds)
        return self._promote()

    async def reap(self) -> list[str]:
        """Expire lapsed leases and admit from the queue."""
        self._expire_lapsed()
        return self._promote()

    def _lease(self, discussion_id: str, principal: str) -> None:
        self._leases[discussion_id] = (principal, self._clock() + self._lease_ttl_seconds)
        self._leases.move_to_end(discussion_id)  # a re-lease keeps its old place otherwise
        self._per_principal[principal] += 1

    def _expire_lapsed(self) -> None:
        # O(lapsed), not O(held): leases are in expiry order, so the first live one ends the sweep.
        now = self._clock()
        while self._leases:
            discussion_id, (principal, expires) = next(iter(self._leases.items()))
            if expires >= now:
                return
            del self._leases[discussion_id]
            self._per_principal[principal] -= 1

    def _promote(self) -> list[str]:
        promoted = []
        while self._queue and len(self._leases) < self.capacity:
            discussion_id, principal = self._queue.popitem(last=False)
            self._per_principal[principal] -= 1  # _lease counts it again
            self._lease(discussion_id, principal)
            promoted.append(discussion_id)
        return promoted
