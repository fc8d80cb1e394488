"""aiohttp application of the OpenAI-compatible simulator, with quotas, failure injection and a request log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import ValidationError

from services.simulator.answer import (
    compose_answer,
    estimate_prompt_tokens,
    extract_persona,
    extract_topic,
    normalize_messages,
    prompt_digest,
)
from services.simulator.quota import QuotaDecision, Quotas, format_duration
from services.simulator.settings import RuntimeConfig, SimulatorSettings

logger = logging.getLogger(__name__)

REQUEST_LOG_SIZE = 10_000
RETRY_COUNT_HEADER = "x-stainless-retry-count"
# Large prompts (long discussion histories) must not hit aiohttp's 1 MiB default body limit.
MAX_BODY_BYTES = 16 * 1024 * 1024
# An injected malformed line is a chunk's "data: {..." cut off here, which no JSON parser accepts.
MALFORMED_LINE_CHARS = 40

# "disconnected": the client left; "disconnect", "malformed", "no_done": injected stream faults.
Outcome = Literal["ok", "429", "500", "hang", "disconnected", "400", "disconnect", "malformed", "no_done"]
# Outcomes whose answer is generated and sent, in full or in part.
ANSWERED_OUTCOMES: frozenset[Outcome] = frozenset({"ok", "disconnect", "malformed", "no_done"})
# Quota refusals name an organization the way OpenAI's do; this one is the simulator's.
ORGANIZATION = "org-roundtable-sim"


@dataclass(slots=True)
class RequestRecord:
    """One chat-completion request as seen by the simulator, updated while it is in flight."""

    request_id: int
    persona: str
    topic: str
    messages: list[dict[str, str]]
    stream: bool
    outcome: Outcome
    status_code: int | None
    started_at: float
    started_at_wall: float
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    answer: str = ""
    pieces_sent: int = 0
    finished_at: float | None = None
    finished_at_wall: float | None = None
    client_disconnected: bool = False
    retry_after_seconds: float | None = None
    # The answer's own ending ("stop", or "length" when max_tokens cut it), even if a fault kept it from the client.
    finish_reason: str | None = None
    prompt_tokens: int = 0
    # Charged to the key's TPM bucket on admission (0 without a TPM quota); the unused part is refunded at the end.
    tokens_charged: int = 0
    quota_refused: bool = False
    # Retries, as the openai SDK numbers them (x-stainless-retry-count), linked to the attempt before.
    retry_count: int = 0
    retry_of: int | None = None
    waited_seconds: float | None = None
    told_to_wait_seconds: float | None = None

    @property
    def finished(self) -> bool:
        """Whether the simulator is done with this request."""
        return self.finished_at is not None

    @property
    def duration(self) -> float | None:
        """Seconds between arrival and completion, or None while still in flight."""
        return None if self.finished_at is None else self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable copy of the record."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The validated subset of an OpenAI chat-completions body that the simulator uses."""

    model: str | None
    messages: list[dict[str, str]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float | None = None


class BadRequestError(ValueError):
    """Raised when a request body does not follow the OpenAI chat-completions schema."""


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Build an OpenAI-style error response."""
    body = {"error": {"message": message, "type": error_type, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def format_seconds(value: float) -> str:
    """Render seconds without a needless ".0" so integral Retry-After values look standard."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _optional_positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int subclass; "max_tokens": true is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequestError(f"'{key}' must be a positive integer")
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded chat-completions body (raises BadRequestError)."""
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequestError("'messages' is required and must be a non-empty array")
    for msg in raw_messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequestError("each message must be an object with a string 'role'")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError("'model' must be a string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequestError("'stream_options' must be an object")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)):
        raise BadRequestError("'temperature' must be a number")
    max_completion = _optional_positive_int(body, "max_completion_tokens")
    max_tokens = _optional_positive_int(body, "max_tokens")
    return ChatRequest(
        model=model,
        messages=normalize_messages(raw_messages),
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        max_tokens=max_completion if max_completion is not None else max_tokens,
        temperature=None if temperature is None else float(temperature),
    )


def api_key(request: web.Request) -> str:
    """Return the bearer token of the Authorization header: the key quotas are kept per ("" when absent)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def rate_limit_headers(decision: QuotaDecision) -> dict[str, str]:
    """Return OpenAI's x-ratelimit-* headers for the quotas that are on (none without quotas)."""
    headers: dict[str, str] = {}
    for kind, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if state is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_seconds)
    return headers


def quota_refusal_message(decision: QuotaDecision, model: str) -> str:
    """Word a quota refusal the way OpenAI does."""
    if decision.refused_by == "requests":
        scope, limit = "requests per min (RPM)", decision.requests.limit if decision.requests else 0
    else:
        scope, limit = "tokens per min (TPM)", decision.tokens.limit if decision.tokens else 0
    where = f"for {model} in organization {ORGANIZATION} on {scope}"
    if decision.retry_after_seconds is None:
        return (
            f"Request too large {where}: Limit {limit}, Requested {decision.requested}."
            " The input or output tokens must be reduced in order to run successfully."
        )
    return (
        f"Rate limit reached {where}: Limit {limit}, Used {decision.used}, Requested {decision.requested}."
        f" Please try again in {format_duration(decision.retry_after_seconds)}."
    )


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class Simulator:
    """Mutable runtime state of one simulator: failure settings, RNG, request counter and log."""

    def __init__(self, settings: SimulatorSettings) -> None:
        """Initialise state from the start-up settings."""
        self.settings = settings
        self._config = RuntimeConfig.from_settings(settings)
        self._rng = random.Random(settings.seed)
        self._log: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)
        self._quotas = Quotas()
        self._total_requests = 0
        self._in_flight = 0
        # The latest attempt of each distinct request body, so a retry can be tied to the attempt it repeats.
        self._last_attempt: OrderedDict[bytes, RequestRecord] = OrderedDict()
        # Set on shutdown so hanging requests stop waiting for a client that may never leave.
        self._closing = asyncio.Event()

    # --- state access -------------------------------------------------------------------------------

    @property
    def config(self) -> RuntimeConfig:
        """The current runtime configuration (an immutable snapshot)."""
        return self._config

    def configure(self, **changes: Any) -> RuntimeConfig:
        """Validate and apply runtime changes; raises pydantic.ValidationError on bad values."""
        # Swapping an immutable snapshot keeps in-flight requests consistent without locks.
        self._config = self._config.updated(changes)
        logger.info("simulator config updated: %s", changes)
        return self._config

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot list of the logged requests, oldest first."""
        return list(self._log)

    @property
    def total_requests(self) -> int:
        """Chat-completion requests received since start, including ones no longer in the log."""
        return self._total_requests

    @property
    def in_flight(self) -> int:
        """Chat-completion requests currently being handled."""
        return self._in_flight

    @property
    def quotas(self) -> Quotas:
        """The per-key request and token buckets, with their accounting."""
        return self._quotas

    def reset(self) -> int:
        """Clear the request log and the quota state (buckets start full), and return how many records were dropped."""
        count = len(self._log)
        self._log.clear()
        self._last_attempt.clear()
        self._quotas.clear()
        return count

    async def wait_for_record(
        self, predicate: Callable[[RequestRecord], bool], poll_interval: float = 0.01
    ) -> RequestRecord:
        """Wait until a logged record satisfies predicate and return it; bound it with asyncio.timeout."""
        while True:
            for record in list(self._log):
                if predicate(record):
                    return record
            await asyncio.sleep(poll_interval)

    def begin_shutdown(self) -> None:
        """Release hanging requests so the server can stop promptly."""
        self._closing.set()

    # --- request handling ---------------------------------------------------------------------------

    def _chance(self, rate: float) -> bool:
        # Only draw when it can matter, so a rate of 0 or 1 never disturbs the seeded sequence.
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return self._rng.random() < rate

    def _draw_outcome(self, persona: str, config: RuntimeConfig, stream: bool) -> Outcome:
        if persona in config.fail_personas:
            return "500"
        if self._chance(config.fail_429_rate):
            return "429"
        if self._chance(config.fail_500_rate):
            return "500"
        if self._chance(config.hang_rate):
            return "hang"
        if self._chance(config.disconnect_rate):
            return "disconnect"
        # A non-streamed answer has no lines to break and no [DONE] to leave out.
        if stream and self._chance(config.malformed_line_rate):
            return "malformed"
        if stream and self._chance(config.missing_done_rate):
            return "no_done"
        return "ok"

    def _new_record(
        self, chat: ChatRequest | None, outcome: Outcome, status: int | None, started: tuple[float, float]
    ) -> RequestRecord:
        self._total_requests += 1
        messages = chat.messages if chat else []
        record = RequestRecord(
            request_id=self._total_requests,
            persona=extract_persona(messages) if chat else "",
            topic=extract_topic(messages) if chat else "",
            messages=messages,
            stream=chat.stream if chat else False,
            outcome=outcome,
            status_code=status,
            started_at=started[0],
            started_at_wall=started[1],
            model=(chat.model or self.settings.model) if chat else "",
            max_tokens=chat.max_tokens if chat else None,
            temperature=chat.temperature if chat else None,
        )
        self._log.append(record)
        return record

    def _link_retry(self, record: RequestRecord, chat: ChatRequest, retry_header: str | None) -> None:
        """Tie a retry to the attempt it repeats: how long the client waited, and what it was told."""
        key = prompt_digest([{"model": record.model}, *chat.messages])
        try:
            record.retry_count = max(int(retry_header or 0), 0)
        except ValueError:
            record.retry_count = 0
        previous = self._last_attempt.pop(key, None)
        if record.retry_count > 0 and previous is not None:
            record.retry_of = previous.request_id
            record.told_to_wait_seconds = previous.retry_after_seconds
            if previous.finished_at is not None:
                record.waited_seconds = record.started_at - previous.finished_at
        self._last_attempt[key] = record
        while len(self._last_attempt) > REQUEST_LOG_SIZE:
            self._last_attempt.popitem(last=False)

    def _finish(self, record: RequestRecord) -> None:
        record.finished_at = time.monotonic()
        record.finished_at_wall = time.time()
        logger.debug(
            "request %d persona=%r outcome=%s status=%s stream=%s duration=%.3fs",
            record.request_id,
            record.persona,
            record.outcome,
            record.status_code,
            record.stream,
            record.finished_at - record.started_at,
        )

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """Serve POST /v1/chat/completions."""
        # Taken before the body is read so large prompts' upload time counts towards the request.
        started = (time.monotonic(), time.time())
        try:
            chat = parse_chat_request(json.loads(await request.read()))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and BadRequestError
            record = self._new_record(None, "400", 400, started)
            self._finish(record)
            message = str(exc) if isinstance(exc, BadRequestError) else f"invalid JSON body: {exc}"
            return error_response(400, message, "invalid_request_error")

        config = self._config  # one snapshot per request, so runtime updates never tear a response
        record = self._new_record(chat, "ok", None, started)
        self._link_retry(record, chat, request.headers.get(RETRY_COUNT_HEADER))
        record.prompt_tokens = estimate_prompt_tokens(chat.messages)
        headers = {"x-request-id": f"sim-{record.request_id}"}
        # Like a provider, quotas come first: a refused request never reaches the model (or the fault draws).
        quota = self._quotas.admit(
            api_key(request),
            config.rpm_limit,
            config.tpm_limit,
            record.prompt_tokens + (chat.max_tokens or self.settings.max_tokens_default),
        )
        headers.update(rate_limit_headers(quota))
        if not quota.admitted:
            record.outcome, record.status_code, record.quota_refused = "429", 429, True
            self._finish(record)
            return self._quota_refusal(record, quota, headers)

        record.tokens_charged = quota.tokens_charged
        record.outcome = self._draw_outcome(record.persona, config, chat.stream)
        self._in_flight += 1
        try:
            response = await self._respond(request, chat, record, config, headers)
            if record.status_code is None and record.outcome != "disconnect":
                record.status_code = response.status
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client closes the connection (handler_cancellation).
            self._mark_disconnected(record)
            raise
        finally:
            self._in_flight -= 1
            # Tokens the provider would bill: the prompt and what was sent, for any answer that was started.
            answered = record.outcome in ANSWERED_OUTCOMES or record.outcome == "disconnected"
            used_tokens = record.prompt_tokens + record.pieces_sent if answered else 0
            self._quotas.settle(quota, used_tokens)
            self._finish(record)

    def _quota_refusal(self, record: RequestRecord, quota: QuotaDecision, headers: dict[str, str]) -> web.Response:
        if quota.retry_after_seconds is not None:
            # Whole seconds rounded up in Retry-After; the SDKs prefer the exact retry-after-ms.
            retry_after_ms = max(1, math.ceil(quota.retry_after_seconds * 1000))
            record.retry_after_seconds = retry_after_ms / 1000
            headers["Retry-After"] = str(math.ceil(retry_after_ms / 1000))
            headers["retry-after-ms"] = str(retry_after_ms)
        message = quota_refusal_message(quota, record.model)
        error_type = quota.refused_by or "requests"
        return error_response(429, message, error_type, "rate_limit_exceeded", headers)

    def _mark_disconnected(self, record: RequestRecord) -> None:
        # A cancellation during shutdown is the server leaving, not the client; so is an injected disconnect.
        record.client_disconnected = not self._closing.is_set() and record.outcome != "disconnect"
        if record.outcome == "ok":
            record.outcome = "disconnected"

    async def _respond(
        self,
        request: web.Request,
        chat: ChatRequest,
        record: RequestRecord,
        config: RuntimeConfig,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        if record.outcome == "429":
            record.retry_after_seconds = config.retry_after_seconds
            headers["Retry-After"] = format_seconds(config.retry_after_seconds)
            headers["retry-after-ms"] = str(round(config.retry_after_seconds * 1000))
            return error_response(429, "simulated rate limit", "requests", "rate_limit_exceeded", headers)
        if record.outcome == "500":
            if config.error_retry_after_seconds is not None:
                record.retry_after_seconds = config.error_retry_after_seconds
                headers["Retry-After"] = format_seconds(config.error_retry_after_seconds)
                headers["retry-after-ms"] = str(round(config.error_retry_after_seconds * 1000))
            if record.persona in config.fail_personas:
                message = f"simulated failure for persona {record.persona!r}"
            else:
                message = "simulated server error"
            return error_response(500, message, "server_error", None, headers)
        if record.outcome == "hang":
            await self._closing.wait()
            return error_response(503, "simulator shutting down", "server_error", None, headers)

        answer = compose_answer(
            chat.messages,
            config.answer_tokens_min,
            config.answer_tokens_max,
            chat.max_tokens or self.settings.max_tokens_default,
        )
        record.answer, record.finish_reason = answer.text, answer.finish_reason
        pieces = answer.pieces
        usage = {"prompt_tokens": record.prompt_tokens, "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion_id = f"chatcmpl-sim-{record.request_id}"
        if chat.stream:
            return await self._stream(request, chat, record, config, headers, pieces, usage, completion_id)

        generation_seconds = config.first_token_latency_ms / 1000 + len(pieces) / config.tokens_per_second
        if record.outcome == "disconnect":
            # Halfway through the answer the connection drops; the client gets no response at all.
            await asyncio.sleep(generation_seconds / 2)
            return _drop_connection(request)
        await asyncio.sleep(generation_seconds)
        record.pieces_sent = len(pieces)
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model,
            "system_fingerprint": "roundtable-sim",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": record.answer, "refusal": None},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": usage,
        }
        return web.json_response(body, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        record: RequestRecord,
        config: RuntimeConfig,
        headers: dict[str, str],
        pieces: list[str],
        usage: dict[str, int],
        completion_id: str,
    ) -> web.StreamResponse:
        created = int(time.time())

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": record.model,
                "system_fingerprint": "roundtable-sim",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if chat.include_usage:
                payload["usage"] = None  # OpenAI sends null usage on content chunks when usage is requested
            return _sse(payload)

        response = web.StreamResponse(
            status=200,
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        record.status_code = 200
        loop = asyncio.get_running_loop()
        try:
            await response.write(chunk({"role": "assistant", "content": ""}))
            # Pace against absolute deadlines so per-write overhead does not accumulate as drift.
            first_token_at = loop.time() + config.first_token_latency_ms / 1000
            interval = 1.0 / config.tokens_per_second
            halfway = len(pieces) // 2
            for index, piece in enumerate(pieces):
                delay = first_token_at + (index + 1) * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if index == halfway and record.outcome == "disconnect":
                    # What was written is flushed, then the connection closes: no terminating chunk, no [DONE].
                    return _drop_connection(request, response)
                if index == halfway and record.outcome == "malformed":
                    await response.write(chunk({"content": piece})[:MALFORMED_LINE_CHARS] + b"\n\n")
                await response.write(chunk({"content": piece}))
                record.pieces_sent = index + 1
            await response.write(chunk({}, record.finish_reason))
            if chat.include_usage:
                usage_chunk = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": record.model,
                    "system_fingerprint": "roundtable-sim",
                    "choices": [],
                    "usage": usage,
                }
                await response.write(_sse(usage_chunk))
            if record.outcome != "no_done":
                await response.write(_sse("[DONE]"))
            await response.write_eof()
        except ConnectionResetError:
            # The client went away between cancellation checks; the write noticed first.
            self._mark_disconnected(record)
        return response

    # --- other endpoints ----------------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        """Serve GET /v1/models in OpenAI list format."""
        model = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "roundtable"}
        return web.json_response({"object": "list", "data": [model]})

    async def handle_healthz(self, request: web.Request) -> web.Response:
        """Serve GET /healthz."""
        return web.Response(text="ok")

    async def handle_list_requests(self, request: web.Request) -> web.Response:
        """Serve GET /_sim/requests: the request log as a JSON list."""
        return web.json_response([record.to_json() for record in self._log])

    async def handle_quota(self, request: web.Request) -> web.Response:
        """Serve GET /_sim/quota: the quota limits and, per API key, what was admitted, refused and charged."""
        usage = {key: dataclasses.asdict(key_usage) for key, key_usage in self._quotas.usage().items()}
        limits = {"rpm_limit": self._config.rpm_limit, "tpm_limit": self._config.tpm_limit}
        return web.json_response({**limits, "keys": usage})

    async def handle_reset(self, request: web.Request) -> web.Response:
        """Serve POST /_sim/reset: clear the request log and the quota state."""
        return web.json_response({"cleared": self.reset()})

    async def handle_get_config(self, request: web.Request) -> web.Response:
        """Serve GET /_sim/config: the current runtime configuration."""
        return web.json_response(self._config.model_dump())

    async def handle_set_config(self, request: web.Request) -> web.Response:
        """Serve POST /_sim/config: validate and apply runtime configuration changes."""
        try:
            changes = json.loads(await request.read())
        except ValueError as exc:
            return error_response(400, f"invalid JSON body: {exc}", "invalid_request_error")
        if not isinstance(changes, dict):
            return error_response(400, "config body must be a JSON object", "invalid_request_error")
        try:
            config = self.configure(**changes)
        except ValidationError as exc:
            return error_response(400, f"invalid config: {exc}", "invalid_request_error")
        return web.json_response(config.model_dump())


def _drop_connection(request: web.Request, response: web.StreamResponse | None = None) -> web.StreamResponse:
    """Close the connection under a response (flushing what was written) and return something for aiohttp to end."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp's attempt to finish this response meets the closed transport and gives up quietly.
    return response or web.Response()


SIMULATOR_KEY: web.AppKey[Simulator] = web.AppKey("simulator", Simulator)


def create_app(settings: SimulatorSettings, simulator: Simulator | None = None) -> web.Application:
    """Build the aiohttp application; its Simulator is available as app[SIMULATOR_KEY]."""
    sim = simulator or Simulator(settings)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIMULATOR_KEY] = sim
    app.router.add_get("/v1/models", sim.handle_models)
    app.router.add_post("/v1/chat/completions", sim.handle_chat)
    app.router.add_get("/healthz", sim.handle_healthz)
    app.router.add_get("/_sim/requests", sim.handle_list_requests)
    app.router.add_get("/_sim/quota", sim.handle_quota)
    app.router.add_post("/_sim/reset", sim.handle_reset)
    app.router.add_get("/_sim/config", sim.handle_get_config)
    app.router.add_post("/_sim/config", sim.handle_set_config)
    return app
