"""Deterministic answer generation: persona/topic extraction from prompts and pseudo-text rendering."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

FALLBACK_PERSONA = "assistant"
TOPIC_FALLBACK_CHARS = 200

# A fixed vocabulary: changing it changes every answer, which would break recorded expectations.
VOCABULARY: tuple[str, ...] = (
    "agree", "argument", "balance", "benefit", "broad", "careful", "case", "change", "claim", "clear",
    "concern", "consider", "context", "cost", "data", "debate", "detail", "evidence", "example", "fair",
    "future", "goal", "ground", "idea", "impact", "important", "indeed", "insight", "issue", "key",
    "long", "matter", "measure", "model", "nuance", "open", "option", "outcome", "perhaps", "point",
    "policy", "practical", "principle", "question", "reason", "risk", "scale", "sense", "shared", "short",
    "signal", "simple", "strong", "system", "term", "trade", "trust", "useful", "value", "view",
    "weigh", "whole", "wider", "yet",
)  # fmt: skip

_PERSONA_MARKER = "You are "
# Persona ends at the first ASCII or full-width clause punctuation, or a newline.
_PERSONA_END = re.compile(r"[,.;:\n，。；：]")
_TOPIC_PREFIX = "Topic:"
# One piece per word with its trailing whitespace, so concatenated pieces rebuild the text exactly.
_PIECE = re.compile(r"\S+\s*")


def content_text(content: Any) -> str:
    """Flatten an OpenAI message content (string, list of parts, or null) into plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def normalize_messages(raw: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Reduce request messages to plain {role, content} dicts with string content."""
    return [{"role": str(msg.get("role", "")), "content": content_text(msg.get("content"))} for msg in raw]


def extract_persona(messages: Sequence[Mapping[str, str]]) -> str:
    """Return the persona named after the first "You are " in the first system message."""
    for msg in messages:
        if msg["role"] not in ("system", "developer"):
            continue
        text = msg["content"]
        start = text.find(_PERSONA_MARKER)
        if start < 0:
            return FALLBACK_PERSONA
        rest = text[start + len(_PERSONA_MARKER) :]
        end = _PERSONA_END.search(rest)
        persona = (rest[: end.start()] if end else rest).strip()
        return persona or FALLBACK_PERSONA
    return FALLBACK_PERSONA


def extract_topic(messages: Sequence[Mapping[str, str]]) -> str:
    """Return the rest of the last "Topic:" line in any message, else the start of the last user message."""
    topic: str | None = None
    for msg in messages:
        for line in msg["content"].splitlines():
            stripped = line.lstrip()
            if stripped.startswith(_TOPIC_PREFIX):
                topic = stripped[len(_TOPIC_PREFIX) :].strip()
    if topic is not None:
        return topic
    for msg in reversed(messages):
        if msg["role"] == "user":
            return msg["content"][:TOPIC_FALLBACK_CHARS].strip()
    return ""


def prompt_digest(messages: Sequence[Mapping[str, str]]) -> bytes:
    """Return a stable SHA-256 digest of the normalized messages (independent of PYTHONHASHSEED)."""
    canonical = json.dumps(list(messages), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def render_answer(messages: Sequence[Mapping[str, str]], max_words: int) -> str:
    """Return the deterministic answer: a persona/topic header followed by seeded pseudo-words."""
    header = f"{extract_persona(messages)} on «{extract_topic(messages)}»: "
    count = max(1, max_words - len(header.split()))
    rng = random.Random(int.from_bytes(prompt_digest(messages)[:8], "big"))
    return header + " ".join(rng.choice(VOCABULARY) for _ in range(count))


def answer_length(messages: Sequence[Mapping[str, str]], shortest: int, longest: int) -> int:
    """Return the uncapped answer length in tokens, drawn from shortest..longest by the prompt digest."""
    # Digest bytes 8..16: bytes 0..8 already seed the words, and the two draws should not be correlated.
    draw = int.from_bytes(prompt_digest(messages)[8:16], "big")
    return shortest + draw % (longest - shortest + 1)


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer as the simulator streams it: one piece per token, and why it ended."""

    pieces: list[str]
    finish_reason: Literal["stop", "length"]

    @property
    def text(self) -> str:
        """The whole answer text."""
        return "".join(self.pieces)


def compose_answer(messages: Sequence[Mapping[str, str]], shortest: int, longest: int, cap_tokens: int) -> Answer:
    """Return the answer of the drawn length cut to cap_tokens, finishing with "length" when the cap cut it."""
    natural_tokens = answer_length(messages, shortest, longest)
    tokens = min(natural_tokens, cap_tokens)
    # render_answer never goes below header + 1 words; a provider never exceeds max_tokens, so cut to the cap.
    pieces = split_pieces(render_answer(messages, tokens))[:tokens]
    if pieces:  # a cut inside the header would leave a trailing space
        pieces[-1] = pieces[-1].rstrip()
    return Answer(pieces=pieces, finish_reason="length" if natural_tokens > cap_tokens else "stop")


def split_pieces(text: str) -> list[str]:
    """Split text into streamable pieces, one per word including its trailing whitespace."""
    return _PIECE.findall(text)


def estimate_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """Approximate prompt tokens as total content characters // 4 + 1."""
    return sum(len(msg["content"]) for msg in messages) // 4 + 1
