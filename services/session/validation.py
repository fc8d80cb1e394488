"""Checks on client input, each failing with a message a person can act on."""

from __future__ import annotations

import re
import unicodedata

from services.shared.errors import InvalidArgument

DISCUSSION_ID = re.compile(r"[0-9a-f]{32}")
MAX_REQUEST_ID_CHARS = 128
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


def discussion_id(value: str) -> str:
    """A well-formed discussion id (32 lowercase hex characters)."""
    if not DISCUSSION_ID.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise InvalidArgument(
            f"discussion_id {shown!r} is malformed: expected the 32 hex characters CreateDiscussion returned",
            "discussion_id",
        )
    return value


def topic(value: str, max_chars: int) -> str:
    """A topic with text in it, not too long, without control characters other than newlines and tabs."""
    stripped = value.strip()
    if not stripped:
        raise InvalidArgument("topic is empty: say what the agents should discuss", "topic")
    if len(value) > max_chars:
        raise InvalidArgument(f"topic is {len(value)} characters long; the limit is {max_chars}", "topic")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in value):
        raise InvalidArgument("topic contains control characters", "topic")
    return stripped


def rounds(value: int, max_rounds: int) -> int:
    """Rounds between 1 and the server's maximum; 0 means 1."""
    if value == 0:
        return 1
    if not 1 <= value <= max_rounds:
        raise InvalidArgument(f"rounds must be between 1 and {max_rounds}, got {value}", "rounds")
    return value


def request_id(value: str) -> str:
    """An optional idempotency key of printable characters."""
    if len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable():
        raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters", "request_id")
    return value


def token_budget(value: int) -> int:
    """0 (no limit) or a positive number of tokens."""
    if value < 0:
        raise InvalidArgument("token_budget must be 0 (no limit) or positive", "token_budget")
    return value


def page_size(value: int) -> int:
    """0 means the default; negative is an error; above the maximum is capped."""
    if value < 0:
        raise InvalidArgument("page_size must not be negative", "page_size")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
