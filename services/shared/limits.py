"""Hard ceilings on what one discussion may ask for, read by every service that checks a request.

The session service's own limits (max_topic_chars, max_rounds) are settings bounded by these, and the
agent service refuses only what exceeds them, so a request the session accepts never fails in the agents.
"""

from __future__ import annotations

MAX_TOPIC_CHARS = 100_000
"""Longest topic any service accepts, in characters."""

MAX_ROUNDS = 10
"""Most debate rounds a discussion may run (the moderator's summary comes after them)."""

MAX_SESSION_ID_CHARS = 128
"""Longest session id the agent service keeps an agent set under."""
