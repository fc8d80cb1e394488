"""The LLM budget a call reserves from before it starts: requests and tokens per minute per backend.

The interface the LLM clients use (reserve, settle, cool down). Implementations: `UnlimitedBudget`
(no limits configured), and the fleet budget (in memory for one replica, in Redis shared by every
replica) behind the same contract.
"""

from __future__ import annotations

from typing import Protocol


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
