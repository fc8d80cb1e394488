"""Per-API-key request and token quotas modelled on a provider's: token buckets refilled continuously."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

QuotaKind = Literal["requests", "tokens"]
SECONDS_PER_MINUTE = 60.0
# An idle key's buckets refill to full, so forgetting the least recently seen key loses (almost) nothing.
MAX_TRACKED_KEYS = 10_000


@dataclass(slots=True)
class TokenBucket:
    """A bucket holding up to `capacity` units, refilled continuously at capacity per minute."""

    capacity: int
    level: float
    updated_at: float

    @property
    def refill_per_second(self) -> float:
        """Units added back per second."""
        return self.capacity / SECONDS_PER_MINUTE

    def refill(self, now: float) -> None:
        """Add what has dripped in since the last update, up to the capacity."""
        if now > self.updated_at:
            self.level = min(float(self.capacity), self.level + (now - self.updated_at) * self.refill_per_second)
            self.updated_at = now

    def seconds_until(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` units (0 when it already does)."""
        return max(0.0, (amount - self.level) / self.refill_per_second)

    def state(self) -> BucketState:
        """The bucket as the x-ratelimit-* headers report it."""
        return BucketState(
            limit=self.capacity,
            remaining=max(0, math.floor(self.level)),
            reset_seconds=self.seconds_until(self.capacity),
        )


@dataclass(frozen=True, slots=True)
class BucketState:
    """One quota dimension after a decision: its limit, what remains and how long until it is full again."""

    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The quotas' answer to one request: admitted or refused, with the state to report to the client."""

    key: str
    requests: BucketState | None
    tokens: BucketState | None
    tokens_charged: int = 0
    refused_by: QuotaKind | None = None
    # When the request will fit; None when it never can (it asks for more tokens than the whole limit).
    retry_after_seconds: float | None = None
    # For the refusal message: what the refusing bucket had used and what the request asked for.
    used: int = 0
    requested: int = 0

    @property
    def admitted(self) -> bool:
        """Whether the request may proceed."""
        return self.refused_by is None


@dataclass(slots=True)
class KeyUsage:
    """What one API key has done against its quotas since start (or the last reset)."""

    requests_admitted: int = 0
    requests_refused: int = 0
    tokens_charged: int = 0
    tokens_refunded: int = 0
    # How far below zero a bucket ever went; admission refuses what does not fit, so this stays 0.
    peak_overuse_requests: float = 0.0
    peak_overuse_tokens: float = 0.0


@dataclass(slots=True)
class _KeyState:
    usage: KeyUsage = field(default_factory=KeyUsage)
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None


class Quotas:
    """Request-per-minute and token-per-minute buckets per API key; O(1) per request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_TRACKED_KEYS) -> None:
        """Start with no key seen; clock is injectable so the bucket arithmetic can be tested without sleeping."""
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()

    def admit(self, key: str, rpm_limit: int, tpm_limit: int, tokens: int) -> QuotaDecision:
        """Charge one request and `tokens` to key's buckets, or refuse without charging if either cannot cover it."""
        state = self._state(key)
        now = self._clock()
        state.requests = _current_bucket(state.requests, rpm_limit, now)
        state.tokens = _current_bucket(state.tokens, tpm_limit, now)
        requests, token_bucket = state.requests, state.tokens
        if requests is not None and requests.level < 1:
            state.usage.requests_refused += 1
            return _refusal(key, requests, token_bucket, tokens, "requests")
        if token_bucket is not None and token_bucket.level < tokens:
            state.usage.requests_refused += 1
            return _refusal(key, requests, token_bucket, tokens, "tokens")

        charged = 0
        if requests is not None:
            requests.level -= 1
            state.usage.peak_overuse_requests = max(state.usage.peak_overuse_requests, -requests.level)
        if token_bucket is not None:
            token_bucket.level -= tokens
            charged = tokens
            state.usage.peak_overuse_tokens = max(state.usage.peak_overuse_tokens, -token_bucket.level)
        state.usage.requests_admitted += 1
        state.usage.tokens_charged += charged
        return QuotaDecision(
            key=key,
            requests=requests.state() if requests else None,
            tokens=token_bucket.state() if token_bucket else None,
            tokens_charged=charged,
        )

    def settle(self, decision: QuotaDecision, used_tokens: int) -> None:
        """Refund the part of an admitted request's token charge its answer did not use (or charge the excess)."""
        if decision.tokens_charged == 0:
            return
        state = self._keys.get(decision.key)
        if state is None or state.tokens is None:
            return  # the key was forgotten or its token quota switched off meanwhile
        bucket = state.tokens
        bucket.refill(self._clock())
        refund = decision.tokens_charged - used_tokens
        bucket.level = min(float(bucket.capacity), bucket.level + refund)
        if refund >= 0:
            state.usage.tokens_refunded += refund
        else:
            state.usage.tokens_charged -= refund
            state.usage.peak_overuse_tokens = max(state.usage.peak_overuse_tokens, -bucket.level)

    def usage(self) -> dict[str, KeyUsage]:
        """A copy of every tracked key's usage."""
        return {key: dataclasses.replace(state.usage) for key, state in self._keys.items()}

    def clear(self) -> None:
        """Forget every key: buckets start full again and counters at zero."""
        self._keys.clear()

    def _state(self, key: str) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return state


def _refusal(
    key: str, requests: TokenBucket | None, token_bucket: TokenBucket | None, tokens: int, refused_by: QuotaKind
) -> QuotaDecision:
    """Describe a refusal: the state of both buckets, and when the request will fit both (it waits for the slower)."""
    waits = [requests.seconds_until(1)] if requests is not None else []
    if token_bucket is not None:
        waits.append(token_bucket.seconds_until(tokens) if tokens <= token_bucket.capacity else math.inf)
    retry_after = max(waits)
    refusing, requested = (requests, 1) if refused_by == "requests" else (token_bucket, tokens)
    used = 0 if refusing is None else math.ceil(refusing.capacity - refusing.level)
    return QuotaDecision(
        key=key,
        requests=requests.state() if requests else None,
        tokens=token_bucket.state() if token_bucket else None,
        refused_by=refused_by,
        retry_after_seconds=None if math.isinf(retry_after) else retry_after,
        used=used,
        requested=requested,
    )


def _current_bucket(bucket: TokenBucket | None, limit: int, now: float) -> TokenBucket | None:
    """Return the key's bucket for limit (None when there is no quota), refilled to now."""
    if limit <= 0:
        return None
    if bucket is None or bucket.capacity != limit:
        # A new or changed limit starts full, as a provider's new tier does.
        return TokenBucket(capacity=limit, level=float(limit), updated_at=now)
    bucket.refill(now)
    return bucket


def format_duration(seconds: float) -> str:
    """Render a duration the way OpenAI's x-ratelimit-reset-* headers do: "20ms", "1s", "1.5s", "6m0s"."""
    total_ms = max(0, math.ceil(seconds * 1000))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    whole_seconds, millis = divmod(rest_ms, 1000)
    text = f"{whole_seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text
