"""Health built from named components: while any component's check fails, the host answers NOT_SERVING.

A service declares its components by having a health_checks() method (HasHealthChecks); a check is an
async callable that returns when the component is fine and raises (its message is the reason) when not.
HealthState is a check whose state its owner sets. The host polls every check, each bounded by a
timeout, and sets the overall ("") and per-service status, so Envoy and Kubernetes readiness route
away from a replica whose Redis or agent channel is down, and back when it recovers. LIVENESS_SERVICE
ignores the components: a lost dependency is no reason to restart the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from grpc_health.v1 import health, health_pb2
from prometheus_client import Gauge

logger = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[None]]
LIVENESS_SERVICE = "liveness"

COMPONENT_HEALTHY = Gauge(
    "roundtable_health_component_healthy", "1 while a health component's check passes, 0 while it fails.", ["component"]
)


class ComponentFailing(Exception):
    """Raised by a check: the component does not work; the message says why."""


class HasHealthChecks(Protocol):
    """A service whose readiness depends on components (its store, the channels it calls)."""

    def health_checks(self) -> Mapping[str, HealthCheck]:
        """The named checks, read once after the service has started."""


class HealthState:
    """A component's health that its owner sets as it learns it (push), read by the host as a check."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def set_healthy(self) -> None:
        """The component works."""
        self._reason = None

    def set_failing(self, reason: str) -> None:
        """The component does not work, for this reason."""
        self._reason = reason

    async def __call__(self) -> None:
        """Raise ComponentFailing while the state is failing."""
        if self._reason is not None:
            raise ComponentFailing(self._reason)


class _Pingable(Protocol):
    """Anything with an async ping(), such as a Redis client."""

    def ping(self) -> Awaitable[object]: ...


def ping_check(client: _Pingable) -> HealthCheck:
    """A check that the client (a redis.asyncio.Redis, say) answers PING."""

    async def check() -> None:
        await client.ping()

    return check


class HealthComponents:
    """Polls the named checks and keeps the health service's statuses in step with them."""

    def __init__(
        self,
        checks: Mapping[str, HealthCheck],
        servicer: health.aio.HealthServicer,
        service_names: tuple[str, ...],
        *,
        interval_seconds: float,
        timeout_seconds: float,
        failures_before_not_serving: int = 1,
    ) -> None:
        self._checks = dict(checks)
        # A passing component counts as failing only after this many failed checks in a row: one slow
        # answer on a loaded machine must not take the replica out of the balancer (with a single
        # replica, Envoy would then have nowhere to route). One pass restores it.
        self._failures_before_not_serving = failures_before_not_serving
        self._failures_in_a_row = dict.fromkeys(self._checks, 0)
        self._servicer = servicer
        self._service_names = service_names
        self._interval_seconds = interval_seconds
        self._timeout_seconds = timeout_seconds
        self._failing: dict[str, str] | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run_check(self, name: str, check: HealthCheck) -> str | None:
        try:
            await asyncio.wait_for(check(), self._timeout_seconds)
        except TimeoutError:
            return f"no answer within {self._timeout_seconds:g} s"
        except Exception as error:  # any failure of the component is a reason, never a crash of the host
            return str(error) or type(error).__name__
        return None

    async def evaluate(self) -> dict[str, str]:
        """Run every check once (concurrently), publish the result, and return the failing ones with reasons."""
        names = list(self._checks)
        reasons = await asyncio.gather(*(self._run_check(name, self._checks[name]) for name in names))
        failing: dict[str, str] = {}
        for name, reason in zip(names, reasons, strict=True):
            self._failures_in_a_row[name] = 0 if reason is None else self._failures_in_a_row[name] + 1
            # At start (no verdict yet) and while already failing, one failure is enough.
            known_failing = self._failing is None or name in self._failing
            if reason is not None and (
                known_failing or self._failures_in_a_row[name] >= self._failures_before_not_serving
            ):
                failing[name] = reason
        for name in names:
            COMPONENT_HEALTHY.labels(name).set(0 if name in failing else 1)
        if failing != self._failing:
            if failing:
                logger.warning(
                    "NOT_SERVING: %s", "; ".join(f"{name}: {reason}" for name, reason in sorted(failing.items()))
                )
            elif self._failing:
                logger.warning("SERVING again: every health component passes")
            status = health_pb2.HealthCheckResponse.NOT_SERVING if failing else health_pb2.HealthCheckResponse.SERVING
            for service_name in ("", *self._service_names):
                await self._servicer.set(service_name, status)
            self._failing = failing
        return failing

    def start(self) -> None:
        """Poll every interval in the background."""
        self._task = asyncio.create_task(self._poll(), name="health-components")

    async def stop(self) -> None:
        """Stop polling, so nothing turns a stopping host SERVING again."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval_seconds)
            await self.evaluate()
