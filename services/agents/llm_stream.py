"""The lean streaming LLM client: OpenAI-compatible chat completions over aiohttp, SSE lines parsed with orjson.

Providers send about one token per SSE event and answers run to hundreds of tokens, so the cost of
one line is the cost of the call. This client reads what the socket has (`readany`) and splits the
lines itself, parses each `data:` payload with orjson and reads `choices[0].delta.content`,
`finish_reason` and `usage` from the dict: no model object per chunk (bench/llm_clients.py measures
it against the openai SDK and a bare aiohttp reader).

What it keeps of the SDK:
- Retries on 408/409/429/5xx and connection errors, only before the first text is given to the
  caller (text given is never sent again), in tenacity's loop. The first attempt is made outside
  it and replayed into it only when it failed: tenacity's bookkeeping costs ~30 µs a call, a
  measurable share of a short answer (bench/llm_clients.py), and most calls never retry.
- The wait before a retry is what the provider said (the largest of retry-after-ms, Retry-After
  and, on a 429, x-ratelimit-reset-requests/-tokens of a quota whose x-ratelimit-remaining-* is 0),
  else 0.5 s × 2^n capped at 8 s plus up to 0.5 s of jitter. A retry whose wait would pass the
  call's deadline is not made: the call fails with the provider's last answer. Each retry carries
  x-stainless-retry-count (numbered as the SDK does, so the simulator links it to the attempt it
  repeats) and is counted in roundtable_llm_retries_total; a 429 pauses the backend's LLM budget
  (every replica) for that wait, 1 s when the provider named none.
- No retry on any other 4xx: LLMCallFailed naming the backend and the provider's error message.
- The whole-call time: each attempt's aiohttp `total` timeout is what is left of the call's
  deadline. aiohttp's timer cancels only a read in progress, so it never fires into the caller's
  code between chunks, and one timer a call bounds a silent server as well as a slow one (a
  per-read timeout as long as the call, as the SDK's, could never fire first).
- One keep-alive pool per endpoint (EndpointPools) with as many sockets as the outbound cap lets
  through, so sockets are bounded by calls in flight and reused across calls.
- The budget: each attempt reserves its estimate first and settles to the real usage (0 when it
  failed or was cancelled).

How a stream may end:
- `[DONE]`: the answer is complete.
- The connection closes or breaks without `[DONE]`: accepted when a finish_reason or the usage
  chunk came (the answer is complete, only the terminator is missing); otherwise a retryable
  failure (retried if no text was given yet).
- A `data:` line that is not a JSON object of the expected shape: skipped, counted in
  roundtable_llm_malformed_lines_total and logged at WARNING once per call with the count. One
  garbled event should not cost a whole answer; whether the call succeeds is decided by how the
  stream ends, as above, so a stream of nothing but garbage fails (retryable), while one bad line in
  a complete answer loses at most that line's text, and says so in the log.
- A `{"error": …}` event mid-stream: LLMCallFailed with its message, retryable (before any text).

Cancellation (the task cancelled, or the caller closing the generator) closes the response's
socket at once: a half-read connection never goes back to the pool.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from services.agents import metrics
from services.agents.llm import (
    Backend,
    ChatCall,
    ChatChunk,
    LLMCallFailed,
    estimated_usage,
    reserve_budget,
    settle_reservation,
)
from services.agents.llm_budget import LLMBudget, Reservation
from services.gen.roundtable.common.v1 import discussion_pb2
from services.shared import tracing

logger = logging.getLogger(__name__)

# As the openai SDK numbers its attempts (0, then 1, 2, … for its retries); the simulator links on it.
RETRY_COUNT_HEADER = "x-stainless-retry-count"
# Statuses worth sending again (the SDK's set): timeout, conflict, rate limit, server errors.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# What a 429 without any retry hint pauses the backend for.
DEFAULT_RATE_LIMIT_SECONDS = 1.0
# Idle pooled sockets are closed after this long (providers close theirs after about a minute).
KEEPALIVE_SECONDS = 30.0
# After [DONE] the body's end follows at once; a server that holds it open longer loses the socket.
DRAIN_SECONDS = 1.0
# Error bodies are short; a longer one is cut to this many characters in the message.
MAX_ERROR_MESSAGE_CHARS = 500
# aiohttp rounds timeouts of this many seconds or more up to a whole second; ours must be exact.
NO_CEILING_SECONDS = 1e9
# OpenAI's duration format in x-ratelimit-reset-*: "1s", "6m0s", "20ms", "1h2m3.5s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class _AttemptFailed(Exception):
    """One attempt failed in a way a retry may fix; carries what the provider said to wait, if anything."""

    def __init__(self, failure: LLMCallFailed, retry_after_seconds: float | None = None) -> None:
        super().__init__(failure.reason)
        self.failure = failure
        self.retry_after_seconds = retry_after_seconds


class _SSEStream:
    """The SSE events of one response: the texts of each read, and whether the answer ended."""

    __slots__ = (
        *("response", "backend_name", "pending", "done", "finished", "usage", "pieces"),
        *("malformed", "first_malformed", "_buffer"),
    )

    def __init__(self, response: aiohttp.ClientResponse, backend_name: str) -> None:
        self.response = response
        self.backend_name = backend_name
        # Texts read but not yet given to the caller (the attempt reads up to the first text).
        self.pending: list[str] = []
        self.done = False  # [DONE] came
        self.finished = False  # a finish_reason came
        self.usage: Any = None
        self.pieces = 0
        self.malformed = 0
        self.first_malformed = b""
        self._buffer = b""

    async def read_texts(self) -> list[str] | None:
        """The texts of the next read that carries any; None once the stream has ended (checked by end())."""
        content = self.response.content
        texts: list[str] = []
        while not self.done:
            try:
                data = await content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
                # The connection broke mid-body (a chunked body cut short, the server gone).
                self._cut(f"connection lost mid-answer: {error}")
                return None
            if not data:
                return None
            if self._buffer:
                data = self._buffer + data
            lines = data.split(b"\n")
            self._buffer = lines.pop()
            for line in lines:
                # Blank separators, ": comments" and event:/id: fields carry no data.
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    break
                text = self._text_of(payload)
                if text:
                    texts.append(text)
            if texts:
                self.pieces += len(texts)
                return texts
        return None

    def _text_of(self, payload: bytes) -> str | None:
        try:
            event = orjson.loads(payload)
            choices = event.get("choices")
            text = None
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    text = delta.get("content")
                if choice.get("finish_reason"):
                    self.finished = True
            usage = event.get("usage")
            if usage:
                self.usage = usage
            elif "error" in event:
                raise _AttemptFailed(
                    LLMCallFailed(
                        f"LLM backend {self.backend_name} sent an error mid-stream: {_error_message(event)}", True
                    )
                )
            if text is None or type(text) is str:
                return text
        except (orjson.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
            pass
        if not self.malformed:
            self.first_malformed = payload
        self.malformed += 1
        metrics.LLM_MALFORMED_LINES.inc()
        return None

    def _cut(self, reason: str) -> None:
        """A broken connection: the end of a complete answer, or a retryable failure."""
        if self.finished or self.usage is not None:
            self.done = True
            return
        raise _AttemptFailed(LLMCallFailed(f"LLM backend {self.backend_name}: {reason}", True))

    def end(self) -> None:
        """Check that the stream ended as a complete answer does; raise a retryable failure if not."""
        if self.done or self.finished or self.usage is not None:
            return
        raise _AttemptFailed(
            LLMCallFailed(
                f"LLM backend {self.backend_name}: the stream ended before the answer did "
                f"(no [DONE], no finish_reason, after {self.pieces} pieces)",
                True,
            )
        )

    def token_usage(self, call: ChatCall) -> discussion_pb2.TokenUsage:
        """The usage the provider sent, or the estimate when it sent none (llama.cpp) or a malformed one."""
        usage = self.usage
        try:
            if usage is not None:
                return discussion_pb2.TokenUsage(
                    prompt_tokens=usage["prompt_tokens"],
                    completion_tokens=usage["completion_tokens"],
                    total_tokens=usage["total_tokens"],
                )
        except (KeyError, TypeError, ValueError):
            logger.warning("LLM backend %s sent a malformed usage %r; estimating", self.backend_name, usage)
        return estimated_usage(call.messages, self.pieces)


class EndpointPools:
    """One keep-alive socket pool per endpoint (scheme, host and port), shared by every backend that names it.

    Each pool holds at most max_connections sockets (the outbound cap), opened only for calls in
    flight and kept for the next call; two backends on one endpoint (another model, another key)
    share its sockets rather than each keeping its own idle ones.
    """

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session_for(self, url: str) -> aiohttp.ClientSession:
        """The pool of url's endpoint, made on first use (inside the running loop that will use it)."""
        parts = urllib.parse.urlsplit(url)
        endpoint = f"{parts.scheme}://{parts.netloc}"
        session = self._sessions.get(endpoint)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
            )
            session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
            self._sessions[endpoint] = session
        return session

    async def close(self) -> None:
        """Close every pool's sockets."""
        for session in self._sessions.values():
            await session.close()


class StreamingChatClient:
    """One OpenAI-compatible backend over aiohttp: streamed chat completions, retries, budget, one socket pool."""

    def __init__(self, backend: Backend, *, max_retries: int, budget: LLMBudget, pools: EndpointPools) -> None:
        self.backend = backend
        self._url = backend.base_url.rstrip("/") + "/chat/completions"
        headers = {
            "Authorization": f"Bearer {backend.api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        if backend.organization:
            headers["OpenAI-Organization"] = backend.organization
        if backend.project:
            headers["OpenAI-Project"] = backend.project
        self._headers = headers
        self._max_retries = max_retries
        self._pools = pools
        self._budget = budget
        self._budget_key = backend.budget_key
        self._session: aiohttp.ClientSession | None = None
        # HTTP(S)_PROXY / NO_PROXY apply as they do to the openai SDK's httpx client; read once here, since
        # aiohttp's trust_env would read the environment and ~/.netrc again on every request.
        self._proxy = env_proxy(self._url)
        self._retrying = AsyncRetrying(
            retry=retry_if_exception(lambda error: isinstance(error, _AttemptFailed)),
            stop=self._stop,
            wait=self._wait,
            before_sleep=self._before_retry,
            reraise=True,
        )
        self._backoff = wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session of this backend's endpoint: its keep-alive pool of at most the outbound cap's sockets."""
        session = self._session
        if session is None or session.closed:
            session = self._session = self._pools.session_for(self._url)
        return session

    async def stream(self, call: ChatCall) -> AsyncGenerator[ChatChunk, None]:
        """Stream one completion: retried until its first text, then read to its end."""
        body = orjson.dumps(
            {
                "model": call.model,
                "messages": [{"role": m.role, "content": m.content} for m in call.messages],
                "temperature": call.temperature,
                "max_tokens": call.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        retries = [0]  # this call's retries so far
        # Not made active across the yields below: a consumer may close this generator from another context.
        span = tracing.start_llm_span(
            model=call.model, base_url=self.backend.base_url, max_tokens=call.max_tokens, temperature=call.temperature
        )
        try:
            # Active while the call opens, so its retries are events on it and the request carries its traceparent.
            with tracing.active(span):
                try:
                    # The first attempt goes without tenacity: its bookkeeping (~30 µs a call, measured in
                    # bench/llm_clients.py) would be most of this client's overhead on a short answer.
                    opened = await self._attempt(call, body, retries)
                except _AttemptFailed as first_failure:
                    opened = await self._retry(call, body, retries, first_failure)
        except BaseException as failure:
            tracing.end_llm_span(span, None, error=failure)
            raise
        sse, reservation = opened
        used_tokens = 0
        completed = False
        usage: discussion_pb2.TokenUsage | None = None
        try:
            texts: list[str] | None = sse.pending
            while texts is not None:
                for text in texts:
                    yield ChatChunk(text=text)
                texts = await sse.read_texts()
            sse.end()
            await _drain(sse.response)
            usage = sse.token_usage(call)
            used_tokens = usage.total_tokens
            completed = True
            yield ChatChunk(usage=usage)
        except _AttemptFailed as error:
            # Text was given already: the call cannot be sent again.
            raise error.failure from None
        except TimeoutError as error:
            raise call.timed_out() from error
        finally:
            tracing.end_llm_span(span, usage, error=None if completed else sys.exc_info()[1])
            sse.response.close()  # a no-op once released to the pool; else the socket goes now
            if sse.malformed:
                logger.warning(
                    "LLM backend %s sent %d malformed SSE data line(s), skipped; the first: %r",
                    self.backend.name,
                    sse.malformed,
                    sse.first_malformed[:200],
                )
            await settle_reservation(reservation, used_tokens, shielded=not completed)

    async def _retry(
        self, call: ChatCall, body: bytes, retries: list[int], first_failure: _AttemptFailed
    ) -> tuple[_SSEStream, Reservation]:
        """The retries after a failed first attempt, in tenacity's loop; LLMCallFailed when they are spent."""
        replayed = [first_failure]

        async def attempt(call: ChatCall, body: bytes, retries: list[int]) -> tuple[_SSEStream, Reservation]:
            # Tenacity's first attempt is the one already made: it sees its failure, then waits and retries.
            if replayed:
                raise replayed.pop()
            return await self._attempt(call, body, retries)

        # Per call: tenacity keeps its state on the object.
        retrying = self._retrying.copy()
        try:
            opened: tuple[_SSEStream, Reservation] = await retrying(attempt, call, body, retries)
        except _AttemptFailed as error:
            reason = error.failure.reason if not retries[0] else f"{error.failure.reason} (after {retries[0]} retries)"
            raise LLMCallFailed(reason, error.failure.retryable) from None
        return opened

    async def _attempt(self, call: ChatCall, body: bytes, retries: list[int]) -> tuple[_SSEStream, Reservation]:
        """Reserve, send, and read up to the first text; a failure a retry may fix raises _AttemptFailed."""
        reservation = await reserve_budget(self._budget, self._budget_key, call, self.backend.name)
        response: aiohttp.ClientResponse | None = None
        try:
            remaining_seconds = call.deadline - time.monotonic()
            if remaining_seconds <= 0:
                raise call.timed_out()
            try:
                headers = self._headers if not retries[0] else {**self._headers, RETRY_COUNT_HEADER: str(retries[0])}
                if tracing.is_on():
                    headers = {**headers}
                    tracing.inject(headers)  # the provider (or a proxy in front of it) may join the trace
                response = await self.session.post(
                    self._url,
                    data=body,
                    proxy=self._proxy,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=remaining_seconds, ceil_threshold=NO_CEILING_SECONDS),
                )
            except aiohttp.ClientError as error:
                failure = LLMCallFailed(f"LLM backend {self.backend.name} unreachable: {error}", True)
                raise _AttemptFailed(failure) from error
            if response.status != 200:
                await self._refused(response)
            sse = _SSEStream(response, self.backend.name)
            texts = await sse.read_texts()
            if texts is None:
                sse.end()
            else:
                sse.pending = texts
            return sse, reservation
        except TimeoutError as error:
            if response is not None:
                response.close()
            await settle_reservation(reservation, 0, shielded=True)
            raise call.timed_out() from error
        except BaseException:
            if response is not None:
                response.close()
            await settle_reservation(reservation, 0, shielded=True)
            raise

    async def _refused(self, response: aiohttp.ClientResponse) -> None:
        """Raise what a non-200 answer means: _AttemptFailed when a retry may fix it, else LLMCallFailed."""
        status = response.status
        try:
            raw = await response.read()
        except aiohttp.ClientError:
            raw = b""
        response.release()
        try:
            message = _error_message(orjson.loads(raw))
        except orjson.JSONDecodeError:
            message = raw.decode(errors="replace")[:MAX_ERROR_MESSAGE_CHARS] or (response.reason or "no message")
        reason = f"LLM backend {self.backend.name} answered HTTP {status}: {message}"
        if status == 429:
            metrics.LLM_RATE_LIMITED.inc()
            told = retry_after_seconds(response.headers, rate_limited=True)
            # Every replica pauses, not only this call's retry.
            await self._budget.cool_down(self._budget_key, told if told is not None else DEFAULT_RATE_LIMIT_SECONDS)
            raise _AttemptFailed(LLMCallFailed(reason, True), told)
        if status in RETRYABLE_STATUSES or status >= 500:
            raise _AttemptFailed(LLMCallFailed(reason, True), retry_after_seconds(response.headers, rate_limited=False))
        # 400, 401, 403, 404, 422…: the same request would be refused again.
        raise LLMCallFailed(reason, False)

    def _wait(self, state: RetryCallState) -> float:
        """What the provider said to wait, else the jittered exponential backoff."""
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, _AttemptFailed) and error.retry_after_seconds is not None:
            return error.retry_after_seconds
        return self._backoff(state)

    def _stop(self, state: RetryCallState) -> bool:
        """Stop when retries are spent, or when the wait would end past the call's deadline."""
        if state.attempt_number > self._max_retries:
            return True
        call: ChatCall = state.args[0]
        return time.monotonic() + state.upcoming_sleep >= call.deadline

    def _before_retry(self, state: RetryCallState) -> None:
        metrics.LLM_RETRIES.inc()
        state.args[2][0] += 1
        if tracing.is_on():
            error = state.outcome.exception() if state.outcome is not None else None
            reason = error.failure.reason if isinstance(error, _AttemptFailed) else type(error).__qualname__
            # Only what failed ("LLM backend x answered HTTP 429"): the provider's message may quote the prompt.
            tracing.add_event(
                "retry",
                {
                    "retry.attempt": state.args[2][0],
                    "retry.wait_seconds": state.upcoming_sleep,
                    "retry.reason": reason.split(":", 1)[0],
                },
            )

    async def close(self) -> None:
        """Close the endpoint pools this client uses (shared ones too: the router closes every client at once)."""
        await self._pools.close()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what follows [DONE] (the body's end) so the socket goes back to the pool; close it if that takes long."""
    content = response.content
    if not content.at_eof():
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while await content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            response.close()
            return
    response.release()


def _error_message(body: Any) -> str:
    """The message of an OpenAI error body ({"error": {"message": …}}), else the body, cut short."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:MAX_ERROR_MESSAGE_CHARS]
        if isinstance(error, str):
            return error[:MAX_ERROR_MESSAGE_CHARS]
    return orjson.dumps(body).decode()[:MAX_ERROR_MESSAGE_CHARS]


def env_proxy(url: str) -> str | None:
    """The proxy the environment (HTTP_PROXY, HTTPS_PROXY) names for url, unless NO_PROXY exempts its host."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def parse_duration_seconds(text: str) -> float | None:
    """Seconds of an OpenAI x-ratelimit-reset-* duration ("1s", "6m0s", "20ms", "1h2m3.5s"); None if malformed."""
    text = text.strip()
    if not text or _DURATION_PART.sub("", text):
        return None
    return sum(float(number) * _DURATION_UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))


def retry_after_seconds(headers: Mapping[str, str], *, rate_limited: bool) -> float | None:
    """How long the provider said to wait: the largest of retry-after-ms, Retry-After and (on a 429) the
    x-ratelimit-reset-requests/-tokens of a spent quota; None when it said nothing usable."""
    told: list[float] = []
    if (milliseconds := headers.get("retry-after-ms")) is not None:
        try:
            told.append(float(milliseconds) / 1000)
        except ValueError:
            pass
    if (retry_after := headers.get("retry-after")) is not None:
        try:
            told.append(float(retry_after))
        except ValueError:
            try:
                told.append(email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    if rate_limited:
        # x-ratelimit-reset-* is the time until that quota is full again, so it counts only for a quota
        # the provider says is spent (remaining 0, or not said); otherwise Retry-After is the better word.
        for kind in ("requests", "tokens"):
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if reset is None or headers.get(f"x-ratelimit-remaining-{kind}", "0").strip() != "0":
                continue
            if (seconds := parse_duration_seconds(reset)) is not None:
                told.append(seconds)
    usable = [seconds for seconds in told if math.isfinite(seconds)]
    return max(0.0, *usable) if usable else None
