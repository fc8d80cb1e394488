"""Turns admission away while this process or the machine is short of memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from services.shared.errors import ResourceExhausted

SAMPLE_INTERVAL_SECONDS = 1.0
RETRY_AFTER_SECONDS = 10.0


@dataclass(frozen=True)
class MemoryReading:
    """Process RSS and system memory use at one moment."""

    rss_bytes: int
    system_percent: float


def read_memory() -> MemoryReading:
    """The current reading from psutil."""
    return MemoryReading(psutil.Process().memory_info().rss, psutil.virtual_memory().percent)


class MemoryWatch:
    """Checks memory at most once a second (psutil is not free) against the configured limits."""

    def __init__(
        self,
        *,
        limit_rss_bytes: float,
        limit_system_percent: float,
        reader: Callable[[], MemoryReading] = read_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit_rss_bytes = limit_rss_bytes
        self._limit_system_percent = limit_system_percent
        self._reader = reader
        self._clock = clock
        self._sampled_at = float("-inf")
        self._reading = MemoryReading(0, 0.0)

    def check(self) -> None:
        """Raise ResourceExhausted (limit "memory") while memory is over a limit."""
        now = self._clock()
        if now - self._sampled_at >= SAMPLE_INTERVAL_SECONDS:
            self._reading = self._reader()
            self._sampled_at = now
        reading = self._reading
        if reading.rss_bytes > self._limit_rss_bytes or reading.system_percent > self._limit_system_percent:
            raise ResourceExhausted(
                f"the server is short of memory (process {reading.rss_bytes / 2**20:.0f} MiB, "
                f"system {reading.system_percent:.0f} %); new discussions are refused until it falls",
                retry_after_seconds=RETRY_AFTER_SECONDS,
                subject="server",
                limit="memory",
            )
