"""Configuration for the LLM simulator: start-up settings and the runtime-tunable subset."""

from __future__ import annotations

import json
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Shared constrained types so start-up settings and runtime updates validate identically.
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(ge=1)]
# A per-minute quota; 0 means the simulator enforces none.
PerMinuteLimit = Annotated[int, Field(ge=0)]
# NoDecode lets the validator below accept "Alice,Bob" from env as well as a JSON list.
PersonaList = Annotated[list[str], NoDecode]


def parse_persona_list(value: Any) -> Any:
    """Turn a comma-separated or JSON string into a list of stripped persona names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = text.split(",")
    if isinstance(value, list | tuple):
        return [str(item).strip() for item in value if str(item).strip()]
    return value


# Descriptions shared by the start-up and runtime fields (--help shows them).
ANSWER_LENGTH_RULE = (
    "Each answer's length in tokens (words) is drawn from answer_tokens_min..answer_tokens_max by the prompt's"
    " digest (same prompt, same length), then capped by the request's max_tokens/max_completion_tokens, or by"
    " max_tokens_default when it sets neither; a cut answer ends with finish_reason 'length'."
)
RPM_DESCRIPTION = (
    "Requests per minute allowed per API key (the bearer token), 0 for no quota: a token bucket of this size"
    " refilled continuously; a request it cannot cover gets HTTP 429 with Retry-After."
)
TPM_DESCRIPTION = (
    "Tokens per minute allowed per API key, 0 for no quota: a request is charged its prompt estimate plus its"
    " max_tokens on admission and refunded the unused part when its answer ends."
)
DISCONNECT_DESCRIPTION = "Probability that the server closes the connection halfway through an answer, without [DONE]."
MALFORMED_DESCRIPTION = "Probability that a stream carries one line of invalid JSON halfway, then goes on."
MISSING_DONE_DESCRIPTION = "Probability that a stream ends cleanly after its last chunk but never sends [DONE]."


class _AnswerRange(Protocol):
    @property
    def answer_tokens_min(self) -> int: ...
    @property
    def answer_tokens_max(self) -> int: ...


_Ranged = TypeVar("_Ranged", bound=_AnswerRange)


def check_answer_range(model: _Ranged) -> _Ranged:
    """Reject an answer-length range whose minimum exceeds its maximum."""
    if model.answer_tokens_min > model.answer_tokens_max:
        raise ValueError(
            f"answer_tokens_min ({model.answer_tokens_min}) must not exceed answer_tokens_max"
            f" ({model.answer_tokens_max})"
        )
    return model


class SimulatorSettings(BaseSettings):
    """Start-up settings of the simulator, read from ROUNDTABLE_SIMULATOR_* env vars."""

    model_config = SettingsConfigDict(env_prefix="ROUNDTABLE_SIMULATOR_", frozen=True)

    host: str = Field(default="127.0.0.1", description="Interface to bind the HTTP server to.")
    port: int = Field(default=50060, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    model: str = Field(default="roundtable-sim-1", description="Model id reported by /v1/models and answers.")
    first_token_latency_ms: NonNegativeFloat = Field(
        default=50.0, description="Delay before the first answer token, in milliseconds."
    )
    tokens_per_second: PositiveFloat = Field(default=200.0, description="Pace at which answer words are produced.")
    max_tokens_default: int = Field(
        default=64,
        ge=1,
        description="Answer length cap, and the max_tokens charged on the TPM quota, for requests without max_tokens.",
    )
    answer_tokens_min: PositiveInt = Field(default=100, description=f"Shortest uncapped answer. {ANSWER_LENGTH_RULE}")
    answer_tokens_max: PositiveInt = Field(default=400, description="Longest uncapped answer (see answer_tokens_min).")
    rpm_limit: PerMinuteLimit = Field(default=0, description=RPM_DESCRIPTION)
    tpm_limit: PerMinuteLimit = Field(default=0, description=TPM_DESCRIPTION)
    fail_429_rate: Probability = Field(default=0.0, description="Probability that a request gets HTTP 429.")
    fail_500_rate: Probability = Field(default=0.0, description="Probability that a request gets HTTP 500.")
    hang_rate: Probability = Field(
        default=0.0, description="Probability that a request never gets an answer until the client leaves."
    )
    retry_after_seconds: NonNegativeFloat = Field(
        default=1.0, description="Value of the Retry-After header sent with simulated 429 responses."
    )
    error_retry_after_seconds: NonNegativeFloat | None = Field(
        default=None, description="Retry-After sent with simulated 500 responses; none when unset."
    )
    disconnect_rate: Probability = Field(default=0.0, description=DISCONNECT_DESCRIPTION)
    malformed_line_rate: Probability = Field(default=0.0, description=MALFORMED_DESCRIPTION)
    missing_done_rate: Probability = Field(default=0.0, description=MISSING_DONE_DESCRIPTION)
    seed: int = Field(default=0, description="Seed of the random generator that draws injected failures.")
    fail_personas: PersonaList = Field(
        default_factory=list, description="Personas whose requests always get HTTP 500 (comma list or JSON)."
    )

    _split_personas = field_validator("fail_personas", mode="before")(parse_persona_list)
    _check_answer_range = model_validator(mode="after")(check_answer_range)


class RuntimeConfig(BaseModel):
    """The part of the simulator's behaviour that tests may change while it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fail_429_rate: Probability = Field(default=0.0, description="Probability that a request gets HTTP 429.")
    fail_500_rate: Probability = Field(default=0.0, description="Probability that a request gets HTTP 500.")
    hang_rate: Probability = Field(default=0.0, description="Probability that a request hangs.")
    retry_after_seconds: NonNegativeFloat = Field(default=1.0, description="Retry-After sent with a 429.")
    error_retry_after_seconds: NonNegativeFloat | None = Field(
        default=None, description="Retry-After sent with a 500; none when unset."
    )
    first_token_latency_ms: NonNegativeFloat = Field(default=50.0, description="First-token delay in ms.")
    tokens_per_second: PositiveFloat = Field(default=200.0, description="Answer words produced per second.")
    fail_personas: list[str] = Field(default_factory=list, description="Personas that always get HTTP 500.")
    answer_tokens_min: PositiveInt = Field(default=100, description="Shortest uncapped answer, in tokens.")
    answer_tokens_max: PositiveInt = Field(default=400, description="Longest uncapped answer, in tokens.")
    rpm_limit: PerMinuteLimit = Field(default=0, description=RPM_DESCRIPTION)
    tpm_limit: PerMinuteLimit = Field(default=0, description=TPM_DESCRIPTION)
    disconnect_rate: Probability = Field(default=0.0, description=DISCONNECT_DESCRIPTION)
    malformed_line_rate: Probability = Field(default=0.0, description=MALFORMED_DESCRIPTION)
    missing_done_rate: Probability = Field(default=0.0, description=MISSING_DONE_DESCRIPTION)

    _split_personas = field_validator("fail_personas", mode="before")(parse_persona_list)
    _check_answer_range = model_validator(mode="after")(check_answer_range)

    @classmethod
    def from_settings(cls, settings: SimulatorSettings) -> RuntimeConfig:
        """Take the runtime-tunable values from the start-up settings."""
        return cls.model_validate(settings.model_dump(include=set(cls.model_fields)))

    def updated(self, changes: dict[str, Any]) -> RuntimeConfig:
        """Return a validated copy with the given fields replaced (raises pydantic.ValidationError)."""
        return type(self).model_validate({**self.model_dump(), **changes})
